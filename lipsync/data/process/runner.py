"""Drive a processing run: find inputs, schedule tasks, collect outcomes, write the manifest.

:func:`process_corpus` is what ``lipsync data process`` calls. The loop is the same for every
executor (:mod:`.executor`): at most ``2 x workers`` tasks are in flight (segments of finished
inputs go first, so results land steadily and the driver's memory stays small), outcomes arrive
as :class:`concurrent.futures.Future` s, and each one updates the progress bars. A segment whose
records already decide it (a re-run) is not submitted at all.

When a pool worker dies (segfault, killed for memory) every task in flight fails with
``BrokenProcessPool``; the pool is rebuilt and those tasks are resubmitted, at most
``MAX_ATTEMPTS`` times each, after which the item is recorded as dropped (``worker_crashed``).
"""

from __future__ import annotations

import os
import time
from collections import Counter, deque
from concurrent.futures import FIRST_COMPLETED, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from lipsync.data.manifest import Summary, summarize, write_manifest
from lipsync.data.process.executor import InlineExecutor, PoolExecutor, RayExecutor
from lipsync.data.process.inputs import InputFile, find_inputs
from lipsync.data.process.options import FPS, ProcessOptions
from lipsync.data.process.quality import HyperIQAScorer
from lipsync.data.process.store import Layout, RunLock, read_json, remove_stale, write_json
from lipsync.data.process.sync import SyncScorer, load_sync_scorer
from lipsync.data.process.tasks import (
    InputJob,
    Outcome,
    TaskContext,
    run_input,
    run_segment,
    segment_outcome_from_disk,
)
from lipsync.errors import ConfigError

__all__ = ["ProcessReport", "Progress", "process_corpus"]

MAX_ATTEMPTS = 3
ExecutorKind = Literal["pool", "ray", "inline"]


class Progress:
    """Progress hooks (the CLI passes rich bars); the default does nothing."""

    def start(self, inputs: int) -> None: ...

    def input_done(self, outcome: Outcome, new_segments: int) -> None: ...

    def segment_done(self, outcome: Outcome) -> None: ...

    def finish(self) -> None: ...


@dataclass
class ProcessReport:
    out: str
    summary: Summary
    entries: list[dict]
    seconds: float
    workers: int
    executor: str
    worker_pids: int  # distinct processes that ran tasks in this run
    tasks: Counter = field(default_factory=Counter)  # tasks run, by kind
    timings: dict = field(default_factory=dict)  # step -> [wall s, CPU s], summed over tasks
    cpu_seconds: float = 0.0  # CPU time of all tasks (all workers) in this run


def _check_settings(layout: Layout, options: ProcessOptions) -> None:
    wanted = options.output_settings()
    stored = read_json(layout.options)
    if stored is None:
        write_json(layout.options, wanted)
        return
    diff = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
    if diff:
        detail = ", ".join(f"{k}: {stored.get(k)!r} -> {wanted.get(k)!r}" for k in diff)
        raise ConfigError(
            f"{layout.root} was processed with other settings ({detail}); resume with the same "
            "options or use a new output folder"
        )


def _make_executor(kind: ExecutorKind, options: ProcessOptions, threads: int):
    if kind == "inline":
        return InlineExecutor()
    if kind == "ray":
        return RayExecutor(options.ray_address or "auto", threads=threads)
    return PoolExecutor(options.num_workers, threads)


def _entries(
    inputs: list[InputFile], outcomes: dict[str, Outcome], segs: dict[str, Outcome]
) -> list[dict]:
    entries = []
    for inp in inputs:
        o = outcomes[inp.id]
        seg_entries = []
        for piece in o.pieces:
            base = {
                "kind": "segment", "id": piece["id"], "input": inp.id, "source": inp.rel,
                "split": inp.split, "start_frame": piece["start"],
                "frames": piece["stop"] - piece["start"], "path": None,
            }  # fmt: skip
            if not piece["ok"]:
                base.update(
                    status="dropped", step="segment", reason="scene_too_short",
                    message=f"scene of {(piece['stop'] - piece['start']) / FPS:.2f} s",
                    stats={"duration": round((piece["stop"] - piece["start"]) / FPS, 3),
                           "fps": FPS},
                )  # fmt: skip
            else:
                so = segs[piece["id"]]
                base.update(
                    status="kept" if so.status == "kept" else "dropped", step=so.step,
                    reason=so.reason, message=so.message, stats=so.stats,
                )  # fmt: skip
                stats = base["stats"] = dict(so.stats)
                stats.setdefault("duration", round(base["frames"] / FPS, 3))
                base["frames"] = int(round(stats["duration"] * FPS))
                if so.status == "kept":
                    base["path"] = f"final/{piece['id']}.mp4"
            seg_entries.append(base)
        kept = sum(e["status"] == "kept" for e in seg_entries)
        entry = {
            "kind": "input", "id": inp.id, "source": inp.rel, "split": inp.split,
            "status": "kept" if kept else "dropped", "step": o.step, "reason": o.reason,
            "message": o.message, "segments": sum(p["ok"] for p in o.pieces),
            "kept_segments": kept, "stats": o.stats,
        }  # fmt: skip
        if o.status == "kept" and not kept:
            entry.update(
                reason="no_segment_kept",
                message=f"all {entry['segments']} segment(s) were dropped (see their lines)",
            )
        entries.append(entry)
        entries.extend(seg_entries)
    return entries


