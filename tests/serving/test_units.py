"""Job-service pieces that need no server: settings, storage, retry decisions, keys, logs."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lipsync.errors import ConfigError, NoFaceError
from lipsync.serving import auth, outage, queue, scratch
from lipsync.serving.logs import JsonFormatter, job_context
from lipsync.serving.scratch import Scratch
from lipsync.serving.settings import ServeSettings
from lipsync.serving.storage import FileStorage, StorageError, open_storage


def test_settings_from_env_and_overrides():
    env = {
        "DATABASE_URL": "postgresql://u:secret@db/x",
        "LIPSYNC_MAX_UPLOAD_BYTES": "1000",
        "LIPSYNC_INPUT_URL_BUCKETS": "a, b",
        "LIPSYNC_QUOTA_PER_KEY": "none",
        "LIPSYNC_PRESET": "v1.5",
    }
    s = ServeSettings.from_env(env, preset="tiny")
    assert s.database_url.endswith("@db/x") and s.max_upload_bytes == 1000
    assert s.input_url_buckets == ["a", "b"] and s.quota_per_key is None
    assert s.preset == "tiny"  # the flag wins
    assert "secret" not in json.dumps(s.describe())
    with pytest.raises(ConfigError, match="LIPSYNC_MAX_ATTEMPTS"):
        ServeSettings.from_env({"LIPSYNC_MAX_ATTEMPTS": "zero"})
    with pytest.raises(ConfigError, match="DATABASE_URL"):
        ServeSettings.from_env({}).require_database()


def test_file_storage_is_atomic_and_refuses_bad_keys(tmp_path):
    store = open_storage(ServeSettings(storage_url=(tmp_path / "s").as_uri()))
    assert isinstance(store, FileStorage)
    src = tmp_path / "a.bin"
    src.write_bytes(b"x" * 3_000_000)
    store.put_file("results/j.mp4", src)
    store.put_file("results/j.mp4", src)  # a retry overwrites: still one object
    assert store.list() == ["results/j.mp4"]
    assert store.size("results/j.mp4") == 3_000_000
    assert b"".join(store.iter_chunks("results/j.mp4")) == src.read_bytes()

    class Boom(Exception):
        pass

    class Failing:
        def read(self, n):
            raise Boom

    with pytest.raises(Boom):
        store.put_fileobj("results/k.mp4", Failing())
    assert store.list() == ["results/j.mp4"]  # no partial object, no temp file left
    for bad in ("../x", "/etc/passwd", "a//b", ""):
        with pytest.raises(StorageError):
            store.put_file(bad, src)
    with pytest.raises(StorageError):
        store.iter_chunks("results/missing.mp4")
    store.delete("results/j.mp4")
    assert store.size("results/j.mp4") is None
    # deleting a job's last upload removes its folder too (no empty uploads/<id>/ left)
    store.put_file("uploads/a/video.mp4", src)
    store.put_file("uploads/b/video.mp4", src)
    store.delete("uploads/a/video.mp4")
    assert not (store.root / "uploads" / "a").exists() and (store.root / "uploads").is_dir()
    store.delete("uploads/b/video.mp4")
    assert store.list() == [] and store.root.is_dir()


def row(failures=0, max_attempts=3, chunk=16):
    return {"failures": failures, "max_attempts": max_attempts, "options": {"chunk_frames": chunk}}


def test_retry_decisions():
    s = ServeSettings(retry_backoff_s=2, retry_backoff_max_s=5)
    d = queue.decide(s, NoFaceError("no face"), row())
    assert d.retry_in_s is None and d.kind == "user_error" and d.error_kind == "NoFaceError"
    d = queue.decide(s, torch.cuda.OutOfMemoryError("CUDA out of memory"), row())
    assert d.retry_in_s == 2 and d.options == {"chunk_frames": 8} and d.kind == "oom"
    d = queue.decide(s, RuntimeError("CUDA error: out of memory"), row(failures=1, chunk=8))
    assert d.retry_in_s == 4 and d.options == {"chunk_frames": 4}
    d = queue.decide(s, torch.cuda.OutOfMemoryError("x"), row(chunk=1))
    assert d.retry_in_s is None and "even with 1 frame" in d.reason
    d = queue.decide(s, ValueError("boom"), row(failures=1))
    assert d.retry_in_s == 4 and d.reason == "ValueError: boom"
    d = queue.decide(s, ValueError("boom"), row(failures=2))
    assert d.retry_in_s is None and d.reason == "failed after 3 attempts: ValueError: boom"
    assert queue.backoff_s(s, 3) == 5  # capped
    # what the worker records: another try with the new options, or the end
    retry = queue.decide(s, torch.cuda.OutOfMemoryError("x"), row()).outcome()
    assert (retry.status, retry.retry_in_s, retry.options) == ("retry", 2, {"chunk_frames": 8})
    assert retry.kind == "oom" and retry.count_failure
    final = queue.decide(s, NoFaceError("no face"), row()).outcome()
    assert (final.status, final.kind, final.reason) == ("failed", "NoFaceError", "no face")


def test_triton_errors_are_retried_not_the_users_fault():
    pytest.importorskip("tritonclient", reason="the serve extra is not installed")
    from lipsync.serving.triton.client import TritonError, TritonUnavailableError

    s = ServeSettings(retry_backoff_s=2)
    down = TritonUnavailableError("Triton server at grpc://t:8001 is unreachable (…)")
    d = queue.decide(s, down, row())
    assert d.retry_in_s == 2 and d.kind == "unavailable"
    assert d.error_kind == "TritonUnavailableError" and d.reason.startswith("TritonUnavail")
    d = queue.decide(s, TritonError("Triton server at grpc://t:8001: boom"), row(failures=1))
    assert d.retry_in_s == 4 and d.kind == "triton"
    d = queue.decide(s, down, row(failures=2))  # still bounded by max_attempts
    assert d.retry_in_s is None and d.reason.startswith("failed after 3 attempts: ")


def test_key_headers_and_format():
    key = auth.generate_key()
    assert key.startswith("lsk_") and len(key) >= 45
    assert auth.generate_key() != key
    assert auth.hash_key(key) != key and len(auth.hash_key(key)) == 64
    assert auth.key_from_headers(f"Bearer {key}", None) == key
    assert auth.key_from_headers(f"bearer  {key} ", None) == key
    assert auth.key_from_headers("Basic abc", None) is None
    assert auth.key_from_headers(None, key) == key
    assert auth.key_from_headers(None, None) is None


def test_json_logs_carry_the_job_id():
    record = logging.LogRecord("lipsync.x", logging.INFO, __file__, 1, "hello %s", ("you",), None)
    record.action = "start"
    with job_context(job_id="j-1"):
        line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "hello you" and line["job_id"] == "j-1" and line["action"] == "start"
    assert "job_id" not in json.loads(JsonFormatter().format(record))


def test_triton_runner_needs_a_url():
    from lipsync.serving.worker import make_runner

    with pytest.raises(ConfigError, match="Triton URL"):
        make_runner(ServeSettings(runner="triton"))
    with pytest.raises(ConfigError, match="unknown runner"):
        make_runner(ServeSettings(runner="nonsense"))
    with pytest.raises(ConfigError, match="cannot load runner"):
        make_runner(ServeSettings(runner="no_such_module:factory"))


def test_database_outage_errors_are_retried_until_the_limit_and_others_raised_at_once():
    import psycopg
    from psycopg_pool import PoolTimeout

    assert outage.is_outage(psycopg.OperationalError("connection refused"))
    assert outage.is_outage(PoolTimeout("no connection after 2 s"))
    wrapped = RuntimeError("procrastinate said no")
    wrapped.__cause__ = psycopg.OperationalError("server closed the connection")
    assert outage.is_outage(wrapped)
    assert not outage.is_outage(psycopg.errors.UniqueViolation("duplicate key"))
    assert not outage.is_outage(ValueError("bug"))

    s = ServeSettings(db_retry_s=0.01, db_retry_max_s=0.02, db_outage_limit_s=0.5)
    health = outage.Health(s)
    calls = []

    def flaky():
        calls.append(time.monotonic())
        if len(calls) < 4:
            raise psycopg.OperationalError("connection refused")
        return "written"

    assert outage.retry(flaky, health, "test") == "written"
    assert len(calls) == 4 and not health.down and health.up_for() < 0.5
    gaps = [b - a for a, b in zip(calls, calls[1:], strict=False)]
    assert gaps[0] >= 0.009 and gaps[-1] >= 0.018  # 0.01, 0.02, 0.02 (±10 %)

    def down():
        raise psycopg.OperationalError("connection refused")

    t0 = time.monotonic()
    with pytest.raises(outage.DatabaseUnavailable, match="unreachable for") as info:
        outage.retry(down, health, "test")
    assert 0.5 <= time.monotonic() - t0 < 2 and info.value.exit_code == 3
    assert health.down

    def bug():
        raise psycopg.errors.UndefinedTable("no such table")

    with pytest.raises(psycopg.errors.UndefinedTable):
        outage.retry(bug, outage.Health(s), "test")


def test_timings_that_would_take_live_workers_for_dead_are_refused():
    from lipsync.serving.consumer import check_settings

    check_settings(ServeSettings())  # the defaults: 10 + 5 < 30, and 900 s to give up
    with pytest.raises(ConfigError, match="stalled_after_s"):
        check_settings(ServeSettings(heartbeat_s=10, db_retry_max_s=25, stalled_after_s=30))
    with pytest.raises(ConfigError, match="db_outage_limit_s"):
        check_settings(ServeSettings(heartbeat_s=10, db_outage_limit_s=12))


def test_scratch_folders_of_ended_processes_are_purged_and_live_ones_kept(tmp_path):
    mine = Scratch(tmp_path, "test")
    job = mine.mkdtemp("job-")
    (job / "frames.bin").write_bytes(b"x" * 1000)
    code = (
        "import sys, time; from lipsync.serving.scratch import Scratch; "
        "s = Scratch(sys.argv[1], 'victim'); (s.mkdtemp('job-') / 'f').write_text('x'); "
        "print(s.path, flush=True); time.sleep(60)"
    )
    victim = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    theirs = Path(victim.stdout.readline().strip())
    assert theirs.is_dir() and scratch.purge_orphans(tmp_path) == []  # both owners alive
    victim.kill()  # SIGKILL: no clean-up of its own
    victim.wait()
    assert theirs.is_dir()
    assert scratch.purge_orphans(tmp_path) == [theirs]
    assert not theirs.exists() and (job / "frames.bin").exists()
    (tmp_path / "lipsync-not-ours").mkdir()  # no owner file: left alone
    assert scratch.purge_orphans(tmp_path) == []
    mine.close()
    assert not mine.path.exists()


def test_worker_probes_answer_json_with_a_code():
    from lipsync.serving.probes import make_app

    state = {"ready": (False, "database unreachable for 12 s")}
    app = make_app(lambda: (True, "ok"), lambda: state["ready"])

    def get(path):
        seen = {}

        def start_response(status, headers):
            seen["status"] = status

        body = b"".join(app({"PATH_INFO": path, "REQUEST_METHOD": "GET"}, start_response))
        return seen["status"][:3], body

    status, body = get("/readyz")
    assert status == "503"
    assert json.loads(body) == {"detail": "database unreachable for 12 s", "code": "not_ready"}
    state["ready"] = (True, "ready")
    assert get("/readyz") == ("200", b'{"status": "ready"}')
    assert get("/healthz") == ("200", b'{"status": "ok"}')
    status, body = get("/metrics")
    assert status == "200" and b"lipsync_database_up" in body


def test_worker_readiness_and_liveness_follow_registration_and_the_database():
    import psycopg

    from lipsync.serving.consumer import Consumer

    s = ServeSettings(database_url="postgresql://nobody@127.0.0.1:9/none", db_outage_limit_s=60)
    health = outage.Health(s)
    c = Consumer(s, lambda attempt: None, "w", health)  # connects to nothing yet
    assert c.ready() == (False, "not registered") and c.alive() == (True, "registering")
    c.worker_id, c.last_beat = 7, time.monotonic()
    assert c.ready() == (True, "ready") and c.alive() == (True, "ok")
    health.failed(psycopg.OperationalError("connection refused"), "heartbeat")
    assert c.ready()[0] is False and "database unreachable" in c.ready()[1]
    health.ok()
    c.last_beat -= 31  # older than stalled_after_s (30): the others may take it for dead
    assert c.ready() == (False, "no heartbeat for 31 s") and c.alive()[0]
    c.last_beat -= 30  # and past db_outage_limit_s: Kubernetes restarts it
    assert c.alive() == (False, "no heartbeat for 61 s")
    c.last_beat, c.tick = time.monotonic(), time.monotonic() - 61
    assert c.alive()[0] is False and "has not turned" in c.alive()[1]
    c.stop_requested.set()
    assert c.ready() == (False, "stopping")
