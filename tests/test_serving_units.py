"""Job-service pieces that need no server: settings, storage, retry decisions, keys, logs."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from lipsync.errors import ConfigError, NoFaceError
from lipsync.serving import auth, queue
from lipsync.serving.logs import JsonFormatter, job_context
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
    policy = queue.RetryPolicy()
    assert policy.get_retry_decision(exception=queue.RetryLater("x", 1.5), job=None).retry_at
    assert policy.get_retry_decision(exception=queue.FinalFailure("x"), job=None) is None
    assert policy.get_retry_decision(exception=queue.JobCancelled("x"), job=None) is None
    assert policy.get_retry_decision(exception=queue.Released("x"), job=None) is not None


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