def process_corpus(
    src: str | os.PathLike,
    out: str | os.PathLike,
    options: ProcessOptions | None = None,
    *,
    executor: ExecutorKind | None = None,
    progress: Progress | None = None,
    sync_scorer: SyncScorer | None = None,
) -> ProcessReport:
    """Process every input under ``src`` into ``out``; see :mod:`lipsync.data.process`.

    ``executor``: ``"pool"`` (default), ``"ray"`` (default when ``options.ray_address`` is set)
    or ``"inline"``. ``sync_scorer`` replaces the SyncNet of ``--syncnet`` for step 6 (it must
    pickle to run in a pool or on Ray).
    """
    options = (options or ProcessOptions()).validate()
    progress = progress or Progress()
    kind: ExecutorKind = executor or ("ray" if options.ray_address else "pool")
    # fail fast, before any work, on checkpoints that cannot be used
    if sync_scorer is None:
        load_sync_scorer(options.syncnet)
    if options.hyperiqa:
        HyperIQAScorer(options.hyperiqa)
    inputs = find_inputs(src, options.split_key, options.val_fraction, options.test_fraction)
    layout = Layout(out)
    layout.root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with RunLock(layout.root):
        layout.create()
        _check_settings(layout, options)
        remove_stale(layout)
        cpus = os.cpu_count() or 1
        threads = 1 if kind == "ray" else max(1, cpus // max(1, options.num_workers))
        ctx = TaskContext(str(layout.root), options, threads, sync_scorer)
        ex = _make_executor(kind, options, threads)
        try:
            report = _loop(inputs, ctx, ex, progress, layout)
        finally:
            ex.close()
            progress.finish()
    report.seconds = time.perf_counter() - t0
    report.executor = kind
    report.workers = getattr(ex, "workers", 1)
    _write_run_log(layout, report, options)
    return report


def _loop(inputs, ctx: TaskContext, ex, progress: Progress, layout: Layout) -> ProcessReport:
    progress.start(len(inputs))
    outcomes: dict[str, Outcome] = {}
    segs: dict[str, Outcome] = {}
    queue: deque[tuple[str, object]] = deque(
        ("input", InputJob(i.id, i.path, i.rel, i.split, i.sidecar)) for i in inputs
    )
    seg_queue: deque[tuple[str, object]] = deque()
    attempts: Counter = Counter()
    in_flight: dict = {}
    report = ProcessReport(str(layout.root), Summary(), [], 0.0, 0, "", 0)
    pids: set[int] = set()
    limit = 2 * max(1, getattr(ex, "workers", 1))

    def submit(kind: str, job) -> None:
        fn = run_input if kind == "input" else run_segment
        in_flight[ex.submit(fn, job, ctx)] = (kind, job)

    def record(outcome: Outcome) -> None:
        report.tasks[outcome.kind] += 1
        if outcome.worker:
            pids.add(outcome.worker)
        for step, (w, c) in outcome.timings.items():
            t = report.timings.setdefault(step, [0.0, 0.0])
            t[0] += w
            t[1] += c
            report.cpu_seconds += c

    def accept(kind: str, job, outcome: Outcome) -> None:
        record(outcome)
        if kind == "input":
            outcomes[job.id] = outcome
            new = 0
            for sj in outcome.segments:
                done = segment_outcome_from_disk(layout, sj.id)
                if done is not None:
                    segs[sj.id] = done
                    progress.segment_done(done)
                else:
                    seg_queue.append(("segment", sj))
                new += 1
            progress.input_done(outcome, new)
        else:
            segs[job.id] = outcome
            progress.segment_done(outcome)

    while queue or seg_queue or in_flight:
        while (seg_queue or queue) and len(in_flight) < limit:
            kind, job = seg_queue.popleft() if seg_queue else queue.popleft()
            submit(kind, job)
        done, _ = wait(list(in_flight), return_when=FIRST_COMPLETED)
        broken = False
        for fut in done:
            kind, job = in_flight.pop(fut)
            try:
                outcome = fut.result()
            except BrokenProcessPool:
                broken = True
                attempts[job.id] += 1
                if attempts[job.id] >= MAX_ATTEMPTS:
                    accept(kind, job, _crashed(kind, job.id))
                else:
                    (seg_queue if kind == "segment" else queue).appendleft((kind, job))
                continue
            except Exception as exc:  # Ray gave up on the task (worker/node died repeatedly)
                accept(kind, job, _crashed(kind, job.id, str(exc).splitlines()[0][:200]))
                continue
            accept(kind, job, outcome)
        if broken:
            for fut, (kind, job) in list(in_flight.items()):  # all of them failed with the pool
                fut.cancel()
                (seg_queue if kind == "segment" else queue).appendleft((kind, job))
            in_flight.clear()
            ex.restart()
    report.entries = _entries(inputs, outcomes, segs)
    write_manifest(layout.manifest, report.entries)
    report.summary = summarize(report.entries)
    report.worker_pids = len(pids)
    return report


def _crashed(kind: str, item: str, detail: str = "") -> Outcome:
    msg = f"the worker process died {MAX_ATTEMPTS} times on this item" + (
        f" ({detail})" if detail else ""
    )
    return Outcome(kind, item, "error", "check" if kind == "input" else "faces", "worker_crashed",
                   msg)  # fmt: skip


def _write_run_log(layout: Layout, report: ProcessReport, options: ProcessOptions) -> None:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    s = report.summary
    write_json(
        layout.runs / f"{stamp}.json",
        {
            "finished": stamp,
            "seconds": round(report.seconds, 3),
            "executor": report.executor,
            "workers": report.workers,
            "worker_processes": report.worker_pids,
            "cpu_seconds": round(report.cpu_seconds, 3),
            "tasks": dict(report.tasks),
            "timings": {k: [round(w, 3), round(c, 3)] for k, (w, c) in report.timings.items()},
            "inputs": s.inputs,
            "segments_kept": s.segments_kept,
            "hours_kept": round(s.hours_kept, 6),
            "errors": s.errors,
            "options": options.output_settings(),
        },
    )
