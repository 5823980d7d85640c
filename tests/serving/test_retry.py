"""Retries: a worker whose runner raises CUDA out-of-memory while ``chunk_frames`` > 8
(tests/support/serving_runners.py) and fails some jobs on purpose. An out-of-memory attempt is
retried with half the batch and succeeds; a job that always fails ends ``failed`` with its reason
after ``max_attempts`` tries, waiting longer each time; a typed user error fails at once."""

from __future__ import annotations

from datetime import datetime

import httpx
import pytest

from tests.support.serving_runners import ALWAYS_FAIL_SEED, USER_ERROR_SEED
from tests.support.serving_stack import Stack, check_output, free_port, submit

pytestmark = [pytest.mark.postgres, pytest.mark.e2e]

BACKOFF = 0.4
MAX_ATTEMPTS = 3


@pytest.fixture(scope="module")
def stack(postgres_server, tmp_path_factory):
    metrics_port = free_port()
    s = Stack(
        postgres_server, "retry_tests", tmp_path_factory.mktemp("retry"),
        LIPSYNC_MAX_ATTEMPTS=str(MAX_ATTEMPTS), LIPSYNC_RETRY_BACKOFF_S=str(BACKOFF),
    )  # fmt: skip
    s.start_api()
    s.start_worker(
        LIPSYNC_RUNNER="tests.support.serving_runners:chaos_runner",
        LIPSYNC_WORKER_METRICS_PORT=str(metrics_port),
    )
    s.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    s.wait_api()
    s.wait_workers()
    yield s
    s.close()


def started_at(row) -> list[datetime]:
    return [datetime.fromisoformat(e["at"]) for e in row["history"] if e["event"] == "started"]


def test_cuda_oom_is_retried_with_a_smaller_batch(stack, serving_media, tmp_path):
    m = serving_media
    with stack.client(stack.create_key("oom")) as c:
        job = submit(c, m.video, m.audio, steps=1).json()
        assert job["options"]["chunk_frames"] == 16
        row = stack.wait_status(job["id"], ("succeeded", "failed"))
        assert row["status"] == "succeeded", row["error"]
        assert row["attempts"] == 2 and row["failures"] == 1
        assert row["options"]["chunk_frames"] == 8
        assert row["report"]["chunk_frames"] == 8
        retry = [e for e in row["history"] if e["event"] == "retry"]
        assert len(retry) == 1 and retry[0]["error_kind"] == "oom"
        assert "out of GPU memory with 16 frames per chunk; retrying with 8" in retry[0]["error"]
        assert row["error"] is None  # the retry's reason is gone once it succeeded
        with c.stream("GET", f"/v1/jobs/{job['id']}/result") as r:
            (tmp_path / "out.mp4").write_bytes(r.read())
        check_output(tmp_path / "out.mp4", m.frames, m.seconds)
    text = httpx.get(stack.metrics_url, timeout=5).text
    assert 'lipsync_job_retries_total{reason="oom"} 1.0' in text
    assert "lipsync_jobs_in_progress 0.0" in text


def test_always_failing_job_fails_with_its_reason_after_max_attempts_with_backoff(
    stack, serving_media
):
    with stack.client(stack.create_key("doomed")) as c:
        job = submit(c, serving_media.video, serving_media.audio, steps=1,
                     seed=ALWAYS_FAIL_SEED).json()  # fmt: skip
        row = stack.wait_status(job["id"], ("succeeded", "failed"))
        api_view = c.get(f"/v1/jobs/{job['id']}").json()
    assert row["status"] == "failed"
    assert row["attempts"] == MAX_ATTEMPTS and row["failures"] == MAX_ATTEMPTS
    assert row["error"] == f"failed after {MAX_ATTEMPTS} attempts: RuntimeError: injected failure"
    assert api_view["error"] == {"kind": "RuntimeError", "message": row["error"]}
    assert api_view["result_url"] is None
    # backoff: 0.4 s, then 0.8 s (exponential), as scheduled and observed
    delays = [e["retry_in_s"] for e in row["history"] if e["event"] == "retry"]
    assert delays == [BACKOFF, 2 * BACKOFF]
    starts = started_at(row)
    gaps = [(b - a).total_seconds() for a, b in zip(starts, starts[1:], strict=False)]
    print(f"gaps between attempts: {gaps}")
    assert gaps[0] >= BACKOFF and gaps[1] >= 2 * BACKOFF
    assert gaps[1] > gaps[0]
    stack.wait_queue_status(job["id"], "failed")
    text = httpx.get(stack.metrics_url, timeout=5).text
    assert 'lipsync_job_failures_total{reason="internal"} 1.0' in text
    assert 'lipsync_job_retries_total{reason="internal"} 2.0' in text


def test_typed_user_error_fails_at_once_without_retry(stack, serving_media):
    with stack.client(stack.create_key("user-error")) as c:
        job = submit(c, serving_media.video, serving_media.audio, steps=1,
                     seed=USER_ERROR_SEED).json()  # fmt: skip
        row = stack.wait_status(job["id"], ("succeeded", "failed"))
    assert row["status"] == "failed"
    assert row["attempts"] == 1 and row["failures"] == 1
    assert row["error_kind"] == "NoFaceError"
    # one clear line, without the worker's local paths
    assert row["error"] == "no face found in any of the frames of the video file (injected)"
    stack.wait_queue_status(job["id"], "failed")
