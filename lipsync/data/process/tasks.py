"""The two units of work, run in worker processes (local pool or Ray), each resumable:

* :func:`run_input` -- steps 1-4 for one input file: check, resample, scenes, segments. Returns
  the input's outcome and its segment jobs.
* :func:`run_segment` -- steps 5-7 for one segment, then its ``final/`` files.

Each step first looks for its record (``OUT/<step>/<id>.json``): present -> reuse it, absent ->
do the work, write the data files atomically, then the record (see :mod:`.store`). Nothing in a
record depends on timing or on the machine, so an interrupted and resumed run ends with the same
records as an uninterrupted one.

A task never raises for bad input: it returns an outcome with ``status="dropped"``, the step and
a reason code. An unexpected exception (a bug, a full disk) is returned as ``status="error"``
without a record, so the next run retries the item.
"""

from __future__ import annotations

import contextlib
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lipsync.data.process.check import check_input
from lipsync.data.process.clips import read_clip_frames, write_clip
from lipsync.data.process.faces import align_segment
from lipsync.data.process.labels import cut_labels
from lipsync.data.process.options import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME, ProcessOptions
from lipsync.data.process.quality import HeuristicScorer, HyperIQAScorer, QualityInput
from lipsync.data.process.resample import read_wav, resample_input
from lipsync.data.process.scenes import detect_scenes
from lipsync.data.process.segments import split_scenes
from lipsync.data.process.store import Layout, atomic_path, read_json, write_json
from lipsync.data.process.sync import (
    SyncScorer,
    decide,
    load_sync_scorer,
    lower_half,
    shift_plan,
)

__all__ = [
    "InputJob",
    "Outcome",
    "SegmentJob",
    "TaskContext",
    "run_input",
    "run_segment",
    "segment_outcome_from_disk",
]

SEGMENT_SCHEMA = "lipsync.segment/1"


@dataclass(frozen=True)
class TaskContext:
    out: str
    options: ProcessOptions
    threads: int = 1  # codec / torch threads per task
    sync_scorer: SyncScorer | None = None  # overrides --syncnet (must pickle for a pool)


@dataclass(frozen=True)
class InputJob:
    id: str
    path: str
    rel: str
    split: str
    sidecar: str | None


@dataclass(frozen=True)
class SegmentJob:
    id: str
    input: InputJob
    start: int
    stop: int
    audio_frames: int  # the input's audio length in frames (bounds the sync shift)


@dataclass
class Outcome:
    """What the driver learns from a task (also rebuilt from the records on a re-run)."""

    kind: str  # "input" | "segment"
    id: str
    status: str  # "kept" | "dropped" | "error"
    step: str  # the last step reached (the one that dropped it, for drops)
    reason: str | None = None
    message: str | None = None
    stats: dict = field(default_factory=dict)
    segments: list = field(default_factory=list)  # input: SegmentJobs to run next
    pieces: list = field(default_factory=list)  # input: all pieces, for the manifest
    worker: int = 0  # pid of the process that ran the task (not written to any record)
    timings: dict = field(default_factory=dict)  # step -> [wall s, CPU s] spent in this task


@contextlib.contextmanager
def _timed(timings: dict, step: str):
    """Add this block's wall and CPU seconds (this process, all threads) to ``timings[step]``."""
    w, c = time.perf_counter(), time.process_time()
    try:
        yield
    finally:
        t = timings.setdefault(step, [0.0, 0.0])
        t[0] += time.perf_counter() - w
        t[1] += time.process_time() - c


def _record(step: str, item: str, status: str, **extra) -> dict:
    rec = {"id": item, "step": step, "status": status, "reason": None, "message": None}
    rec.update(extra)
    return rec


def _dropped(kind: str, rec: dict, stats: dict | None = None) -> Outcome:
    return Outcome(
        kind, rec["id"], "dropped", rec["step"], rec.get("reason"), rec.get("message"),
        stats=stats if stats is not None else dict(rec.get("stats") or {}),
    )  # fmt: skip


