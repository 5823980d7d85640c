"""PostgreSQL outages: a real server stopped (``pg_ctl stop -m fast``: every connection cut)
and started again on the same data, under the API and two workers, with jobs running and not.

Jobs must neither be lost nor stuck nor run twice, workers must neither exit nor stay alive
unregistered (a zombie), and readiness must say what is going on. The timeouts are short here
(heartbeat 0.5 s, dead after 4 s, database retries 0.2 → 1 s, connection timeouts 2 s), so
the "long" outage (15 s) outlasts every timeout and backoff several times over, as 5 minutes
do with the defaults; docs/SERVING.md ("Failure model") has the same at real length, by hand.

This module runs its own PostgreSQL server (the session's one stays up for the others).
"""

from __future__ import annotations

import time

import httpx
import pytest

from lipsync.tools.procs import free_ports
from tests.support.serving_stack import (
    PostgresServer,
    Stack,
    postgres_bindir,
    submit,
    wait_until,
)

pytestmark = [pytest.mark.postgres, pytest.mark.slow, pytest.mark.e2e]

LONG_OUTAGE_S = 15.0
SHORT_OUTAGE_S = 1.0


@pytest.fixture(scope="module")
def pg():
    server = PostgresServer(postgres_bindir())
    server.start()
    yield server
    server.stop()


def test_a_connection_that_died_while_idle_is_replaced_at_once(pg):
    """After PostgreSQL restarted, a worker's idle connection fails on its next use: that is
    not an outage, and the call goes through on a fresh connection; while the server is down
    it is one (the caller waits and tries again, lipsync.serving.outage)."""
    import psycopg

    from lipsync.serving import db

    url = pg.create_database("outage_link")
    link = db.Link(url, timeout_s=2)
    pid = link.run(lambda c: c.execute("SELECT pg_backend_pid() AS p").fetchone()["p"])
    pg.halt()
    with pytest.raises(psycopg.OperationalError):
        link.run(lambda c: c.execute("SELECT 1"))
    pg.resume()
    assert link.run(lambda c: c.execute("SELECT 1 AS one").fetchone()["one"]) == 1
    # a connection opened before a restart, used after it
    old = link.connection()
    pg.halt()
    pg.resume()
    again = link.run(lambda c: c.execute("SELECT pg_backend_pid() AS p").fetchone()["p"])
    assert link.connection() is not old and again != pid and link.fresh
    link.close()


class Probed:
    """A worker with its probes / metrics port."""

    def __init__(self, stack: Stack, **env: str):
        (self.port,) = free_ports(1)
        self.proc = stack.start_worker(LIPSYNC_WORKER_METRICS_PORT=str(self.port), **env)

    def probe(self, path: str) -> int:
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}{path}", timeout=2).status_code
        except httpx.HTTPError:
            return 0


@pytest.fixture(scope="module")
def stack(pg, tmp_path_factory):
    s = Stack(pg, "outage_tests", tmp_path_factory.mktemp("outage"))
    s.start_api()
    s.probed = [Probed(s), Probed(s)]
    s.wait_api()
    s.wait_workers()
    yield s
    s.close()


def long_job(stack, client, steps: int = 4) -> dict:
    """A job that runs for several seconds, once it is past its first chunk."""
    job = submit(client, stack.media.long_video, stack.media.long_audio, steps=steps).json()

    def running():
        row = stack.job_row(job["id"])
        assert row["status"] in ("queued", "running"), row
        return row if row["status"] == "running" and row["progress"] >= 0.12 else None

    return wait_until(running, 90, 0.05, f"job {job['id']} to be past its first chunk")


def busy_and_idle(stack, row) -> tuple[Probed, Probed]:
    busy = next(p for p in stack.probed if row["worker"].endswith(f":{p.proc.pid}"))
    idle = next(p for p in stack.probed if p is not busy)
    return busy, idle


