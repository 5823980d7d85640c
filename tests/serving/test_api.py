"""The job API against a real PostgreSQL, with no worker running (jobs stay queued):
authentication, isolation between keys, limits, input checks, cancelling a queued job,
idempotency, the key CLI, health / readiness / metrics and the published OpenAPI document."""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.support.serving_stack import REPO, Stack, submit

pytestmark = [pytest.mark.postgres]

MAX_UPLOAD = 2 * 1024 * 1024


@pytest.fixture(scope="module")
def stack(postgres_server, tmp_path_factory):
    s = Stack(
        postgres_server, "api_tests", tmp_path_factory.mktemp("api"),
        LIPSYNC_MAX_UPLOAD_BYTES=str(MAX_UPLOAD), LIPSYNC_MAX_DURATION_S="5",
    )  # fmt: skip
    s.start_api()
    s.wait_api()
    yield s
    s.close()


def count_jobs(stack, key_name: str | None = None) -> tuple[int, int]:
    """(our job rows, procrastinate queue entries), for one key's name or all."""
    if key_name is None:
        ours = stack.query("SELECT count(*) AS n FROM lipsync_jobs")[0]["n"]
    else:
        ours = stack.query(
            "SELECT count(*) AS n FROM lipsync_jobs j JOIN lipsync_api_keys k ON k.id = j.key_id "
            "WHERE k.name = %s",
            key_name,
        )[0]["n"]
    queued = stack.query("SELECT count(*) AS n FROM procrastinate_jobs")[0]["n"]
    return ours, queued


def test_health_ready_and_metrics(stack):
    with stack.client(None) as c:
        assert c.get("/healthz").json()["status"] == "ok"
        assert c.get("/readyz").json() == {"status": "ready"}
        text = c.get("/metrics").text
    for name in ("lipsync_queue_depth", "lipsync_jobs{", "lipsync_http_requests_total"):
        assert name in text, name


def test_missing_or_invalid_key_is_401(stack, serving_media):
    with stack.client(None) as c:
        r = c.get("/v1/jobs")
        assert r.status_code == 401 and "missing API key" in r.json()["detail"]
        assert r.headers["www-authenticate"] == "Bearer"
        r = c.get("/v1/jobs", headers={"Authorization": "Bearer lsk_not-a-real-key"})
        assert r.status_code == 401 and r.json()["detail"] == "invalid or revoked API key"
        r = c.get("/v1/jobs", headers={"X-API-Key": "nonsense"})
        assert r.status_code == 401
        before = count_jobs(stack)
        r = submit(c, serving_media.video, serving_media.audio)
        assert r.status_code == 401
        assert count_jobs(stack) == before
    good = stack.create_key("x-api-key-user")
    with stack.client(None, headers={"X-API-Key": good}) as c:
        assert c.get("/v1/jobs").status_code == 200


def test_another_keys_job_is_404_and_lists_are_private(stack, serving_media):
    alice, bob = stack.create_key("alice"), stack.create_key("bob")
    with stack.client(alice) as a, stack.client(bob) as b:
        r = submit(a, serving_media.video, serving_media.audio, steps=1)
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        assert a.get(f"/v1/jobs/{job_id}").status_code == 200
        for method, path in (
            ("GET", f"/v1/jobs/{job_id}"),
            ("GET", f"/v1/jobs/{job_id}/result"),
            ("DELETE", f"/v1/jobs/{job_id}"),
        ):
            r = b.request(method, path)
            assert r.status_code == 404, (method, path, r.text)
            assert r.json()["code"] == "not_found"
        assert b.get("/v1/jobs/not-a-uuid").status_code == 404
        assert [j["id"] for j in a.get("/v1/jobs").json()["jobs"]] == [job_id]
        assert b.get("/v1/jobs").json()["jobs"] == []
        # the owner's result is not there yet: 409, not a partial file
        r = a.get(f"/v1/jobs/{job_id}/result")
        assert r.status_code == 409 and "queued" in r.json()["detail"]