def _error(kind: str, item: str, step: str, exc: BaseException) -> Outcome:
    tb = traceback.format_exception_only(type(exc), exc)[-1].strip()
    return Outcome(kind, item, "error", step, "internal_error", tb)


# --------------------------------------------------------------------------------------------
# steps 1-4


def _step_check(layout: Layout, job: InputJob, options: ProcessOptions) -> dict:
    path = layout.record("check", job.id)
    rec = read_json(path)
    if rec is None:
        result = check_input(job.path, options)
        rec = _record(
            "check", job.id, "done" if result.ok else "dropped", reason=result.reason,
            message=result.message, stats=result.stats, source=job.rel, split=job.split,
        )  # fmt: skip
        write_json(path, rec)
    return rec


def _step_resample(layout: Layout, job: InputJob, ctx: TaskContext) -> dict:
    path = layout.record("resample", job.id)
    rec = read_json(path)
    if rec is None:
        video = layout.data("resample", job.id, ".mp4")
        wav = layout.data("resample", job.id, ".wav")
        stats = resample_input(job.path, video, wav, ctx.options.intermediate_crf, ctx.threads)
        rec = _record("resample", job.id, "done", stats=stats, video=video.name, wav=wav.name)
        if stats["usable_frames"] < int(np.ceil(ctx.options.min_seconds * FPS - 1e-9)):
            rec.update(
                status="dropped", reason="too_short",
                message=f"{stats['usable_frames']} frames with audio after resampling",
            )  # fmt: skip
        write_json(path, rec)
    return rec


def _step_scenes(layout: Layout, job: InputJob, ctx: TaskContext, frames: int) -> dict:
    path = layout.record("scenes", job.id)
    rec = read_json(path)
    if rec is None:
        video = layout.data("resample", job.id, ".mp4")
        scenes = detect_scenes(video, frames, threshold=ctx.options.scene_threshold)
        rec = _record("scenes", job.id, "done", scenes=scenes, stats={"scenes": len(scenes)})
        write_json(path, rec)
    return rec


def _step_segment(
    layout: Layout, job: InputJob, options: ProcessOptions, scenes: list, usable: int
) -> dict:
    path = layout.record("segment", job.id)
    rec = read_json(path)
    if rec is None:
        pieces = split_scenes(
            job.id, [tuple(s) for s in scenes], usable, options.min_seconds, options.max_seconds
        )
        ok = [p for p in pieces if p.ok]
        rec = _record(
            "segment", job.id, "done" if ok else "dropped",
            pieces=[p.as_dict() for p in pieces],
            stats={"segments": len(ok), "short_pieces": len(pieces) - len(ok)},
        )  # fmt: skip
        if not ok:
            rec.update(reason="no_segment", message="no scene is long enough for one segment")
        write_json(path, rec)
    return rec


def run_input(job: InputJob, ctx: TaskContext) -> Outcome:
    """Steps 1-4 for one input (see the module docstring)."""
    return _stamped(_run_input, job, ctx)


def _stamped(
    run: Callable[[Any, TaskContext, dict], Outcome], job: Any, ctx: TaskContext
) -> Outcome:
    """``run(job, ctx, timings)``, its outcome stamped with the step timings and this worker."""
    timings: dict = {}
    out = run(job, ctx, timings)
    out.timings, out.worker = timings, os.getpid()
    return out


