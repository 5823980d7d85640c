"""Jobs end to end: a real PostgreSQL, the API and two workers (``lipsync serve worker``, tiny
preset on the CPU) as subprocesses. Throughput, cancelling a running job, a worker stopped with
SIGTERM or killed with SIGKILL mid-job, and an API restart."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support.serving_stack import Stack, check_output, submit, wait_until

pytestmark = [pytest.mark.postgres, pytest.mark.slow, pytest.mark.e2e]


@pytest.fixture(scope="module")
def stack(postgres_server, tmp_path_factory):
    s = Stack(postgres_server, "job_tests", tmp_path_factory.mktemp("jobs"))
    s.start_api()
    s.start_worker()
    s.start_worker()
    s.wait_api()
    s.wait_workers()
    yield s
    s.close()


def download(client, job_id: str, path) -> None:
    with client.stream("GET", f"/v1/jobs/{job_id}/result") as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"] == "video/mp4"
        with open(path, "wb") as f:
            for block in r.iter_bytes():
                f.write(block)


def running_with_progress(stack, job_id: str, at_least: float):
    def check():
        row = stack.job_row(job_id)
        assert row["status"] in ("queued", "running"), row
        return row if row["status"] == "running" and row["progress"] >= at_least else None

    return wait_until(check, 60, 0.05, f"job {job_id} to be running past {at_least:.0%}")


def replace_dead_workers(stack, n: int = 2) -> None:
    alive = [w for w in stack.workers if w.alive()]
    for _ in range(n - len(alive)):
        stack.start_worker()
    stack.wait_workers()


def storage_objects(stack, job_id: str) -> list[str]:
    return [k for k in stack.storage().list() if job_id in k]


def test_twenty_concurrent_jobs_all_complete_with_valid_outputs(stack, serving_media, tmp_path):
    key = stack.create_key("many", concurrency=20)
    m = serving_media

    def one(seed: int):
        with stack.client(key) as c:
            return submit(c, m.video, m.audio, steps=1, seed=seed)

    t0 = time.monotonic()
    with ThreadPoolExecutor(10) as pool:
        responses = list(pool.map(one, range(20)))
    submitted = time.monotonic() - t0
    assert [r.status_code for r in responses] == [201] * 20, [r.text for r in responses]
    ids = [r.json()["id"] for r in responses]
    assert len(set(ids)) == 20
    rows = [stack.wait_status(i, ("succeeded", "failed"), timeout=180) for i in ids]
    elapsed = time.monotonic() - t0
    print(f"20 jobs: submitted in {submitted:.1f} s, all done in {elapsed:.1f} s")
    assert [r["status"] for r in rows] == ["succeeded"] * 20, [r["error"] for r in rows]
    assert all(r["attempts"] == 1 and r["failures"] == 0 for r in rows)
    starts = [
        (str(r["id"]), e["worker"]) for r in rows for e in r["history"] if e["event"] == "started"
    ]
    # two workers on one queue share it without duplicates: each job started exactly once
    assert sorted(job for job, _ in starts) == sorted(str(i) for i in ids), starts
    workers = {worker for _, worker in starts}
    assert len(workers) == 2, workers  # both workers took jobs
    with stack.client(key) as c:
        listed = c.get("/v1/jobs", params={"limit": 100}).json()["jobs"]
        assert {j["id"] for j in listed} == set(ids)
        for job_id in ids:
            out = tmp_path / f"{job_id}.mp4"
            download(c, job_id, out)
            check_output(out, m.frames, m.seconds)
            job = c.get(f"/v1/jobs/{job_id}").json()
            assert job["progress"] == 1.0 and job["report"]["frames"] == m.frames
    statuses = stack.query(
        "SELECT p.status, count(*) AS n FROM procrastinate_jobs p JOIN lipsync_jobs j "
        "ON j.queue_job_id = p.id WHERE j.id = ANY(%s::uuid[]) GROUP BY p.status",
        ids,
    )
    assert [(s["status"], s["n"]) for s in statuses] == [("succeeded", 20)]
    # the worker's metrics and the API's queue depth saw them
    with stack.client(None) as c:
        text = c.get("/metrics").text
    assert 'lipsync_jobs{status="succeeded"} 20.0' in text


def test_cancel_a_running_job_stops_it_between_chunks(stack, serving_media):
    key = stack.create_key("impatient")
    with stack.client(key) as c:
        job = submit(c, serving_media.long_video, serving_media.long_audio, steps=4).json()
        running_with_progress(stack, job["id"], 0.12)  # past the face pass and one chunk
        t0 = time.monotonic()
        r = c.delete(f"/v1/jobs/{job['id']}")
        assert r.status_code == 202, r.text
        assert r.json()["cancel_requested"] is True
        row = stack.wait_status(job["id"], ("cancelled", "succeeded"), timeout=30)
        print(f"running job stopped {time.monotonic() - t0:.2f} s after the cancel")
        assert row["status"] == "cancelled", row
        assert row["progress"] < 1.0
        assert c.get(f"/v1/jobs/{job['id']}/result").status_code == 409
    stack.wait_queue_status(job["id"], "aborted")
    assert not any(k.startswith("results/") for k in storage_objects(stack, job["id"]))


def test_sigterm_releases_the_running_job_to_another_worker(stack, serving_media):
    # LIPSYNC_SHUTDOWN_GRACE_S=0 here: the stopping worker releases its job at the next chunk
    key = stack.create_key("deploy")
    with stack.client(key) as c:
        job = submit(c, serving_media.long_video, serving_media.long_audio, steps=4).json()
    row = running_with_progress(stack, job["id"], 0.12)
    victim = next(w for w in stack.workers if w.alive() and row["worker"].endswith(f":{w.pid}"))
    victim.popen.send_signal(signal.SIGTERM)
    assert victim.popen.wait(timeout=30) == 0, victim.tail()
    row = stack.wait_status(job["id"], ("succeeded", "failed"), timeout=60)
    assert row["status"] == "succeeded", row
    events = [e["event"] for e in row["history"]]
    assert "released" in events, events
    assert row["attempts"] == 2 and row["failures"] == 0  # a release is not a failure
    starts = [e["worker"] for e in row["history"] if e["event"] == "started"]
    assert starts[0] != starts[1]
    replace_dead_workers(stack)


def test_kill_9_mid_job_completes_on_another_worker_with_one_result(stack, serving_media, tmp_path):
    key = stack.create_key("unlucky")
    with stack.client(key) as c:
        job = submit(c, serving_media.long_video, serving_media.long_audio, steps=4).json()
        row = running_with_progress(stack, job["id"], 0.12)
        victim = next(w for w in stack.workers if row["worker"].endswith(f":{w.pid}"))
        (scratch,) = stack.tmp.glob(f"lipsync-worker-{victim.pid}-*")
        assert list(scratch.glob("job-*")), "the job's files are in the worker's own folder"
        os.kill(victim.pid, signal.SIGKILL)
        victim.popen.wait(timeout=10)
        t0 = time.monotonic()
        row = stack.wait_status(job["id"], ("succeeded", "failed"), timeout=90)
        print(f"recovered and finished {time.monotonic() - t0:.1f} s after kill -9")
        assert row["status"] == "succeeded", row
        assert row["attempts"] == 2 and row["failures"] == 1
        events = [e["event"] for e in row["history"]]
        assert events.count("worker_lost") == 1, events
        starts = [e["worker"] for e in row["history"] if e["event"] == "started"]
        assert starts[0].endswith(f":{victim.pid}") and starts[1] != starts[0]
        out = tmp_path / "out.mp4"
        download(c, job["id"], out)
        check_output(out, 50, 2.0)
    # the killed worker's scratch folder was removed (by the other worker's sweep)
    wait_until(lambda: not scratch.exists(), 10, 0.1, "the dead worker's scratch to go")
    # exactly one result object, no temporary leftovers
    objects = storage_objects(stack, job["id"])
    assert [k for k in objects if k.startswith("results/")] == [f"results/{job['id']}.mp4"]
    assert not [k for k in stack.storage().list() if ".tmp-" in k]
    stack.wait_queue_status(job["id"], "succeeded")
    replace_dead_workers(stack)


def test_api_restart_loses_nothing(stack, serving_media, tmp_path):
    key = stack.create_key("patient")
    m = serving_media
    with stack.client(key) as c:
        done = [submit(c, m.video, m.audio, steps=1).json()["id"] for _ in range(2)]
        for job_id in done:
            stack.wait_status(job_id, "succeeded")
        pending = submit(c, m.video, m.audio, steps=1).json()["id"]
    # SIGTERM: uvicorn shuts down cleanly (and re-raises the signal, so the status is -15)
    assert stack.api.stop() in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in stack.api.tail()
    # the workers carry on without the API
    stack.wait_status(pending, "succeeded")
    stack.start_api()
    stack.wait_api()
    with stack.client(key) as c:
        listed = {j["id"]: j for j in c.get("/v1/jobs").json()["jobs"]}
        assert set(listed) == {*done, pending}
        for job_id in [*done, pending]:
            assert listed[job_id]["status"] == "succeeded"
            download(c, job_id, tmp_path / "r.mp4")
            check_output(tmp_path / "r.mp4", m.frames, m.seconds)
        again = submit(c, m.video, m.audio, steps=1)
        assert again.status_code == 201
        assert stack.wait_status(again.json()["id"], "succeeded")["status"] == "succeeded"


def test_worker_declared_stalled_registers_again_instead_of_crashing(stack, serving_media):
    """A heartbeat late by more than stalled_after_s (a starved CPU) gets a worker's
    registration pruned by another worker; its next fetch must not crash it."""
    replace_dead_workers(stack)
    before = [w for w in stack.workers if w.alive()]
    pruned = stack.query(
        "DELETE FROM procrastinate_workers RETURNING id"
    )  # as prune_stalled_workers
    assert len(pruned) == 2
    key = stack.create_key("after-prune")
    with stack.client(key) as c:
        job = submit(c, serving_media.video, serving_media.audio, steps=1).json()
        row = stack.wait_status(job["id"], ("succeeded", "failed"), timeout=90)
    assert row["status"] == "succeeded", row
    assert all(w.alive() for w in before), [w.tail() for w in before if not w.alive()]
    assert any("registering again" in w.tail(20000) for w in before)
    stack.wait_workers()  # both registered (heartbeating) again