def test_concurrency_limit_is_429(stack, serving_media):
    key = stack.create_key("busy", concurrency=2)
    with stack.client(key) as c:
        ids = []
        for _ in range(2):
            r = submit(c, serving_media.video, serving_media.audio, steps=1)
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])
        r = submit(c, serving_media.video, serving_media.audio, steps=1)
        assert r.status_code == 429
        body = r.json()
        assert body["code"] == "concurrency_limit"
        assert "2 queued or running jobs (limit 2)" in body["detail"]
        assert count_jobs(stack, "busy")[0] == 2
        # a finished (here: cancelled) job frees its slot
        assert c.delete(f"/v1/jobs/{ids[0]}").status_code == 200
        assert submit(c, serving_media.video, serving_media.audio, steps=1).status_code == 201


def test_quota_is_429(stack, serving_media):
    key = stack.create_key("metered", concurrency=5, quota=1)
    with stack.client(key) as c:
        r = submit(c, serving_media.video, serving_media.audio, steps=1)
        assert r.status_code == 201
        c.delete(f"/v1/jobs/{r.json()['id']}")  # cancelled jobs still count
        r = submit(c, serving_media.video, serving_media.audio, steps=1)
        assert r.status_code == 429
        assert r.json()["code"] == "quota_exceeded"
        assert "quota of 1 jobs per 24 hours" in r.json()["detail"]
        assert r.headers["retry-after"]
    assert count_jobs(stack, "metered")[0] == 1