def _run_input(job: InputJob, ctx: TaskContext, timings: dict) -> Outcome:
    layout = Layout(ctx.out)
    step = "check"
    try:
        with _timed(timings, step):
            rec = _step_check(layout, job, ctx.options)
        stats = dict(rec.get("stats") or {})
        if rec["status"] != "done":
            return _dropped("input", rec, stats)
        step = "resample"
        with _timed(timings, step):
            rec = _step_resample(layout, job, ctx)
        stats.update(rec["stats"])
        if rec["status"] != "done":
            return _dropped("input", rec, stats)
        usable = int(rec["stats"]["usable_frames"])
        audio_frames = int(rec["stats"]["samples"]) // SAMPLES_PER_FRAME
        step = "scenes"
        with _timed(timings, step):
            rec = _step_scenes(layout, job, ctx, int(rec["stats"]["frames"]))
        stats.update(rec["stats"])
        step = "segment"
        with _timed(timings, step):
            rec = _step_segment(layout, job, ctx.options, rec["scenes"], usable)
        stats.update(rec["stats"])
        pieces = rec["pieces"]
        if rec["status"] != "done":
            return Outcome(
                "input", job.id, "dropped", "segment", rec["reason"], rec["message"], stats,
                pieces=pieces,
            )  # fmt: skip
        segments = [
            SegmentJob(p["id"], job, p["start"], p["stop"], audio_frames) for p in pieces if p["ok"]
        ]
        return Outcome("input", job.id, "kept", "segment", stats=stats, segments=segments,
                       pieces=pieces)  # fmt: skip
    except Exception as exc:
        return _error("input", job.id, step, exc)


# --------------------------------------------------------------------------------------------
# steps 5-7


def _step_faces(layout: Layout, job: SegmentJob, ctx: TaskContext) -> dict:
    path = layout.record("faces", job.id)
    rec = read_json(path)
    if rec is not None:
        return rec
    o = ctx.options
    video = layout.data("resample", job.input.id, ".mp4")
    wav = layout.data("resample", job.input.id, ".wav")
    min_frames = int(np.ceil(o.min_seconds * FPS - 1e-9))
    aligned = align_segment(
        video, job.start, job.stop, o.resolution, min_face_size=o.min_face_size,
        min_frames=min_frames, num_patches=o.quality_frames, threads=ctx.threads,
    )  # fmt: skip
    stats = dict(aligned.stats)
    if aligned.crops is None:
        rec = _record("faces", job.id, "dropped", reason=aligned.reason, message=aligned.message,
                      stats=stats)  # fmt: skip
        write_json(path, rec)
        return rec
    n = len(aligned.crops)
    first = aligned.start * SAMPLES_PER_FRAME
    audio = read_wav(wav, first, first + n * SAMPLES_PER_FRAME)
    media = layout.data("faces", job.id, ".mp4")
    write_clip(media, aligned.crops, audio, o.crf, ctx.threads)
    patches = layout.data("faces", job.id, ".npz")
    with atomic_path(patches) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **{f"p{i}": p for i, p in enumerate(aligned.patches)})
    rec = _record(
        "faces", job.id, "done", stats=stats, video_start=aligned.start, frames=n,
        media=media.name, patches=patches.name,
    )  # fmt: skip
    write_json(path, rec)
    return rec


def _step_sync(
    layout: Layout, job: SegmentJob, ctx: TaskContext, faces: dict, scorer: SyncScorer | None
) -> dict:
    path = layout.record("sync", job.id)
    rec = read_json(path)
    if rec is not None:
        return rec
    start, n = int(faces["video_start"]), int(faces["frames"])
    base = {"video_start": start, "audio_start": start, "frames": n, "media": None}
    if scorer is None:
        rec = _record(
            "sync", job.id, "skipped",
            message="no SyncNet checkpoint given (--syncnet): offsets not measured or corrected, "
            "no segment dropped for sync", offset=None, confidence=None, **base,
        )  # fmt: skip
        write_json(path, rec)
        return rec
    crops = read_clip_frames(layout.data("faces", job.id, ".mp4"))
    wav = layout.data("resample", job.input.id, ".wav")
    audio = read_wav(wav, start * SAMPLES_PER_FRAME, (start + n) * SAMPLES_PER_FRAME)
    decision = decide(scorer.estimate(lower_half(crops), audio), ctx.options.sync_threshold)
    sync = {"offset": decision.offset, "confidence": round(decision.confidence, 4)}
    if not decision.keep:
        rec = _record("sync", job.id, "dropped", reason=decision.reason,
                      message=decision.message, **sync, **base)  # fmt: skip
        write_json(path, rec)
        return rec
    off = decision.offset
    if off != 0:
        a, b = shift_plan(start, n, off, job.audio_frames)
        min_frames = int(np.ceil(ctx.options.min_seconds * FPS - 1e-9))
        if b - a < min_frames:
            rec = _record(
                "sync", job.id, "dropped", reason="too_short_after_shift",
                message=f"shifting the audio by {off} frames leaves {b - a} frames", **sync,
                **base,
            )  # fmt: skip
            write_json(path, rec)
            return rec
        shifted = read_wav(wav, (a + off) * SAMPLES_PER_FRAME, (b + off) * SAMPLES_PER_FRAME)
        media = layout.data("sync", job.id, ".mp4")
        write_clip(media, crops[a - start : b - start], shifted, ctx.options.crf, ctx.threads)
        base = {"video_start": a, "audio_start": a + off, "frames": b - a, "media": media.name}
    rec = _record("sync", job.id, "done", **sync, **base)
    write_json(path, rec)
    return rec


