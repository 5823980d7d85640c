"""benchmarks/gpu_serving_scaling.py: its queue never hands a job out twice, its idle-time and
busy-share arithmetic, and the whole script on the CPU (tiny preset, 1 and 2 worker processes on
the real demo clip) with its JSON checked job by job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest

from tests.support.benchmark_scripts import load_benchmark
from tests.support.shared import MEDIA, REPO

ss = load_benchmark("gpu_serving_scaling")


def test_four_claimers_on_one_queue_take_every_job_exactly_once(tmp_path):
    path = tmp_path / "q.sqlite"
    ss.JobQueue.create(path, 120, "v.mp4", "a.wav", {"steps": 1})
    taken: dict[str, list[int]] = {}

    def claimer(name: str) -> None:
        q = ss.JobQueue(path)  # its own connection, as each worker process has
        mine = taken.setdefault(name, [])
        while (row := q.claim(name, None)) is not None:
            mine.append(row["id"])
            q.finish(row["id"], status="succeeded")

    threads = [threading.Thread(target=claimer, args=(f"w{k}",)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = sorted(i for mine in taken.values() for i in mine)
    assert ids == list(range(1, 121))
    rows = ss.JobQueue(path).rows("jobs")
    assert all(r["claims"] == 1 and r["status"] == "succeeded" for r in rows)
    assert {r["worker"] for r in rows} <= set(taken)
    assert [len(taken[r]) for r in sorted(taken)] == [
        sum(r["worker"] == name for r in rows) for name in sorted(taken)
    ]


def test_idle_while_queued_counts_gaps_until_the_queue_ran_empty():
    # go at 100; jobs 100.5-110 and 112-120; the queue ran empty (last claim) at 115
    idle = ss.idle_while_queued([(112.0, 120.0), (100.5, 110.0)], 100.0, 115.0)
    assert idle["idle_s"] == pytest.approx(2.5)
    assert idle["gaps"] == [[0.0, 0.5], [10.0, 12.0]]
    # a worker that stopped at 108 while jobs waited until 115
    assert ss.idle_while_queued([(100.0, 108.0)], 100.0, 115.0)["idle_s"] == pytest.approx(7.0)


def test_gpu_busy_share_and_the_longest_idle_stretch():
    step = ss.SAMPLE_S
    utils = [90, 0, 0, 0, 80, 100, 0, 50]
    samples = [(10 + k * step, 0, float(u), 1000.0 + k) for k, u in enumerate(utils)]
    samples += [(10 + k * step, 1, 100.0, 5.0) for k in range(8)]  # another GPU: ignored
    busy = ss.gpu_busy(samples, 0, 10.0, 20.0)
    assert busy["samples"] == 8
    assert busy["busy_share"] == pytest.approx(sum(utils) / 8 / 100, abs=1e-3)
    assert busy["zero_share"] == pytest.approx(4 / 8)
    assert busy["longest_zero_s"] == pytest.approx(3 * step)
    assert busy["peak_mem_mib"] == 1007.0
    assert ss.gpu_busy(samples, 0, 30.0, 40.0) == {"samples": 0}


@pytest.mark.slow
def test_cpu_smoke_run_serves_every_job_once_and_reports_scaling(tmp_path):
    out = tmp_path / "out"
    command = [
        sys.executable, str(REPO / "benchmarks" / "gpu_serving_scaling.py"), "--device", "cpu",
        "--preset", "tiny", "--dtype", "fp32", "--counts", "1,2", "--jobs-per-worker", "2",
        "--frames", "8", "--steps", "1", "--warmup-frames", "8", "--media", str(MEDIA),
        "--out", str(out), "--budget-s", "300",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads((out / "serving_scaling.json").read_text())
    assert report["done"] and report["skipped"] == {}
    assert sorted(os.listdir(out)) == ["logs", "serving_scaling.json", "serving_scaling.png"]
    assert sorted(os.listdir(out / "logs")) == ["n1.log", "n2.log"]
    for n in (1, 2):
        run = report["runs"][str(n)]
        jobs, workers = run["jobs"], run["workers"]
        assert run["jobs_queued"] == run["jobs_done"] == 2 * n == len(jobs)
        assert [j["id"] for j in jobs] == list(range(1, 2 * n + 1))
        for j in jobs:  # each done exactly once, by a worker of this run, in order
            assert j["status"] == "succeeded" and j["claims"] == 1 and j["frames"] == 8
            assert 0 <= j["claim_s"] <= j["start_s"] < j["end_s"] <= run["makespan_s"]
            assert j["wall_s"] == pytest.approx(j["end_s"] - j["start_s"], abs=2e-3)
        assert sorted(w["name"] for w in workers) == [f"w{k}" for k in range(n)]
        assert sum(w["jobs_done"] for w in workers) == run["jobs_done"]
        for w in workers:
            mine = sorted((j["claim_s"], j["end_s"]) for j in jobs if j["worker"] == w["name"])
            assert len(mine) == w["jobs_done"]
            assert all(a[1] <= b[0] for a, b in zip(mine, mine[1:], strict=False))  # one at a time
            assert w["spawn_s"] < 0 and 0 < w["imported_s"] <= w["loaded_s"] <= w["ready_s"]
            assert w["warmup_s"] > 0 and w["stop_reason"] == "queue empty" and w["error"] is None
            assert mine[-1][1] <= w["exit_s"]
        assert run["jobs_per_hour"] == pytest.approx(2 * n / run["makespan_s"] * 3600, rel=1e-3)
        assert run["exit_codes"] == [0] * n
    assert report["scaling"]["1"]["speedup"] == 1.0
    ratio = report["runs"]["2"]["jobs_per_hour"] / report["runs"]["1"]["jobs_per_hour"]
    assert report["scaling"]["2"]["speedup"] == pytest.approx(ratio, abs=1e-3)