def test_cancel_a_queued_job(stack, serving_media):
    key = stack.create_key("canceller")
    with stack.client(key) as c:
        job = submit(c, serving_media.video, serving_media.audio, steps=1).json()
        assert job["status"] == "queued"
        assert stack.queue_status(job["id"]) == "todo"
        r = c.delete(f"/v1/jobs/{job['id']}")
        assert r.status_code == 200
        assert r.json()["status"] == "cancelled"
        assert stack.queue_status(job["id"]) == "cancelled"  # no worker will ever take it
        assert c.get(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled"
        r = c.delete(f"/v1/jobs/{job['id']}")
        assert r.status_code == 409 and "already cancelled" in r.json()["detail"]
        assert c.get(f"/v1/jobs/{job['id']}/result").status_code == 409


def test_idempotency_key_returns_the_same_job(stack, serving_media):
    key = stack.create_key("idempotent")
    with stack.client(key) as c:
        headers = {"Idempotency-Key": "order-42"}
        first = submit(c, serving_media.video, serving_media.audio, headers=headers, steps=1)
        second = submit(c, serving_media.video, serving_media.audio, headers=headers, steps=1)
        assert first.status_code == 201 and second.status_code == 200
        assert second.headers["idempotent-replayed"] == "true"
        assert first.json()["id"] == second.json()["id"]
        other = submit(c, serving_media.video, serving_media.audio, steps=1)
        assert other.json()["id"] != first.json()["id"]
    assert count_jobs(stack, "idempotent")[0] == 2
    # the same Idempotency-Key under another API key is another job
    with stack.client(stack.create_key("idempotent-2")) as c:
        third = submit(c, serving_media.video, serving_media.audio, headers=headers, steps=1)
        assert third.status_code == 201 and third.json()["id"] != first.json()["id"]


def bad_cases(m):
    """(name, files, form fields, expected status, code, words in the message)."""
    v, a = m.video, m.audio
    return [
        ("corrupt video", {"video": ("t.mp4", m.truncated, "video/mp4"), "audio": a},
         {}, 422, "bad_media", "video"),
        ("wrong content type", {"video": ("notes.txt", m.text, "text/plain"), "audio": a},
         {}, 415, "unsupported_media_type", "content type 'text/plain'"),
        ("text named .mp4", {"video": ("fake.mp4", m.text_as_mp4, "video/mp4"), "audio": a},
         {}, 422, "bad_media", "not a media file"),
        ("audio-only as video", {"video": ("s.wav", a, "audio/wav"), "audio": a},
         {}, 415, "unsupported_media_type", "video must be a video"),
        ("wav given as video", {"video": ("s.mp4", a, "video/mp4"), "audio": a},
         {}, 422, "bad_media", "no video stream"),
        ("too large", {"video": ("big.mp4", m.big, "video/mp4"), "audio": a},
         {}, 413, "too_large", "too large"),
        ("too long", {"video": ("long.mp4", m.too_long, "video/mp4")},
         {}, 413, "too_long", "6.0 s long"),
        ("no face", {"video": ("noface.mp4", m.no_face, "video/mp4"), "audio": a},
         {}, 422, "no_face", "no face found"),
        ("no video", {"audio": a}, {}, 422, "missing_video", "a video is required"),
        ("bad option", {"video": v, "audio": a}, {"steps": "0"}, 422, "bad_option", "steps"),
        ("not a number", {"video": v, "audio": a}, {"seed": "x"}, 422, "invalid_request", "seed"),
        ("too many steps", {"video": v, "audio": a}, {"steps": "1000"}, 422, "bad_option",
         "at most 100"),
        ("bucket not allowed", {"audio": a}, {"video_url": "s3://elsewhere/v.mp4"}, 403,
         "bucket_not_allowed", "elsewhere"),
    ]  # fmt: skip


def test_bad_uploads_are_refused_with_one_clear_message_and_nothing_queued(stack, serving_media):
    key = stack.create_key("careless")
    storage = stack.storage()
    uploads_before = storage.list("uploads/")
    queue_before = count_jobs(stack)[1]
    with stack.client(key) as c:
        for name, files, data, status, code, words in bad_cases(serving_media):
            parts = {}
            for field, spec in files.items():
                fname, path, ctype = spec if isinstance(spec, tuple) else (spec.name, spec, None)
                parts[field] = (fname, open(path, "rb"), ctype or "application/octet-stream")
            try:
                r = c.post("/v1/jobs", files=parts, data=data)
            finally:
                for _, f, _ in parts.values():
                    f.close()
            body = r.json()
            print(f"{name}: {r.status_code} {body}")
            assert r.status_code == status, (name, r.status_code, body)
            assert body["code"] == code, (name, body)
            assert words in body["detail"], (name, body)
            assert "\n" not in body["detail"] and "Traceback" not in body["detail"]
    assert count_jobs(stack, "careless") == (0, queue_before)
    assert storage.list("uploads/") == uploads_before


def test_request_over_the_size_limit_is_refused_before_reading_it(stack):
    key = stack.create_key("huge")
    with stack.client(key) as c:
        r = c.post(
            "/v1/jobs",
            content=b"x" * (MAX_UPLOAD + 2 * 1024 * 1024),
            headers={"Content-Type": "multipart/form-data; boundary=zzz"},
        )
    assert r.status_code == 413 and r.json()["code"] == "too_large"


BOUNDARY = "lipsyncboundary"


def part_head(name: str, filename: str, ctype: str = "video/mp4") -> bytes:
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"; '
        f'filename="{filename}"\r\nContent-Type: {ctype}\r\n\r\n'
    ).encode()


def body_bytes_read(stack) -> float:
    """The API's count of request-body bytes it has read from clients."""
    text = httpx.get(stack.url + "/metrics", timeout=10).text
    line = next(x for x in text.splitlines()
                if x.startswith("lipsync_http_request_body_bytes_total "))  # fmt: skip
    return float(line.split()[1])


def process_io(pid: int) -> dict[str, int]:
    """The kernel's I/O counters of a process (/proc/<pid>/io, every thread): ``wchar`` is
    every byte passed to write() -- files, its log, pipes; not sockets --, an upper bound on
    what it can have spooled to disk."""
    fields = Path(f"/proc/{pid}/io").read_text().split()
    return {k.rstrip(":"): int(v) for k, v in zip(fields[::2], fields[1::2], strict=True)}