def _quality_scorer(options: ProcessOptions):
    if options.hyperiqa:
        return HyperIQAScorer(options.hyperiqa)
    return HeuristicScorer(options.resolution)


def _step_quality(
    layout: Layout, job: SegmentJob, ctx: TaskContext, faces: dict, sync: dict, media: Path
) -> dict:
    path = layout.record("quality", job.id)
    rec = read_json(path)
    if rec is not None:
        return rec
    o = ctx.options
    n = int(sync["frames"])
    idx = np.unique(np.linspace(0, n - 1, num=min(o.quality_frames, n)).round().astype(int))
    crops = read_clip_frames(media, idx)
    with np.load(layout.data("faces", job.id, ".npz")) as z:
        patches = [z[k] for k in sorted(z.files, key=lambda k: int(k[1:]))]
    face_size = (faces.get("stats") or {}).get("face_size")
    scorer = _quality_scorer(o)
    score, details = scorer.score(QualityInput(crops, face_size, patches))
    threshold = o.quality_threshold if o.quality_threshold is not None else scorer.default_threshold
    score = round(float(score), 2)
    extra = {"score": score, "threshold": threshold, "details": details}
    if score < threshold:
        limiting = details.get("limiting")
        what = f" (limited by {limiting})" if limiting else ""
        rec = _record("quality", job.id, "dropped", reason="low_quality",
                      message=f"{scorer.name} score {score:.1f} < {threshold:g}{what}",
                      **extra)  # fmt: skip
    else:
        rec = _record("quality", job.id, "done", **extra)
    write_json(path, rec)
    return rec


def _publish(layout: Layout, job: SegmentJob, ctx: TaskContext, recs: dict, media: Path) -> dict:
    """Write ``final/<id>.mp4`` (a hard link to the step's file, or a copy) and then
    ``final/<id>.json``, the segment's record."""
    final_json = layout.final_record(job.id)
    rec = read_json(final_json)
    if rec is not None:
        return rec
    faces, sync, quality = recs["faces"], recs["sync"], recs["quality"]
    dst = layout.final_media(job.id)
    with atomic_path(dst) as tmp:
        os.unlink(tmp)
        try:
            os.link(media, tmp)
        except OSError:
            with open(media, "rb") as src, open(tmp, "wb") as out:
                while block := src.read(1 << 20):
                    out.write(block)
    n = int(sync["frames"])
    labels = None
    if job.input.sidecar:
        side = read_json(job.input.sidecar)
        if side is not None:
            labels = cut_labels(side, int(sync["video_start"]), int(sync["audio_start"]), n)
    rec = {
        "schema": SEGMENT_SCHEMA,
        "id": job.id,
        "input": job.input.id,
        "source": job.input.rel,
        "split": job.input.split,
        "fps": FPS,
        "sample_rate": SAMPLE_RATE,
        "resolution": ctx.options.resolution,
        "frames": n,
        "duration": round(n / FPS, 3),
        "video_start": int(sync["video_start"]),
        "audio_start": int(sync["audio_start"]),
        "media": dst.name,
        "sync": {
            "status": sync["status"],
            "offset": sync.get("offset"),
            "confidence": sync.get("confidence"),
        },
        "quality": {"score": quality["score"], "scorer": quality["details"].get("scorer")},
        "stats": faces.get("stats") or {},
        "labels": labels,
    }
    write_json(final_json, rec)
    return rec


