"""The quality protocol (issue 16): every option against the baseline, 3 seeds each, one GPU call.

    python -m lipsync.eval.protocol run --pack .pack --teacher TEACHER --syncnet SYNCNET \\
        --out $OUT                            # one host of 2 H200s, about 9 minutes
    python -m lipsync.eval.protocol run ... --smoke --device cpu      # CPU, tiny, seconds
    python -m lipsync.eval.protocol table $OUT/results.jsonl          # Markdown for QUALITY.md

One protocol for every option: the same data (the pack's first ``train_minutes`` of training
footage), the same training budget (``steps`` fine-tuning steps of ``batch`` windows from the
teacher bundle, stage-2 objective: noise MSE + SyncNet loss), the same seeds (seed s gives every
arm the same windows, timesteps and noise); only the option differs. Metrics on the held-out
test split (:mod:`lipsync.eval.protocol_jobs`, docs/QUALITY.md), mean ± std over seeds, and
whether each difference to the baseline exceeds the seed spread
(:mod:`lipsync.eval.protocol_report`).

Phases (each job is a process; the jobs of a phase run in parallel, spread over the visible GPUs:
each new job goes to the GPU running the fewest; ``gpus`` names them explicitly). On one H200 the
12 arm jobs, the reference and the student ran out of its 141 GB at once (2026-11-29):
use a host of two.

1. prepare (this process): decode the pack, teacher features and latents, saved for the jobs;
2. judges (``judge_seconds``): the lip reader, the phone head's starting point, the tiny video
   encoder, all trained on ground-truth training footage only;
3. arms × seeds + the reference (teacher, ground truth) + the student: with ``steps`` 0 the
   step budget is calibrated: every arm times ``calib_steps`` steps while all run, and the
   runner sets the steps so the slowest arm ends its training ``train_seconds`` after the phase
   began; then each arm evaluates itself in place; the student trains for ``train_seconds``;
4. benchmark, alone on the GPU: frames/s of teacher, student and fast modes; the quality of the
   fast mode as fast as the student;
5. results: ``results.jsonl`` (one line per arm × seed and per reference row), ``results.md``,
   ``results.png``, ``summary.json`` (statistics, timings, failures with their log tails) and the
   student bundle (``student/``) in ``--out``: at most 8 files, each under 15 MiB.

Jobs that overrun the call's budget are stopped (by their process id) and reported; what
finished is kept. Resumable in the sense that matters here: ``table`` rebuilds the tables from
``results.jsonl`` alone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import typer

from lipsync.errors import ConfigError, LipSyncError, run_reporting_errors
from lipsync.eval.protocol_jobs import (
    ARMS,
    Job,
    prepare,
    run_job,
    work_paths,
    write_json,
    write_random_teacher,
)
from lipsync.eval.protocol_report import chart, markdown, read_results, summarise
from lipsync.train.config import CtcUnits, from_dict
from lipsync.train.distill import StudentWeighting

MAX_FILES = 8
MAX_FILE_BYTES = 15 * 2**20


@dataclass
class ProtocolConfig:
    pack: str = ".pack"
    teacher: str = ""  # the teacher's bundle folder
    syncnet: str = ""  # our SyncNet (lipsync train syncnet / gpu_syncnet_train.py output)
    out: str = "quality-out"
    work: str = "/tmp/lipsync-quality"
    device: str | None = None
    arms: list[str] = field(default_factory=lambda: ["baseline", "phone_ctc", "mouth_trepa",
                                                     "dyncond"])  # fmt: skip
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    student: bool = True
    # data and training budget (identical for every arm)
    train_minutes: float = 4.0
    steps: int = 0  # 0: calibrated from train_seconds
    batch: int = 4
    lr: float = 2e-5
    warmup: int = 10
    sync_weight: float = 0.05
    gradient_checkpointing: bool = True
    calib_steps: int = 3
    calib_wait_seconds: float = 180.0
    # the options
    ctc_weight: float = 0.05
    ctc_units: CtcUnits = "phone"
    trepa_weight: float = 1.0
    mouth_weight: float = 4.0
    trepa_delta: float = 1.0
    dyncond_per_region: bool = True
    # judges
    judge_seconds: float = 50.0
    judge_batch: int = 8
    # student
    student_steps: int = 4
    student_batch: int = 4
    student_lr: float = 2e-5
    student_weighting: StudentWeighting = "x0"
    student_dub_share: float = 0.5
    student_max_steps: int = 0  # 0: until train_seconds
    student_from: str | None = None  # a student bundle distilled before: evaluate it instead
    # evaluation
    eval_segments: int = 10
    eval_frames: int = 96
    eval_steps: int = 20
    eval_guidance: float = 1.5
    eval_batch_chunks: int = 8  # 24 (384 frames through the VAE at once) ran out of memory
    fast_steps: list[int] = field(default_factory=lambda: [4, 6, 8])
    bench_reps: int = 3
    # wall time of the whole call and its phases (seconds)
    total_seconds: float = 510.0
    train_seconds: float = 180.0
    bench_seconds: float = 60.0
    parallel: int = 0  # most jobs at once (0: all of a phase)
    # spread jobs over these (CUDA_VISIBLE_DEVICES values); empty: every visible GPU when several
    gpus: list[str] = field(default_factory=list)

    def validate(self) -> None:
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown:
            raise ConfigError(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
        if "baseline" not in self.arms:
            raise ConfigError("the arms must include the baseline (every option is compared to it)")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds must be distinct and not empty, got {self.seeds}")
        for name in ("teacher", "syncnet"):
            if not getattr(self, name):
                raise ConfigError(f"--{name} is required")
        if not Path(self.teacher, "manifest.json").is_file():
            raise ConfigError(f"--teacher {self.teacher} is not a bundle folder (no manifest.json)")
        if not Path(self.syncnet).is_file():
            raise ConfigError(f"--syncnet {self.syncnet} not found")
        if not Path(self.pack, "pack.json").is_file():
            raise ConfigError(f"--pack {self.pack} is not a training pack (no pack.json)")
        if self.steps == 0 and self.parallel:
            raise ConfigError(
                "a calibrated step budget (steps 0) needs every arm at once (parallel 0)"
            )
        if self.student_from and not Path(self.student_from, "manifest.json").is_file():
            raise ConfigError(f"student_from {self.student_from} is not a bundle folder")
        if self.student_steps < 1 or self.eval_steps % self.student_steps:
            raise ConfigError("the student's steps must divide the teacher's (eval_steps)")


SMOKE = {
    "train_minutes": 0.2, "steps": 2, "batch": 1, "warmup": 1, "gradient_checkpointing": False,
    "judge_seconds": 2.0, "judge_batch": 2, "student_batch": 1, "student_max_steps": 2,
    "eval_segments": 2, "eval_frames": 48, "eval_steps": 2, "student_steps": 1,
    "eval_batch_chunks": 3, "fast_steps": [2], "bench_reps": 1, "total_seconds": 3600.0,
    "train_seconds": 5.0, "bench_seconds": 300.0, "parallel": 2, "seeds": [0, 1],
}  # fmt: skip


class Runner:
    """Starts jobs as processes (``python -m lipsync.eval.protocol worker``), at most
    ``parallel`` at once, each with its log; collects their result files."""

    def __init__(self, cfg: ProtocolConfig, log=print):
        self.cfg = cfg
        self.paths = work_paths(Path(cfg.work))
        self.log = log
        self.procs: dict[str, tuple[subprocess.Popen, Any]] = {}
        self.failures: dict[str, str] = {}
        self.gpu_of: dict[str, str] = {}  # job -> the GPU it was given (with ``gpus``)
        self.config_file = Path(cfg.work) / "config.json"
        write_json(self.config_file, asdict(cfg))

    def start(self, job: Job) -> None:
        spec = Path(self.cfg.work) / "jobs" / f"{job.name}.json"
        write_json(spec, asdict(job))
        self.paths["logs"].mkdir(parents=True, exist_ok=True)
        logf = open(self.paths["logs"] / f"{job.name}.log", "w")  # noqa: SIM115 - kept open
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "LIPSYNC_PROGRESS": "0",
               "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}  # fmt: skip
        if (self.cfg.device or "").startswith("cpu"):
            env.setdefault("OMP_NUM_THREADS", "1")
        gpu = self.pick_gpu()
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
            self.gpu_of[job.name] = gpu
        proc = subprocess.Popen(
            [sys.executable, "-m", "lipsync.eval.protocol", "worker", str(self.config_file),
             str(spec)],
            stdout=logf, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
        self.procs[job.name] = (proc, logf)

    def pick_gpu(self) -> str | None:
        """With ``gpus``: the one running the fewest jobs now (ties: the first listed)."""
        if not self.cfg.gpus:
            return None
        busy = [self.gpu_of.get(n) for n in self.running()]
        return min(self.cfg.gpus, key=lambda g: busy.count(g))

    def running(self) -> list[str]:
        return [n for n, (p, _) in self.procs.items() if p.poll() is None]

    def run_all(self, jobs: list[Job], deadline: float, on_tick=None) -> None:
        """Run ``jobs`` (respecting ``parallel``) until all end or ``deadline``; stragglers are
        stopped by their process id."""
        queue = list(jobs)
        limit = self.cfg.parallel or len(jobs)
        names = {j.name for j in jobs}
        while True:
            while queue and len([n for n in self.running() if n in names]) < limit:
                self.start(queue.pop(0))
            if on_tick is not None:
                on_tick()
            if not queue and not [n for n in self.running() if n in names]:
                break
            if time.time() >= deadline:
                for name in self.running():
                    if name in names:
                        self.stop(name, "stopped at the call's time budget")
                for job in queue:
                    self.failures[job.name] = "not started: out of time"
                break
            time.sleep(0.5)
        for name in names:
            if name in self.procs:
                proc, logf = self.procs[name]
                logf.close()
                if proc.returncode not in (0, None) and name not in self.failures:
                    self.failures[name] = f"exit code {proc.returncode}: " + self.tail(name)

    def stop(self, name: str, why: str) -> None:
        proc, _ = self.procs[name]
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self.failures[name] = f"{why}: " + self.tail(name)

    def tail(self, name: str, chars: int = 600) -> str:
        path = self.paths["logs"] / f"{name}.log"
        text = path.read_text(errors="replace") if path.is_file() else ""
        return text[-chars:].strip()


def _calibrate(runner: Runner, arm_names: list[str], phase_start: float) -> None:
    """Once every arm has timed its calibration steps, set the common step budget."""
    cfg, paths = runner.cfg, runner.paths
    if cfg.steps or paths["steps"].is_file():
        return
    files = [paths["calib"] / f"{n}.json" for n in arm_names]
    alive = set(runner.running())
    waiting = [n for n, f in zip(arm_names, files, strict=True) if not f.is_file() and n in alive]
    if waiting:
        return
    times = [json.loads(f.read_text()) for f in files if f.is_file()]
    if not times:
        write_json(paths["steps"], {"steps": cfg.calib_steps + 1, "why": "no arm calibrated"})
        return
    slowest = max(t["step_s"] for t in times)
    done = max(t["done"] for t in times)
    left = phase_start + cfg.train_seconds - time.time()
    steps = done + max(0, int(left / slowest))
    write_json(paths["steps"], {"steps": steps, "slowest_step_s": slowest, "left_s": left})
    runner.log(f"step budget: {steps} steps (slowest arm {slowest:.2f} s/step, {left:.0f} s left)")


def visible_gpus(device: str | None) -> list[str]:
    """The CUDA_VISIBLE_DEVICES values of the GPUs this process sees, when it sees several and
    runs on CUDA; else [] (every job on the default device)."""
    import torch

    if not (device or "cuda").startswith("cuda") or not torch.cuda.is_available():
        return []
    count = torch.cuda.device_count()
    listed = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    ids = listed[:count] if listed else [str(i) for i in range(count)]
    return ids if len(ids) > 1 else []


def run_protocol(cfg: ProtocolConfig, log=print) -> dict[str, Any]:
    """The whole protocol (module docstring); returns the summary written to ``out``."""
    cfg.validate()
    if not cfg.gpus:
        cfg.gpus = visible_gpus(cfg.device)
    start = time.time()
    end = start + cfg.total_seconds
    work = Path(cfg.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    runner = Runner(cfg, log)
    timings: dict[str, float] = {}
    info = prepare(cfg, log)
    timings["prepare"] = round(time.time() - start, 1)

    t = time.time()
    judges = ["lipreader"]
    if "phone_ctc" in cfg.arms:
        judges.append("ctc_head")
    if any(a in cfg.arms for a in ("mouth_trepa", "trepa_uniform")):
        judges.append("video")
    deadline = t + cfg.judge_seconds
    runner.run_all([Job(j, j, deadline=deadline) for j in judges],
                   min(end, deadline + 120))  # fmt: skip
    timings["judges"] = round(time.time() - t, 1)
    if "lipreader" in runner.failures:
        raise LipSyncError(f"the lip reader did not train: {runner.failures['lipreader']}")

    t = time.time()
    arm_jobs = [Job("arm", f"{a}-s{s}", a, s) for a in cfg.arms for s in cfg.seeds]
    jobs = [*arm_jobs, Job("reference", "reference")]
    if cfg.student:
        jobs.append(Job("student", "student", seed=cfg.seeds[0], deadline=t + cfg.train_seconds))
    names = [j.name for j in arm_jobs]
    runner.run_all(jobs, end - cfg.bench_seconds, on_tick=lambda: _calibrate(runner, names, t))
    timings["arms"] = round(time.time() - t, 1)

    t = time.time()
    runner.run_all([Job("benchmark", "benchmark")], end - 10)
    timings["benchmark"] = round(time.time() - t, 1)

    records = collect(runner, [*jobs, Job("benchmark", "benchmark")])
    summary = write_results(cfg, records, out, info, timings, runner.failures, start)
    log(f"results in {out} ({round(time.time() - start)} s)")
    return summary


def collect(runner: Runner, jobs: list[Job]) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    for job in jobs:
        path = runner.paths["results"] / f"{job.name}.json"
        if not path.is_file():
            runner.failures.setdefault(job.name, "no result: " + runner.tail(job.name))
            continue
        data = json.loads(path.read_text())
        records.extend(data if isinstance(data, list) else [data])
    return records


def write_results(cfg: ProtocolConfig, records: list[dict[str, Any]], out: Path,
                  info: dict[str, Any], timings: dict[str, float], failures: dict[str, str],
                  start: float) -> dict[str, Any]:  # fmt: skip
    """results.jsonl, summary.json, results.md, results.png and the student bundle in ``out``."""
    import torch

    tmp = out / "results.jsonl.part"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, out / "results.jsonl")
    summary = summarise(records)
    bench = next((r for r in records if r.get("kind") == "benchmark"), None)
    if bench:
        summary["benchmark"] = bench
    steps = sorted({r.get("steps") for r in records if r.get("kind") == "arm"})
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() and
        (cfg.device or "cuda").startswith("cuda") else "CPU",
        "steps": "/".join(str(s) for s in steps) or "?",
        "batch": cfg.batch,
        "seeds": ", ".join(str(s) for s in cfg.seeds),
        "eval": f"{cfg.eval_segments} test segments × {cfg.eval_frames} frames, DDIM "
                f"{cfg.eval_steps} steps, guidance {cfg.eval_guidance}",
    }  # fmt: skip
    summary.update(meta=meta, config=asdict(cfg), prepared=info, timings=timings,
                   failures=failures, wall_seconds=round(time.time() - start, 1))  # fmt: skip
    write_json(out / "summary.json", summary)
    (out / "results.md").write_text(markdown(summary, meta) + "\n")
    if summary["arms"]:
        chart(summary, records, out / "results.png")
    student = work_paths(Path(cfg.work))["student"]
    if (student / "manifest.json").is_file():
        files = [p for p in student.iterdir() if p.is_file() and not p.name.endswith(".part")]
        taken = len([p for p in out.iterdir() if p.is_file()])
        if taken + len(files) <= MAX_FILES and all(
            p.stat().st_size <= MAX_FILE_BYTES for p in files
        ):
            dest = out / "student"
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(student, dest)
        else:
            summary["student_bundle"] = "not copied: over the 8-file / 15 MiB return limit"
            write_json(out / "summary.json", summary)
    return summary


# --------------------------------------------------------------------------- command line

app = typer.Typer(no_args_is_help=True, help="The quality protocol (see the module docstring).")


@app.command("run")
def run_command(
    pack: Path = typer.Option(..., help="Training pack (demo_recipe pack)."),
    teacher: Path = typer.Option(..., help="The teacher's bundle folder (demo_recipe unet2)."),
    syncnet: Path = typer.Option(..., help="Our SyncNet file (loss and judge)."),
    out: Path = typer.Option(..., help="Results folder (at most 8 files of at most 15 MiB)."),
    work: Path = typer.Option(Path("/tmp/lipsync-quality"), help="Scratch folder."),
    device: str | None = typer.Option(None, help="cuda or cpu (default: cuda if present)."),
    smoke: bool = typer.Option(False, help="Tiny settings for a CPU smoke test (seconds)."),
    overrides: list[str] = typer.Option([], "--set", help="key=value of ProtocolConfig."),
) -> None:
    """Run the protocol (one GPU call)."""
    from lipsync.train.config import apply_overrides

    data: dict[str, Any] = dict(SMOKE) if smoke else {}
    data.update(pack=str(pack), teacher=str(teacher), syncnet=str(syncnet), out=str(out),
                work=str(work), device=device or ("cpu" if smoke else None))  # fmt: skip
    cfg = from_dict(ProtocolConfig, apply_overrides(data, list(overrides)))
    summary = run_protocol(cfg, log=lambda m: typer.echo(m, err=True))
    typer.echo(json.dumps({"failures": summary["failures"], "timings": summary["timings"]}))


@app.command("tiny-teacher")
def tiny_teacher_command(
    out: Path = typer.Option(..., help="Bundle folder to write."),
    resolution: int = typer.Option(256, help="Face resolution (the pack's)."),
    seed: int = typer.Option(0, help="Seed of the random weights."),
) -> None:
    """A random-weight tiny teacher bundle for smoke runs (its outputs mean nothing)."""
    write_random_teacher(out, resolution, seed)
    typer.echo(str(out))


@app.command("worker")
def worker_command(config: Path, job: Path) -> None:
    """One job (started by ``run``)."""
    cfg = from_dict(ProtocolConfig, json.loads(config.read_text()))
    spec = Job(**json.loads(job.read_text()))
    result = run_job(cfg, spec)
    write_json(work_paths(Path(cfg.work))["results"] / f"{spec.name}.json", result)


@app.command("table")
def table_command(results: Path) -> None:
    """Markdown tables (docs/QUALITY.md) from a results.jsonl."""
    records = read_results(results)
    summary = summarise(records)
    bench = next((r for r in records if r.get("kind") == "benchmark"), None)
    if bench:
        summary["benchmark"] = bench
    meta_file = results.parent / "summary.json"
    meta = json.loads(meta_file.read_text()).get("meta") if meta_file.is_file() else None
    typer.echo(markdown(summary, meta))


def main() -> None:
    run_reporting_errors(app)


if __name__ == "__main__":
    main()
