"""Serving throughput on the GPUs of one host (issue #18): one worker per GPU, one shared queue.

For each worker count N (1, the most, then the counts between: ``--counts``, default 1, 2, 4 …
up to the GPUs present), a fresh queue of ``--jobs-per-worker`` × N jobs (default 4 × N) of the
demo clip, and N worker processes, worker k pinned to GPU k by ``CUDA_VISIBLE_DEVICES`` (as the
NVIDIA device plugin pins a pod, ``deploy/k8s/gpu-workers``). Each worker loads the model once,
runs one short warm-up job (``--warmup-frames``), says it is ready, and, once all N are ready,
takes jobs off the queue one at a time until it is empty.

What a worker does is the service worker's job path without its database: the runner is what
``lipsync.serving.worker.make_runner`` builds for ``runner=engine`` (``LipSync.from_options`` of
the load options), here with random weights (v1.6's architecture; no checkpoints on the GPU
machine), and a job is ``runner.run(video, audio, out, progress=…, **options)`` with the job
row's options and ``chunk_frames`` defaulted as ``JobExecutor`` does; the output is written to
the worker's scratch folder and removed. The queue is a SQLite file with the service's claim
semantics (one transaction takes the oldest queued job and marks it running, so no job is taken
twice); PostgreSQL, procrastinate and the HTTP API are not on the GPU machine and are not
measured. The face track comes from ``benchmarks/data/faces`` through the pipeline's face cache
(``face_cache``, not a job option of the service; there is no mediapipe on the GPU machine), so
pass 1 decodes the frames but does not detect faces.

Default settings: ``--mode fast`` (``--scheduler dpm++ --steps 6``, as gpu_realworld.py), bf16,
eager (no compile), the whole 240-frame demo per job: about 7–9 s a job on one H200 (docs/
PERFORMANCE.md), so N = 1 and 2 fit in the budget with room; ``--mode exact`` (20 DDIM steps,
about 40 s a job) needs ``--budget-s`` ~ 500 for two counts.

Measured per count: per job (worker, GPU, claim / start / end, frames, pass-1 and pass-2
seconds), per worker (process start → imported → model loaded → warm-up done = ready; load and
warm-up are reported apart from throughput), the steady jobs per hour (jobs done over the
seconds from "go" to the last job's end) and its scaling against N = 1, per GPU the NVML busy
share (sampled every 0.2 s by this process: pynvml, else nvidia-smi) over the run and while jobs
were queued, the longest stretch at 0% while jobs were queued, and each worker's idle time
while jobs were still waiting in the queue (its gaps between jobs before the queue ran empty).

``--budget-s`` (default 420) ends the whole run: a count is started only when the previous one
says it fits, workers stop taking jobs when their last job's length would pass the deadline
(jobs left queued are reported), and workers still running at the deadline are stopped.
Writes ``$OUT/serving_scaling.json`` (rewritten after each count, atomically),
``$OUT/serving_scaling.png`` (timeline per GPU with busy share; jobs per hour against N) and
``$OUT/logs/n<N>.log`` (the workers' output).

On a host with 2 H200s (Python 3.12, torch 2.11; no PyAV nor diffusers there): first, on the CPU
machine, ``python benchmarks/realworld_wheels.py`` (fills ``.whl_realworld/`` and
``.bench_media/``); then one call carrying both, about 3 minutes:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
        .whl_realworld/*.whl && export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 && \
        python3 benchmarks/gpu_serving_scaling.py --media .bench_media --out $OUT

A smoke run on a CPU (tests/benchmarks/test_gpu_serving_scaling.py): ``python
benchmarks/gpu_serving_scaling.py --device cpu --preset tiny --dtype fp32 --counts 1,2
--frames 8 --steps 1 --out /tmp/x``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

T_START = time.time()
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # common.py (also when imported)

import common  # noqa: E402

HERE = Path(__file__).resolve().parent
FACES = HERE / "data" / "faces"  # demo1_video.mp4's face track (lipsync run --face-cache)
NO_MULTICAST = {  # KINDS.md: keep NVLink multicast off on the multi-GPU hosts
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
SAMPLE_S = 0.2  # GPU busy-share sampling interval

# --------------------------------------------------------------------------- the queue

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY, video TEXT NOT NULL, audio TEXT NOT NULL, options TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'queued', claims INTEGER NOT NULL DEFAULT 0,
    worker TEXT, gpu INTEGER, t_claim REAL, t_start REAL, t_end REAL,
    frames INTEGER, stages TEXT, error TEXT);
CREATE TABLE IF NOT EXISTS workers (
    name TEXT PRIMARY KEY, gpu INTEGER, pid INTEGER, cpu_threads INTEGER, t_spawn REAL,
    t_imported REAL, t_loaded REAL, t_ready REAL, t_exit REAL, stop_reason TEXT, error TEXT);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value REAL);
"""