def segment_stats(recs: dict) -> dict:
    """Manifest stats of a segment from whatever step records it has."""
    faces, sync, quality = recs.get("faces"), recs.get("sync"), recs.get("quality")
    stats: dict = {"fps": FPS}
    if faces is not None:
        fs = faces.get("stats") or {}
        stats["face_size"] = fs.get("face_size")
        stats["trimmed_frames"] = fs.get("trimmed_frames")
        if faces.get("frames") is not None:
            stats["duration"] = round(int(faces["frames"]) / FPS, 3)
    if sync is not None:
        stats["sync_offset"] = sync.get("offset")
        stats["sync_confidence"] = sync.get("confidence")
        if sync.get("frames") is not None:
            stats["duration"] = round(int(sync["frames"]) / FPS, 3)
    if quality is not None:
        stats["quality"] = quality.get("score")
    return stats


def _segment_media(layout: Layout, job_id: str, sync: dict) -> Path:
    if sync.get("media"):
        return layout.data("sync", job_id, ".mp4")
    return layout.data("faces", job_id, ".mp4")


def segment_outcome_from_disk(layout: Layout, seg_id: str) -> Outcome | None:
    """The segment's outcome if its records already decide it (kept with final files, or dropped
    by a step), else None (work remains)."""
    recs: dict = {}
    for step in ("faces", "sync", "quality"):
        rec = read_json(layout.record(step, seg_id))
        if rec is None:
            return None
        recs[step] = rec
        if rec["status"] == "dropped":
            return _dropped("segment", rec, segment_stats(recs))
    if not layout.final_record(seg_id).exists():
        return None
    return Outcome("segment", seg_id, "kept", "quality", stats=segment_stats(recs))


_SYNC_SCORER: dict[str, SyncScorer | None] = {}


def _sync_scorer(options: ProcessOptions) -> SyncScorer | None:
    key = options.syncnet or ""
    if key not in _SYNC_SCORER:  # one model per worker process
        _SYNC_SCORER[key] = load_sync_scorer(options.syncnet)
    return _SYNC_SCORER[key]


def run_segment(job: SegmentJob, ctx: TaskContext) -> Outcome:
    """Steps 5-7 and the final files for one segment (``ctx.sync_scorer``, when set, replaces
    the SyncNet scorer of ``--syncnet``: tests drive step 6 with their own)."""
    return _stamped(_run_segment, job, ctx)


def _run_segment(job: SegmentJob, ctx: TaskContext, timings: dict) -> Outcome:
    layout = Layout(ctx.out)
    recs: dict = {}
    step = "faces"
    try:
        with _timed(timings, step):
            recs["faces"] = rec = _step_faces(layout, job, ctx)
        if rec["status"] == "dropped":
            return _dropped("segment", rec, segment_stats(recs))
        step = "sync"
        with _timed(timings, step):
            scorer = ctx.sync_scorer or _sync_scorer(ctx.options)
            recs["sync"] = rec = _step_sync(layout, job, ctx, recs["faces"], scorer)
        if rec["status"] == "dropped":
            return _dropped("segment", rec, segment_stats(recs))
        step = "quality"
        media = _segment_media(layout, job.id, recs["sync"])
        with _timed(timings, step):
            recs["quality"] = rec = _step_quality(
                layout, job, ctx, recs["faces"], recs["sync"], media
            )
        if rec["status"] == "dropped":
            return _dropped("segment", rec, segment_stats(recs))
        with _timed(timings, "final"):
            _publish(layout, job, ctx, recs, media)
        return Outcome("segment", job.id, "kept", "quality", stats=segment_stats(recs))
    except Exception as exc:
        return _error("segment", job.id, step, exc)