def registered(stack) -> set[int]:
    return {r["id"] for r in stack.query("SELECT id FROM procrastinate_workers")}


def assert_ran_once(row) -> None:
    assert row["status"] == "succeeded", row
    assert row["attempts"] == 1 and row["failures"] == 0, row
    events = [e["event"] for e in row["history"]]
    assert events.count("started") == 1 and "worker_lost" not in events, events


def outage(stack, pg, seconds: float, during=None) -> float:
    """Stop PostgreSQL for ``seconds``, calling ``during()`` while it is down; returns how long
    it really was down."""
    t0 = time.monotonic()
    pg.halt()
    if during is not None:
        during()
    time.sleep(max(0.0, seconds - (time.monotonic() - t0)))
    pg.resume()
    return time.monotonic() - t0


@pytest.mark.parametrize("seconds", [SHORT_OUTAGE_S, LONG_OUTAGE_S], ids=["short", "long"])
def test_outage_during_a_busy_and_an_idle_worker_loses_repeats_and_strands_nothing(
    stack, pg, serving_media, seconds
):
    stack.media = serving_media
    key = stack.create_key(f"outage-{seconds:g}")
    before = registered(stack)
    assert len(before) == 2
    with stack.client(key) as c:
        row = long_job(stack, c)
        busy, idle = busy_and_idle(stack, row)
        seen: dict[str, object] = {}

        def during():
            if seconds < 5:
                return
            # readiness says what is going on; nothing exits
            wait_until(lambda: busy.probe("/readyz") == 503 and idle.probe("/readyz") == 503,
                       8, 0.1, "both workers to report not ready")  # fmt: skip
            seen["live"] = (busy.probe("/healthz"), idle.probe("/healthz"))
            seen["api"] = c.get("/readyz")
            seen["job"] = c.get(f"/v1/jobs/{row['id']}")

        down = outage(stack, pg, seconds, during)
        t_back = time.monotonic()
        done = stack.wait_status(row["id"], ("succeeded", "failed"), timeout=120)
        print(f"outage {down:.1f} s; job done {time.monotonic() - t_back:.1f} s after")
        assert_ran_once(done)
        if seconds >= 5:
            assert seen["live"] == (200, 200)
            assert seen["api"].status_code == 503 and seen["api"].json()["code"] == "not_ready"
            assert seen["job"].status_code == 503, seen["job"].text
            assert seen["job"].json()["code"] == "unavailable"
        # both workers came back: registered (the same registrations: nobody was taken for
        # dead), ready, and taking jobs
        for p in (busy, idle):
            assert p.proc.alive(), p.proc.tail()
        wait_until(lambda: busy.probe("/readyz") == 200 and idle.probe("/readyz") == 200,
                   15, 0.1, "both workers to be ready again")  # fmt: skip
        assert registered(stack) == before  # no zombie: alive and still registered
        for p in (busy, idle):
            text = httpx.get(f"http://127.0.0.1:{p.port}/metrics", timeout=5).text
            assert "lipsync_worker_registered 1.0" in text and "lipsync_database_up 1.0" in text
        after = [submit(c, serving_media.video, serving_media.audio, steps=1).json()["id"]
                 for _ in range(4)]  # fmt: skip
        rows = [stack.wait_status(j, ("succeeded", "failed"), timeout=90) for j in after]
        assert [r["status"] for r in rows] == ["succeeded"] * 4
        assert len({r["worker"] for r in rows}) == 2, "both workers take jobs again"
        assert c.get(f"/v1/jobs/{row['id']}").json()["status"] == "succeeded"
    stack.wait_queue_status(row["id"], "succeeded")
    logs = "".join(p.proc.tail(200000) for p in stack.probed)
    assert "registering again" not in logs
    if seconds >= 5:
        assert "database unreachable" in logs and "database reachable again" in logs