def endless_chunked_upload(port: int, headers: dict, offer: int) -> tuple[int, dict, int]:
    """POST /v1/jobs with ``Transfer-Encoding: chunked`` and no Content-Length, streaming a
    video part of up to ``offer`` bytes, as fast as the server takes them, and stopping as
    soon as it answers (or closes). Returns (status, JSON body, payload bytes handed to the
    socket)."""
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(
        f"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n{head}\r\n".encode()
    )
    first = part_head("video", "big.mp4")
    sock.sendall(b"%x\r\n%s\r\n" % (len(first), first))
    block = os.urandom(64 * 1024)
    chunk = b"%x\r\n%s\r\n" % (len(block), block)
    sent, pending = 0, b""
    sock.setblocking(False)
    while sent < offer:
        readable, writable, _ = select.select([sock], [sock], [], 10)
        if readable:
            break  # an answer (or the connection closed): stop sending
        if not writable:
            break
        if not pending:
            pending = chunk
        try:
            n = sock.send(pending)
        except (BrokenPipeError, ConnectionResetError):
            break
        pending = pending[n:]
        sent += n
    sock.setblocking(True)
    sock.settimeout(120)
    if sent >= offer:  # all of it went through: end the body properly and wait for the answer
        end = f"\r\n--{BOUNDARY}--\r\n".encode()
        with contextlib.suppress(OSError):
            sock.sendall(pending + b"%x\r\n%s\r\n0\r\n\r\n" % (len(end), end))
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < int(
            re.search(rb"content-length: (\d+)", data.lower()).group(1)
        ):
            more = sock.recv(65536)
            if not more:
                break
            data += more
    sock.close()
    status = int(data.split(b" ", 2)[1])
    body = json.loads(data.split(b"\r\n\r\n", 1)[1])
    return status, body, sent


@pytest.mark.parametrize("with_key", [True, False], ids=["valid-key", "invalid-key"])
def test_chunked_oversize_upload_is_cut_at_the_limit_and_never_spooled_beyond_it(stack, with_key):
    """Without Content-Length the body is counted as it streams: 64 MiB offered against a
    2 MiB limit. A valid key: refused (413) once 2 MiB of video were read, with at most that
    on disk. An invalid key: refused (401) before a byte of the body is read."""
    offer = 64 * 1024 * 1024
    key = stack.create_key("chunky") if with_key else "lsk_not-a-real-key"
    read_before = body_bytes_read(stack)
    io_before = process_io(stack.api.pid)
    status, body, sent = endless_chunked_upload(
        stack.api_port, {"Authorization": f"Bearer {key}"}, offer
    )
    io_after = process_io(stack.api.pid)
    read = body_bytes_read(stack) - read_before
    written = io_after["wchar"] - io_before["wchar"]
    print(f"key {'valid' if with_key else 'invalid'}: {status} {body['code']}; client sent "
          f"{sent / 2**20:.2f} MiB of {offer / 2**20:.0f}; API read {read / 2**20:.2f} MiB "
          f"of body, wrote {written / 2**20:.2f} MiB to files")  # fmt: skip
    if with_key:
        assert (status, body["code"]) == (413, "too_large")
        assert MAX_UPLOAD < read <= MAX_UPLOAD + 256 * 1024
        # everything the API wrote to any file (the video so far, its log lines)
        assert written <= MAX_UPLOAD + 64 * 1024
    else:
        assert (status, body["code"]) == (401, "unauthorized")
        assert read == 0
        assert written <= 64 * 1024  # its log lines: nothing spooled
    # the server stopped reading: what got through is socket buffers, not the 64 MiB
    assert sent < MAX_UPLOAD + 16 * 1024 * 1024
    assert not [p for p in stack.tmp.glob("lipsync-api-*/upload-*")]  # nothing left behind


def test_chunked_upload_within_the_limit_is_accepted(stack, serving_media):
    """No Content-Length is not refused: a chunked body under the limit is a job like any."""
    parts = [
        part_head("video", "face.mp4") + serving_media.video.read_bytes() + b"\r\n",
        part_head("audio", "speech.wav", "audio/wav") + serving_media.audio.read_bytes() + b"\r\n",
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="steps"\r\n\r\n1\r\n'.encode(),
        f"--{BOUNDARY}--\r\n".encode(),
    ]

    def stream():
        for part in parts:  # a generator: httpx sends it chunked, without Content-Length
            yield from (part[i : i + 8192] for i in range(0, len(part), 8192))

    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    with stack.client(stack.create_key("streamer")) as c:
        r = c.post("/v1/jobs", content=stream(), headers=headers)
    assert r.status_code == 201, r.text
    assert r.json()["options"]["steps"] == 1