class JobQueue:
    """The shared queue: a SQLite file every process opens itself. :meth:`claim` takes the
    oldest queued job and marks it running in one write transaction (``BEGIN IMMEDIATE``: one
    writer at a time), as the service's claim does in PostgreSQL: no job is taken twice."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self.conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        self.conn.row_factory = sqlite3.Row

    @classmethod
    def create(cls, path, jobs: int, video: str, audio: str, options: dict) -> JobQueue:
        q = cls(path)
        q.conn.execute("PRAGMA journal_mode=WAL")
        q.conn.executescript(SCHEMA)
        q.conn.executemany(
            "INSERT INTO jobs (video, audio, options) VALUES (?, ?, ?)",
            [(video, audio, json.dumps(options))] * jobs,
        )
        return q

    def claim(self, worker: str, gpu: int | None) -> sqlite3.Row | None:
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        try:
            row = c.execute(
                "SELECT * FROM jobs WHERE status = 'queued' ORDER BY id LIMIT 1"
            ).fetchone()
            if row is not None:
                c.execute(
                    "UPDATE jobs SET status = 'running', claims = claims + 1, worker = ?, "
                    "gpu = ?, t_claim = ? WHERE id = ? AND status = 'queued'",
                    (worker, gpu, time.time(), row["id"]),
                )
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise
        return row

    def finish(self, job_id: int, **fields) -> None:
        self.update("jobs", "id", job_id, fields)

    def worker(self, name: str, **fields) -> None:
        self.conn.execute("INSERT OR IGNORE INTO workers (name) VALUES (?)", (name,))
        self.update("workers", "name", name, fields)

    def update(self, table: str, key: str, value, fields: dict) -> None:
        names = ", ".join(f"{k} = ?" for k in fields)
        self.conn.execute(f"UPDATE {table} SET {names} WHERE {key} = ?", (*fields.values(), value))

    def set_go(self, t: float) -> None:
        self.conn.execute("INSERT OR REPLACE INTO meta VALUES ('go', ?)", (t,))

    def go(self) -> float | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = 'go'").fetchone()
        return None if row is None else row[0]

    def rows(self, table: str) -> list[dict]:
        return [dict(r) for r in self.conn.execute(f"SELECT * FROM {table} ORDER BY rowid")]


# --------------------------------------------------------------------------- one worker


def worker_main(args) -> None:
    """A worker process: load once, warm up, wait for "go", then run jobs until none is left."""
    t_spawn = float(os.environ.get("LIPSYNC_T0", T_START))
    q = JobQueue(args.queue)
    name, gpu = args.worker, args.gpu
    q.worker(name, gpu=gpu, pid=os.getpid(), cpu_threads=args.cpu_threads, t_spawn=t_spawn)
    try:
        from lipsync.api import LipSync
        from lipsync.config import LoadOptions
        from lipsync.progress import Progress

        class StageClock(Progress):
            """When each stage of a job started (pass 1: frames/faces; pass 2: denoising)."""

            def __init__(self):
                self.started: dict[str, float] = {}

            def start(self, stage, total):
                self.started.setdefault(stage, time.time())

        q.worker(name, t_imported=time.time())
        load = LoadOptions(preset=args.preset, device=args.device, dtype=args.dtype,
                           compile=args.compile, cpu_threads=args.cpu_threads,
                           random_weights=True)  # fmt: skip
        runner = LipSync.from_options(load)  # what make_runner() does for runner=engine
        q.worker(name, t_loaded=time.time())
        with tempfile.TemporaryDirectory(prefix=f"lipsync-{name}-") as scratch:
            if args.warmup_audio:
                warm = json.loads(args.warmup_options)
                runner.run(args.video, args.warmup_audio, Path(scratch) / "warm.mp4", **warm)
            q.worker(name, t_ready=time.time())
            while q.go() is None:
                if time.time() > args.deadline:
                    q.worker(name, stop_reason="no go before the deadline")
                    return
                time.sleep(0.05)
            last_job_s = 0.0
            while True:
                if time.time() + last_job_s > args.deadline:
                    q.worker(name, stop_reason="budget: the next job would pass the deadline")
                    break
                row = q.claim(name, gpu)
                if row is None:
                    q.worker(name, stop_reason="queue empty")
                    break
                options = json.loads(row["options"])
                options.setdefault("chunk_frames", args.chunk_frames)  # as JobExecutor
                out = Path(scratch) / "result.mp4"
                clock = StageClock()
                t0 = time.time()
                q.finish(row["id"], t_start=t0)
                try:
                    report = runner.run(row["video"], row["audio"], out, progress=clock, **options)
                except Exception as exc:  # recorded; the worker goes on, as the service's does
                    q.finish(row["id"], status="failed", t_end=time.time(),
                             error=f"{type(exc).__name__}: {exc}"[:500])  # fmt: skip
                else:
                    stages = {k: round(v - t0, 3) for k, v in clock.started.items()}
                    stages["output_bytes"] = out.stat().st_size
                    q.finish(row["id"], status="succeeded", t_end=time.time(),
                             frames=report.frames, stages=json.dumps(stages))  # fmt: skip
                last_job_s = time.time() - t0
                out.unlink(missing_ok=True)
    except Exception as exc:
        q.worker(name, error=f"{type(exc).__name__}: {exc}"[:500])
        raise
    finally:
        q.worker(name, t_exit=time.time())


# --------------------------------------------------------------------------- GPU sampling


class GpuSampler:
    """Busy share (NVML ``utilization.gpu``) and memory of GPUs ``indices`` every ``SAMPLE_S``,
    with wall-clock stamps: pynvml (nvidia-ml-py) when importable, else ``nvidia-smi`` queries;
    nothing on a CPU run. NVML indices are PCI bus order; the workers get
    ``CUDA_DEVICE_ORDER=PCI_BUS_ID``, so worker k's GPU is NVML's k."""

    def __init__(self, indices: list[int]):
        self.indices = indices
        self.samples: list[tuple[float, int, float, float]] = []  # (unix s, gpu, busy %, MiB)
        self.source: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> GpuSampler:
        if self.indices:
            self._thread.start()
        return self

    def stop(self) -> list[tuple[float, int, float, float]]:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        return list(self.samples)

    def _run(self) -> None:
        try:
            import pynvml
        except ImportError:
            self._run_smi()
            return
        pynvml.nvmlInit()
        self.source = "nvml"
        try:
            handles = [(i, pynvml.nvmlDeviceGetHandleByIndex(i)) for i in self.indices]
            while not self._stop.wait(SAMPLE_S):
                for i, h in handles:
                    util = pynvml.nvmlDeviceGetUtilizationRates(h).gpu
                    mem = pynvml.nvmlDeviceGetMemoryInfo(h).used / 2**20
                    self.samples.append((time.time(), i, float(util), round(mem, 1)))
        finally:
            pynvml.nvmlShutdown()

    def _run_smi(self) -> None:
        exe = shutil.which("nvidia-smi")
        if exe is None:
            return
        self.source = "nvidia-smi"
        cmd = [exe, "--query-gpu=index,utilization.gpu,memory.used",
               "--format=csv,noheader,nounits"]  # fmt: skip
        while not self._stop.wait(SAMPLE_S):
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
            t = time.time()
            for line in out.splitlines():
                parts = [p.strip() for p in line.split(",")]
                if len(parts) == 3 and all(p.replace(".", "").isdigit() for p in parts):
                    if int(parts[0]) in self.indices:
                        self.samples.append((t, int(parts[0]), float(parts[1]), float(parts[2])))


# --------------------------------------------------------------------------- analysis (pure)


def idle_while_queued(intervals: list[tuple[float, float]], t_go: float, t_empty: float) -> dict:
    """A worker's time without a job between ``t_go`` and ``t_empty`` (the last claim: until
    then some job was waiting): total seconds and the gaps over 0.05 s, given its jobs'
    (claim, end) intervals."""
    gaps, t = [], t_go
    for start, end in sorted(intervals):
        if start > t:
            gaps.append((t, min(start, t_empty)))
        t = max(t, end)
    if t < t_empty:
        gaps.append((t, t_empty))
    gaps = [(a, b) for a, b in gaps if b - a > 0.05]
    return {
        "idle_s": round(sum(b - a for a, b in gaps), 3),
        "gaps": [[round(a - t_go, 3), round(b - t_go, 3)] for a, b in gaps],
    }


def gpu_busy(samples, gpu: int, start: float, end: float) -> dict:
    """NVML busy share of ``gpu`` over [start, end]: mean, share of samples at 0 %, the longest
    run of 0 % samples (seconds), peak memory (MiB)."""
    rows = [(t, u, m) for t, g, u, m in samples if g == gpu and start <= t <= end]
    if not rows:
        return {"samples": 0}
    longest, zero_from = 0.0, None
    for t, u, _ in rows:
        if u == 0:
            zero_from = t if zero_from is None else zero_from
            longest = max(longest, t - zero_from + SAMPLE_S)
        else:
            zero_from = None
    return {
        "samples": len(rows),
        "busy_share": round(sum(u for _, u, _ in rows) / len(rows) / 100, 3),
        "zero_share": round(sum(u == 0 for _, u, _ in rows) / len(rows), 3),
        "longest_zero_s": round(longest, 2),
        "peak_mem_mib": max(m for _, _, m in rows),
    }


def _since(t: float | None, t0: float | None, digits: int = 3) -> float | None:
    return None if t is None or t0 is None else round(t - t0, digits)


def summarize(n: int, jobs: list[dict], workers: list[dict], samples, t_go: float | None,
              gpus: list[int]) -> dict:  # fmt: skip
    """One count's result from the queue's rows and the GPU samples (times relative to go)."""
    done = [j for j in jobs if j["status"] == "succeeded"]
    job_rows = []
    for j in jobs:
        stages = json.loads(j["stages"]) if j["stages"] else {}
        wall = _since(j["t_end"], j["t_start"])
        job_rows.append({
            "id": j["id"], "status": j["status"], "claims": j["claims"], "worker": j["worker"],
            "gpu": j["gpu"], "claim_s": _since(j["t_claim"], t_go),
            "start_s": _since(j["t_start"], t_go), "end_s": _since(j["t_end"], t_go),
            "wall_s": wall, "frames": j["frames"],
            "fps": round(j["frames"] / wall, 2) if j["frames"] and wall else None,
            "pass2_from_s": stages.get("denoising"), "error": j["error"],
        })  # fmt: skip
    result: dict = {"workers_n": n, "jobs_queued": len(jobs), "jobs_done": len(done),
                    "jobs_failed": sum(j["status"] == "failed" for j in jobs),
                    "jobs_left_queued": sum(j["status"] == "queued" for j in jobs),
                    "jobs": job_rows}  # fmt: skip
    # until t_empty some job was waiting: the last claim, or (jobs left queued) the last end
    if result["jobs_left_queued"]:
        t_empty = max((j["t_end"] for j in jobs if j["t_end"]), default=t_go)
    else:
        t_empty = max((j["t_claim"] for j in jobs if j["t_claim"]), default=t_go)
    per_worker = []
    for w in workers:
        mine = [j for j in jobs if j["worker"] == w["name"]]
        spans = [(j["t_claim"], j["t_end"] or j["t_claim"]) for j in mine if j["t_claim"]]
        row = {
            "name": w["name"], "gpu": w["gpu"], "pid": w["pid"], "cpu_threads": w["cpu_threads"],
            "imported_s": _since(w["t_imported"], w["t_spawn"], 2),
            "loaded_s": _since(w["t_loaded"], w["t_spawn"], 2),
            "ready_s": _since(w["t_ready"], w["t_spawn"], 2),
            "load_s": _since(w["t_loaded"], w["t_imported"], 2),
            "warmup_s": _since(w["t_ready"], w["t_loaded"], 2),
            "spawn_s": _since(w["t_spawn"], t_go), "exit_s": _since(w["t_exit"], t_go),
            "jobs_done": sum(j["status"] == "succeeded" for j in mine),
            "jobs_claimed": len(mine), "busy_s": round(sum(b - a for a, b in spans), 3),
            "stop_reason": w["stop_reason"], "error": w["error"],
        }  # fmt: skip
        if t_go is not None:
            row["idle_while_queued"] = idle_while_queued(spans, t_go, t_empty)
        per_worker.append(row)
    result["workers"] = per_worker
    if t_go is None or not done:
        return result
    t_last = max(j["t_end"] for j in done)
    makespan = t_last - t_go
    frames = sum(j["frames"] for j in done)
    result.update(
        makespan_s=round(makespan, 3),
        queue_empty_s=round(t_empty - t_go, 3),
        jobs_per_hour=round(len(done) / makespan * 3600, 1),
        frames_per_s=round(frames / makespan, 2),
        mean_job_s=round(sum(j["t_end"] - j["t_start"] for j in done) / len(done), 3),
        idle_while_queued_s=round(sum(w["idle_while_queued"]["idle_s"] for w in per_worker), 3),
        ready_max_s=max((w["ready_s"] or 0) for w in per_worker),
    )
    if gpus:
        result["gpus"] = {
            str(g): {"run": gpu_busy(samples, g, t_go, t_last),
                     "while_queued": gpu_busy(samples, g, t_go, t_empty)}
            for g in gpus
        }  # fmt: skip
        result["gpu_samples"] = [[round(t - t_go, 2), g, u] for t, g, u, _ in samples]
    return result


def scaling(runs: dict[str, dict]) -> dict:
    """Jobs per hour of each count against N = 1: speed-up and efficiency (speed-up / N)."""
    base = runs.get("1", {}).get("jobs_per_hour")
    out = {}
    for key, r in sorted(runs.items(), key=lambda kv: int(kv[0])):
        jph = r.get("jobs_per_hour")
        if jph is None:
            continue
        out[key] = {"jobs_per_hour": jph}
        if base:
            out[key]["speedup"] = round(jph / base, 3)
            out[key]["efficiency"] = round(jph / base / int(key), 3)
    return out


# --------------------------------------------------------------------------- the chart


def where(gpu: int | None) -> str:
    return "CPU" if gpu is None else f"GPU {gpu}"


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {k: v for k, v in results["runs"].items() if v.get("jobs_done")}
    if not runs:
        return
    rows = [(k, w) for k, r in sorted(runs.items(), key=lambda kv: int(kv[0]))
            for w in r["workers"]]  # fmt: skip
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(15, 1.2 + 0.6 * len(rows)),
                                  gridspec_kw={"width_ratios": [3, 1]})  # fmt: skip
    colors = plt.get_cmap("tab20").colors
    for y, (key, w) in enumerate(rows):
        r = runs[key]
        if w["spawn_s"] is not None and w["ready_s"] is not None:  # loading + warm-up (< 0)
            ax.barh(y, w["ready_s"], left=w["spawn_s"], height=0.25, color="0.8")
        for j in r["jobs"]:
            if j["worker"] == w["name"] and j["start_s"] is not None and j["end_s"] is not None:
                ax.barh(y, j["end_s"] - j["claim_s"], left=j["claim_s"], height=0.6,
                        color=colors[j["id"] % 20], edgecolor="k", linewidth=0.4)  # fmt: skip
                ax.text((j["claim_s"] + j["end_s"]) / 2, y, str(j["id"]), ha="center",
                        va="center", fontsize=7)  # fmt: skip
        pts = [(t, u) for t, g, u in r.get("gpu_samples", []) if g == w["gpu"]]
        if pts:
            ax.plot([t for t, _ in pts], [y - 0.4 + 0.8 * u / 100 for _, u in pts], color="tab:red",
                    linewidth=0.7)  # fmt: skip
        ax.plot([r["queue_empty_s"]] * 2, [y - 0.45, y + 0.45], color="k", linewidth=1)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"N={k} {w['name']} ({where(w['gpu'])})" for k, w in rows])
    ax.invert_yaxis()
    ax.set_xlabel("seconds from go (grey: process start → model loaded and warmed up; "
                  "red: NVML busy %; black tick: the queue ran empty)")  # fmt: skip
    ax.set_title("jobs per worker (id on the bar)")
    counts = sorted(int(k) for k in runs)
    jph = [runs[str(n)]["jobs_per_hour"] for n in counts]
    ax2.plot(counts, jph, "o-", label="measured")
    if 1 in counts:
        ax2.plot(counts, [jph[0] * n for n in counts], "--", color="0.5", label="linear")
    ax2.set_xlabel("workers (one per GPU)")
    ax2.set_ylabel("jobs per hour (steady)")
    ax2.set_xticks(counts)
    ax2.legend()
    ax2.set_title(results.get("device_name", ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- the parent


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def run_count(args, n: int, work: Path, job: dict, deadline: float) -> dict:
    """N workers on one fresh queue of jobs_per_worker × N jobs, until done or ``deadline``."""
    run = work / f"n{n}"
    run.mkdir()
    q = JobQueue.create(run / "queue.sqlite", args.jobs_per_worker * n, job["video"],
                        job["audio"], job["options"])  # fmt: skip
    gpus = list(range(n)) if args.device == "cuda" else []
    sampler = GpuSampler(gpus).start()
    cpu_threads = args.cpu_threads or max(1, (os.cpu_count() or 1) // n)
    procs = []
    with open(args.out / "logs" / f"n{n}.log", "w") as log:
        for k in range(n):
            env = {**os.environ, **NO_MULTICAST, "PYTHONUNBUFFERED": "1", "LIPSYNC_PROGRESS": "0",
                   "LIPSYNC_T0": repr(time.time()), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}  # fmt: skip
            if args.device == "cuda":
                env["CUDA_VISIBLE_DEVICES"] = str(k)
            cmd = [sys.executable, __file__, "--worker", f"w{k}", "--queue", str(q.path),
                   "--deadline", repr(deadline - 3), "--cpu-threads", str(cpu_threads),
                   *([] if args.device == "cpu" else ["--gpu", str(k)]),
                   "--video", job["video"], "--warmup-audio", job["warmup_audio"] or "",
                   "--warmup-options", json.dumps(job["warmup_options"]),
                   *args.worker_passthrough]  # fmt: skip
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))  # fmt: skip
        # all loaded and warmed up (or some died), then go
        while time.time() < deadline:
            ready = sum(w["t_ready"] is not None for w in q.rows("workers"))
            if ready == n or any(p.poll() is not None for p in procs):
                break
            time.sleep(0.1)
        t_go = time.time()
        q.set_go(t_go)
        print(f"N={n}: go after {t_go - T_START:.1f} s of the run", flush=True)
        try:
            for p in procs:
                p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            print(f"N={n}: deadline; stopping the workers", flush=True)
        stop(procs)
    samples = sampler.stop()
    result = summarize(n, q.rows("jobs"), q.rows("workers"), samples, t_go, gpus)
    result.update(exit_codes=[p.returncode for p in procs], gpu_sampler=sampler.source,
                  cpu_threads_per_worker=cpu_threads)  # fmt: skip
    return result


def plan(counts: list[int]) -> list[int]:
    """Most telling first (the budget may cut the tail): 1, the most, then those between."""
    ends = sorted({counts[0], counts[-1]})
    return ends + [n for n in counts if n not in ends]


def default_counts(gpus: int) -> list[int]:
    counts, n = [], 1
    while n < gpus:
        counts.append(n)
        n *= 2
    return counts + [max(gpus, 1)]


def needed_s(last: dict, jobs_per_worker: int) -> float:
    """What the next count should take, from the previous one: loading, and its jobs at the
    previous mean job time, with a margin."""
    return 1.25 * (last.get("ready_max_s", 60) + jobs_per_worker * last.get("mean_job_s", 60)) + 10


def preflight(args) -> dict:
    """What the workers need, checked once: a clear line instead of N tracebacks."""
    missing = [m for m in ("av", "diffusers") if not _importable(m)]
    if missing:
        sys.exit(f"missing Python modules: {', '.join(missing)} (run "
                 "benchmarks/realworld_wheels.py here, carry .whl_realworld and install it: "
                 "see this script's docstring)")  # fmt: skip
    video = args.media / "demo1_video.mp4"
    if not video.is_file():
        sys.exit(f"no demo clip in {args.media} (run benchmarks/realworld_wheels.py, carry it)")
    from lipsync.face.cache import track_key
    from lipsync.pipeline import RunOptions

    if not (args.faces / f"{track_key(video, RunOptions().min_face_size)}.npz").is_file():
        sys.exit(f"no face track of {video} in {args.faces}: is it the demo clip, byte for byte?")
    import av
    import diffusers

    return {"av": av.__version__, "diffusers": diffusers.__version__}


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def gpu_count() -> int:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return 0
    out = subprocess.run([exe, "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                         text=True, timeout=30)  # fmt: skip
    return len(out.stdout.strip().splitlines())


def parent(args) -> None:
    versions = preflight(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "logs").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="lipsync-serving-scaling-"))
    gpus = gpu_count() if args.device == "cuda" else 0
    if args.counts:
        counts = sorted({int(c) for c in args.counts.split(",")})
    else:
        counts = default_counts(gpus) if args.device == "cuda" else [1, 2]
    if args.device == "cuda" and counts[-1] > gpus:
        sys.exit(f"--counts asks for {counts[-1]} GPUs, {gpus} present")
    video = str((args.media / "demo1_video.mp4").resolve())
    audio = str((args.media / "demo1_audio.wav").resolve())
    if args.frames:  # from 2 s in: the demo's first half second is silent
        audio = common.write_audio_clip(audio, args.frames, work / "job_audio.wav", 50)
    options = {"mode": args.mode, "scheduler": args.scheduler, "steps": args.steps, "seed": 1,
               "face_cache": str(args.faces.resolve())}  # fmt: skip
    warm = (common.write_audio_clip(audio, args.warmup_frames, work / "warm.wav",
                                    0 if args.frames else 50)
            if args.warmup_frames else None)  # fmt: skip
    job = {"video": video, "audio": audio, "options": options, "warmup_audio": warm,
           "warmup_options": options}  # fmt: skip
    results: dict = {
        "what": "serving throughput: one worker process per GPU on one shared queue of "
        f"{args.jobs_per_worker} x N demo-clip jobs (issue 18)",
        **common.machine(), "gpus_present": gpus, "versions": versions,
        "device": args.device, "preset": args.preset, "dtype": args.dtype,
        "compile": args.compile, "job_options": options, "frames_per_job": args.frames or "all",
        "warmup_frames": args.warmup_frames, "jobs_per_worker": args.jobs_per_worker,
        "counts": counts, "budget_s": args.budget_s, "runs": {}, "skipped": {},
    }  # fmt: skip
    out_json = args.out / "serving_scaling.json"
    last: dict | None = None
    for n in plan(counts):
        left = args.deadline - time.time()
        if last is not None and left < needed_s(last, args.jobs_per_worker):
            results["skipped"][str(n)] = f"budget: {left:.0f} s left"
            print(f"N={n}: skipped, {left:.0f} s left", flush=True)
            continue
        print(f"N={n}: {n} workers, {args.jobs_per_worker * n} jobs", flush=True)
        r = run_count(args, n, work, job, args.deadline)
        results["runs"][str(n)] = r
        results["scaling"] = scaling(results["runs"])
        results["elapsed_s"] = round(time.time() - T_START, 1)
        write_json(out_json, results)
        print(f"N={n}: {r['jobs_done']}/{r['jobs_queued']} jobs, "
              f"{r.get('jobs_per_hour')} jobs/h, ready after {r.get('ready_max_s')} s, "
              f"idle while queued {r.get('idle_while_queued_s')} s", flush=True)  # fmt: skip
        if r.get("jobs_done"):
            last = r
    results["done"] = True
    results["elapsed_s"] = round(time.time() - T_START, 1)
    write_json(out_json, results)
    try:
        chart(results, args.out / "serving_scaling.png")
    except Exception as exc:  # the numbers are written; a chart failure must not hide them
        print(f"chart failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results.get("scaling", {})), flush=True)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--media", type=Path, default=common.shared_media())
    p.add_argument("--faces", type=Path, default=FACES)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "serving_scaling_out")))
    p.add_argument("--counts", default=None, help="worker counts, e.g. 1,2 (default: 1, 2, 4 … "
                   "up to the GPUs present; on a CPU 1,2)")  # fmt: skip
    p.add_argument("--jobs-per-worker", type=int, default=4)
    p.add_argument("--frames", type=int, default=None, help="frames per job (default: the clip)")
    p.add_argument("--warmup-frames", type=int, default=16, help="the warm-up job (0: none)")
    p.add_argument("--preset", default="v1.6")
    p.add_argument("--device", default=None, choices=["cuda", "cpu"])
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--compile", default="none")
    p.add_argument("--mode", default="fast", choices=["fast", "exact"])
    p.add_argument("--scheduler", default=None, help="default: dpm++ (fast), ddim (exact)")
    p.add_argument("--steps", type=int, default=None, help="default: 6 (fast), 20 (exact)")
    p.add_argument("--chunk-frames", type=int, default=16, help="the service's chunk_frames")
    p.add_argument("--cpu-threads", type=int, default=None, help="torch threads per worker "
                   "(default: the host's cores / N)")  # fmt: skip
    p.add_argument("--budget-s", type=float, default=420.0, help="the whole run ends by then")
    # worker side
    p.add_argument("--worker", default=None)
    p.add_argument("--queue", default=None)
    p.add_argument("--gpu", type=int, default=None)
    p.add_argument("--video", default=None)
    p.add_argument("--warmup-audio", default=None)
    p.add_argument("--warmup-options", default="{}")
    p.add_argument("--deadline", type=float, default=None)
    args = p.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.scheduler = args.scheduler or ("dpm++" if args.mode == "fast" else "ddim")
    args.steps = args.steps or (6 if args.mode == "fast" else 20)
    if args.deadline is None:
        args.deadline = T_START + args.budget_s
    args.worker_passthrough = [
        "--preset", args.preset, "--device", args.device, "--dtype", args.dtype,
        "--compile", args.compile, "--chunk-frames", str(args.chunk_frames),
    ]  # fmt: skip
    return args


def main() -> None:
    args = parse()
    if args.worker:
        worker_main(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