def test_a_worker_that_cannot_get_the_database_back_exits_and_its_job_is_recovered(
    pg, serving_media, tmp_path
):
    """Past LIPSYNC_DB_OUTAGE_LIMIT_S (3 s here) a worker gives up: exit code 3 and one line,
    no zombie. Its job is recovered by the next worker's sweep once the database is back
    (counted as a lost worker), and its scratch folder is removed by that worker."""
    s = Stack(pg, "outage_give_up", tmp_path, LIPSYNC_DB_OUTAGE_LIMIT_S="3")
    try:
        s.start_api()
        quitter = Probed(s)
        s.wait_api()
        s.wait_workers()
        s.media = serving_media
        with s.client(s.create_key("patient")) as c:
            row = long_job(s, c)
            (scratch,) = tmp_path.glob("lipsync-worker-*")
            assert list(scratch.glob("job-*")), "the job's files are in the worker's folder"
            t0 = time.monotonic()
            pg.halt()
            code = quitter.proc.popen.wait(timeout=60)
            gave_up_after = time.monotonic() - t0
            pg.resume()
            s.workers.remove(quitter.proc)
            print(f"worker exited {code} after {gave_up_after:.1f} s without the database")
            assert code == 3, quitter.proc.tail()
            assert "the database has been unreachable for" in quitter.proc.tail()
            assert scratch.exists()  # a killed process cannot clean up after itself
            Probed(s)  # its replacement
            done = s.wait_status(row["id"], ("succeeded", "failed"), timeout=120)
            assert done["status"] == "succeeded", done
            assert done["attempts"] == 2 and done["failures"] == 1, done
            assert [e["event"] for e in done["history"]].count("worker_lost") == 1
            assert c.get(f"/v1/jobs/{row['id']}").json()["status"] == "succeeded"
        assert not scratch.exists(), "the replacement removed the dead worker's scratch folder"
        s.wait_queue_status(row["id"], "succeeded")
    finally:
        s.close()


def test_a_job_whose_queue_entry_ended_under_it_is_put_back(stack, serving_media):
    """The state issue #20 found after a 20-30 s outage (the row ``running`` with its lease,
    its queue entry ``failed``: nothing would ever run it), and a ``queued`` row whose entry
    ended: the sweep gives each a new queue entry, and they complete."""
    with stack.client(stack.create_key("orphans")) as c:
        ids = [submit(c, serving_media.video, serving_media.audio, steps=1).json()["id"]
               for _ in range(2)]  # fmt: skip
        for job_id in ids:
            stack.wait_status(job_id, "succeeded")
            stack.wait_queue_status(job_id, "succeeded")
        running, queued = ids
        old = {j: stack.job_row(j)["queue_job_id"] for j in ids}
        stack.query(
            "UPDATE lipsync_jobs SET status = 'running', lease = 'lost', result_key = NULL, "
            "finished_at = NULL WHERE id = %s RETURNING id", running,
        )  # fmt: skip
        stack.query(
            "UPDATE procrastinate_jobs SET status = 'failed' WHERE id = %s RETURNING id",
            old[running],
        )
        stack.query(
            "UPDATE lipsync_jobs SET status = 'queued', lease = NULL, result_key = NULL, "
            "finished_at = NULL WHERE id = %s RETURNING id", queued,
        )  # fmt: skip
        rows = {j: stack.wait_status(j, "succeeded", timeout=60) for j in ids}
        for job_id, row in rows.items():
            assert row["queue_job_id"] != old[job_id]
            events = [e for e in row["history"] if e["event"] == "requeued"]
            assert len(events) == 1 and events[0]["error_kind"] == "outcome_lost", row
            assert c.get(f"/v1/jobs/{job_id}/result").status_code == 200
            stack.wait_queue_status(job_id, "succeeded")
        assert (rows[running]["attempts"], rows[running]["failures"]) == (2, 1)
        assert (rows[queued]["attempts"], rows[queued]["failures"]) == (2, 0)