def test_every_error_carries_a_code(stack):
    with stack.client(None) as c:
        r = c.get("/no/such/path")
        assert (r.status_code, r.json()["code"]) == (404, "not_found")
        r = c.put("/healthz")
        assert (r.status_code, r.json()["code"]) == (405, "method_not_allowed")
        r = c.post(
            "/v1/jobs",
            content=b"{}",
            headers={"Content-Type": "application/json", "X-API-Key": stack.create_key("json")},
        )
        assert (r.status_code, r.json()["code"]) == (415, "unsupported_media_type")


def test_idempotent_race_leaves_one_job_and_no_empty_upload_folder(stack, serving_media):
    key = stack.create_key("racer", concurrency=8)
    headers = {"Idempotency-Key": "race-1"}

    def one(_):
        with stack.client(key) as c:
            return submit(c, serving_media.video, serving_media.audio, headers=headers, steps=1)

    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(one, range(4)))
    assert sorted(r.status_code for r in responses) == [200, 200, 200, 201]
    assert len({r.json()["id"] for r in responses}) == 1
    assert count_jobs(stack, "racer")[0] == 1
    uploads = stack.storage_dir / "uploads"
    empty = [d for d in uploads.iterdir() if d.is_dir() and not any(d.iterdir())]
    assert not empty, empty


def test_video_with_its_own_soundtrack_needs_no_audio(stack, serving_media):
    with stack.client(stack.create_key("one-file")) as c:
        r = submit(c, serving_media.video_with_sound, steps=1)
    assert r.status_code == 201, r.text
    row = stack.job_row(r.json()["id"])
    assert row["audio_key"] == row["video_key"]


def test_keys_cli_create_list_revoke(stack):
    env = stack.env

    def cli(*args):
        proc = subprocess.run(
            [sys.executable, "-m", "lipsync.cli", "serve", "keys", *args],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    created = json.loads(cli("create", "--name", "cli-user", "--concurrency", "3", "--quota", "9",
                             "--json"))  # fmt: skip
    secret = created["key"]
    assert secret.startswith("lsk_") and len(secret) > 40
    listed = json.loads(cli("list", "--json"))
    mine = [k for k in listed if k["name"] == "cli-user"]
    assert mine and mine[0]["max_concurrency"] == 3 and mine[0]["quota"] == 9
    assert secret not in json.dumps(listed)  # only a prefix is ever shown
    stored = stack.query("SELECT key_hash FROM lipsync_api_keys WHERE name = 'cli-user'")
    assert stored[0]["key_hash"] != secret and len(stored[0]["key_hash"]) == 64
    with stack.client(secret) as c:
        assert c.get("/v1/jobs").status_code == 200
        assert "revoked key" in cli("revoke", "cli-user")
        assert c.get("/v1/jobs").status_code == 401


def _shape(spec: dict) -> dict:
    """What the API promises, without cosmetic details that vary between FastAPI versions."""
    paths = {
        path: {
            method: {
                "parameters": sorted(p["name"] for p in op.get("parameters", [])),
                "responses": sorted(op.get("responses", {})),
                "body": sorted(op.get("requestBody", {}).get("content", {})),
            }
            for method, op in ops.items()
        }
        for path, ops in spec["paths"].items()
    }
    schemas = {
        name: sorted(s.get("properties", {}))
        for name, s in spec.get("components", {}).get("schemas", {}).items()
        if not name.startswith(("Body_", "HTTPValidationError", "ValidationError"))
    }
    return {"paths": paths, "schemas": schemas}


def test_openapi_document_is_published_and_current(stack):
    from lipsync.serving.api import openapi_spec

    with stack.client(None) as c:
        served = c.get("/openapi.json").json()
    assert "/v1/jobs" in served["paths"]
    assert {"get", "post"} <= set(served["paths"]["/v1/jobs"])
    committed = json.loads((REPO / "docs" / "openapi.json").read_text())
    assert _shape(committed) == _shape(openapi_spec()) == _shape(served), (
        "docs/openapi.json is out of date: run `lipsync serve openapi -o docs/openapi.json`"
    )
