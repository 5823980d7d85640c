"""By hand, at real length: PostgreSQL stopped for minutes under the job service with its
default timings (heartbeat 10 s, dead after 30 s, sweep 10 s, database retries 0.5 → 5 s,
give up after 900 s). docs/SERVING.md ("Failure model") has the results; the test suite runs the
same scenarios with short timings (tests/serving/test_outage.py).

    python tests/serving/outage_drill.py --outage 300 --out drill.json

A throw-away PostgreSQL, the API and three workers (``lipsync serve``, tiny preset on the CPU)
as subprocesses: one worker busy with a long job that outlasts the outage, one busy with a
short job that finishes during it, one idle. PostgreSQL is stopped (``pg_ctl stop -m fast``:
SIGINT) for ``--outage`` seconds, then started again. Printed, and written as JSON: what the
probes and the API answered during the outage, how long each thing took to come back, and
every job's attempts, failures and events.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: tests.support

from lipsync.tools.procs import free_ports  # noqa: E402
from tests.support.serving_stack import (  # noqa: E402
    Media,
    PostgresServer,
    Stack,
    postgres_bindir,
    submit,
)

DEFAULTS = {  # the service's own defaults, over the tests' short ones
    "LIPSYNC_HEARTBEAT_S": "10",
    "LIPSYNC_STALLED_AFTER_S": "30",
    "LIPSYNC_SWEEP_INTERVAL_S": "10",
    "LIPSYNC_POLL_INTERVAL_S": "1",
    "LIPSYNC_PROGRESS_INTERVAL_S": "0.5",
    "LIPSYNC_RETRY_BACKOFF_S": "2",
    "LIPSYNC_SHUTDOWN_GRACE_S": "30",
    "LIPSYNC_DB_TIMEOUT_S": "5",
    "LIPSYNC_DB_RETRY_S": "0.5",
    "LIPSYNC_DB_RETRY_MAX_S": "5",
}


def probe(url: str) -> int:
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.HTTPError:
        return 0


def wait(predicate, timeout: float, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(interval)
    raise TimeoutError(f"gave up after {timeout:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--outage", type=float, default=300.0, help="seconds PostgreSQL is down")
    ap.add_argument("--long-steps", type=int, default=100, help="steps of the long job")
    ap.add_argument("--out", type=Path, help="write the summary here (JSON)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="lipsync-drill-"))
    pg = PostgresServer(postgres_bindir())
    pg.start()
    stack = Stack(pg, "drill", tmp, **DEFAULTS)
    (tmp / "media").mkdir()
    media = Media(tmp / "media")
    ports = free_ports(3)
    summary: dict = {"outage_s": args.outage, "settings": DEFAULTS, "timeline": []}
    t_start = time.monotonic()

    def note(what: str, **data) -> None:
        entry = {"t": round(time.monotonic() - t_start, 1), "what": what, **data}
        summary["timeline"].append(entry)
        print(json.dumps(entry), flush=True)

    try:
        stack.start_api()
        workers = [stack.start_worker(LIPSYNC_WORKER_METRICS_PORT=str(p)) for p in ports]
        stack.wait_api(120)
        stack.wait_workers(300)
        urls = {w.pid: f"http://127.0.0.1:{p}" for w, p in zip(workers, ports, strict=True)}
        key = stack.create_key("drill", concurrency=10)
        client = stack.client(key)

        def running(job_id: str, at_least: float = 0.12):
            row = stack.job_row(job_id)
            return row if row["status"] == "running" and row["progress"] >= at_least else None

        long_id = submit(client, media.long_video, media.long_audio, steps=args.long_steps)
        long_id = long_id.json()["id"]
        long_row = wait(lambda: running(long_id), 300)
        short_id = submit(client, media.long_video, media.long_audio, steps=4).json()["id"]
        short_row = wait(lambda: running(short_id), 300)
        by_job = {r["worker"].rsplit(":", 1)[1] for r in (long_row, short_row)}
        roles = {w.pid: "idle" for w in workers}
        roles[int(long_row["worker"].rsplit(":", 1)[1])] = "busy (long job)"
        roles[int(short_row["worker"].rsplit(":", 1)[1])] = "busy (short job)"
        assert len(by_job) == 2
        before = sorted(r["id"] for r in stack.query("SELECT id FROM procrastinate_workers"))
        note("outage starts", roles={str(k): v for k, v in roles.items()},
             long_progress=long_row["progress"], short_progress=short_row["progress"])  # fmt: skip

        t_down = time.monotonic()
        pg.halt()
        samples = []
        while time.monotonic() - t_down < args.outage:
            sample = {
                "t_down": round(time.monotonic() - t_down, 1),
                "alive": [w.alive() for w in workers],
                "worker_readyz": [probe(urls[w.pid] + "/readyz") for w in workers],
                "worker_healthz": [probe(urls[w.pid] + "/healthz") for w in workers],
                "api_readyz": probe(stack.url + "/readyz"),
            }
            try:
                r = client.get(f"/v1/jobs/{long_id}", timeout=20)
                sample["api_get_job"] = [r.status_code, r.json().get("code")]
            except httpx.HTTPError as exc:
                sample["api_get_job"] = [0, type(exc).__name__]
            samples.append(sample)
            time.sleep(min(15.0, max(0.0, args.outage - (time.monotonic() - t_down))))
        summary["during_outage"] = samples
        pg.resume()
        t_up = time.monotonic()
        note("outage ends", down_s=round(t_up - t_down, 1))

        def since_up() -> float:
            return round(time.monotonic() - t_up, 1)

        back: dict = {}
        pending = {"api_readyz", "api_get_job", "short_job_recorded",
                   *(f"worker_{w.pid}_ready" for w in workers)}  # fmt: skip
        deadline = time.monotonic() + 600
        while pending and time.monotonic() < deadline:
            if "api_readyz" in pending and probe(stack.url + "/readyz") == 200:
                back["api_readyz"] = since_up()
            if "api_get_job" in pending:
                try:
                    if client.get(f"/v1/jobs/{long_id}", timeout=10).status_code == 200:
                        back["api_get_job"] = since_up()
                except httpx.HTTPError:
                    pass
            if "short_job_recorded" in pending and stack.job_row(short_id)["status"] in (
                "succeeded",
                "failed",
            ):
                back["short_job_recorded"] = since_up()
            for w in workers:
                if f"worker_{w.pid}_ready" in pending and probe(urls[w.pid] + "/readyz") == 200:
                    back[f"worker_{w.pid}_ready"] = since_up()
            pending -= back.keys()
            time.sleep(0.2)
        summary["back_after_s"] = back
        note("recovered", **back)

        stack.wait_status(long_id, ("succeeded", "failed"), timeout=3600)
        note("long job done")
        after = [submit(client, media.video, media.audio, steps=1).json()["id"] for _ in range(6)]
        for job_id in after:
            stack.wait_status(job_id, ("succeeded", "failed"), timeout=600)
        note("jobs submitted after the outage done")

        jobs = {}
        for name, job_id in [("long", long_id), ("short", short_id)] + [
            (f"after-{i}", j) for i, j in enumerate(after)
        ]:
            row = stack.job_row(job_id)
            jobs[name] = {
                "status": row["status"], "attempts": row["attempts"], "failures": row["failures"],
                "worker": row["worker"], "queue": stack.queue_status(job_id),
                "events": [e["event"] for e in row["history"]],
            }  # fmt: skip
        summary["jobs"] = jobs
        summary["workers_after"] = {
            "alive": [w.alive() for w in workers],
            "registrations_before": before,
            "registrations_after": sorted(
                r["id"] for r in stack.query("SELECT id FROM procrastinate_workers")
            ),
            "took_jobs_after": sorted({jobs[k]["worker"] for k in jobs if k.startswith("after")}),
            "registered_again": sum(w.tail(10**7).count("registering again") for w in workers),
        }
        summary["logs"] = {
            w.pid: [line for line in w.tail(10**7).splitlines()
                    if "database" in line or "giving up" in line][:12]
            for w in workers
        }  # fmt: skip
        client.close()
    finally:
        stack.close()
        pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    text = json.dumps(summary, indent=2, default=str)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
