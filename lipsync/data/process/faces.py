"""Step 5: detect, track and align the face of a segment exactly as inference does.

This module is the only place the processing pipeline calls the face stage, so it can switch to
a unified tracking function in one edit. The calls, in order, are those of
:meth:`lipsync.pipeline.LipSyncPipeline.track_faces` and ``_sync_chunk``:

1. :class:`lipsync.face.detect.MediaPipeDetector` (FaceMesh in video mode, a fresh graph per
   segment) -> ``detect_all`` per frame -> its :class:`~lipsync.face.track.FaceTracker`
   (largest face first, then the same person; faces under ``min_face_size`` do not count);
2. :func:`lipsync.face.align.estimate_transforms` with ``smooth=True`` over consecutive usable
   frames (a :class:`~lipsync.face.align.SmoothingState` carries the smoothing from batch to
   batch and starts afresh after a frame without a face);
3. :func:`lipsync.face.align.warp_faces` + :func:`lipsync.face.align.crops_to_model_input`: the
   model's input crops, turned back into the uint8 levels they were made from (exact: the
   ``[-1, 1]`` values are a lookup of the 256 levels).

A training segment needs the face in every frame, so the longest run of frames with a usable face
is kept (it must still be ``min_frames`` long); the frames before and after it are dropped and
counted (``trimmed_frames``). Memory: the crops of one segment (at most 10 s: 250 x R x R x 3
bytes, 49 MB at 256 px) plus one decoded batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lipsync.data.process.options import FPS
from lipsync.face.align import (
    SmoothingState,
    crops_to_model_input,
    estimate_transforms,
    warp_faces,
)
from lipsync.face.detect import MediaPipeDetector
from lipsync.face.track import FrameStatus
from lipsync.media import iter_frames

__all__ = ["AlignedSegment", "align_segment"]

_BATCH = 16


@dataclass
class AlignedSegment:
    """Result of :func:`align_segment`. ``crops`` is None when the segment is dropped."""

    crops: np.ndarray | None  # (n, R, R, 3) uint8: the kept run of frames
    start: int  # first kept frame (input timeline)
    reason: str | None = None
    message: str | None = None
    stats: dict = field(default_factory=dict)
    patches: list[np.ndarray] = field(default_factory=list)  # grey source face boxes, sampled


def _to_levels(unit: np.ndarray) -> np.ndarray:
    """(n, 3, R, R) float32 in [-1, 1] (a lookup of the 256 uint8 levels) -> (n, R, R, 3) uint8."""
    levels = np.rint((unit * 0.5 + 0.5) * 255.0)
    return np.ascontiguousarray(levels.astype(np.uint8).transpose(0, 2, 3, 1))


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """Half-open index ranges of the True runs of a 1-D bool array."""
    padded = np.concatenate([[False], mask, [False]]).astype(np.int8)
    d = np.diff(padded)
    return list(zip(np.flatnonzero(d == 1).tolist(), np.flatnonzero(d == -1).tolist(), strict=True))


def _grey_box(frame: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    h, w = frame.shape[:2]
    x0, y0 = max(0, int(box[0])), max(0, int(box[1]))
    x1, y1 = min(w, int(np.ceil(box[2]))), min(h, int(np.ceil(box[3])))
    region = frame[y0:y1, x0:x1].astype(np.float32)
    grey = region @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return np.clip(np.rint(grey), 0, 255).astype(np.uint8)


def align_segment(
    video: str | Path,
    start: int,
    stop: int,
    resolution: int,
    *,
    min_face_size: int,
    min_frames: int,
    num_patches: int = 8,
    threads: int = 0,
) -> AlignedSegment:
    """Face crops of frames ``start..stop-1`` of a 25 fps video (see the module docstring)."""
    n = stop - start
    usable = np.zeros(n, dtype=bool)
    sizes = np.full(n, np.nan, dtype=np.float32)
    crops = np.zeros((n, resolution, resolution, 3), dtype=np.uint8)
    patch_at = set(np.linspace(0, n - 1, num=min(num_patches, n)).round().astype(int).tolist())
    patches: dict[int, np.ndarray] = {}
    state = SmoothingState()
    previous_usable = False
    with MediaPipeDetector(min_face_size=min_face_size) as detector:
        reader = iter_frames(video, fps=FPS, batch=_BATCH, start=start, stop=stop, threads=threads)
        with reader:
            for batch in reader:
                local = batch.indices - start
                points = []
                for j, observations in enumerate(detector.detect_all(batch.frames)):
                    step = detector.tracker.update(observations)
                    i = int(local[j])
                    if step.status is FrameStatus.OK and step.face is not None:
                        usable[i] = True
                        sizes[i] = step.face.size
                        points.append(step.face.points3)
                        if i in patch_at:
                            patches[i] = _grey_box(batch.frames[j], step.face.bbox)
                sel = np.flatnonzero(usable[local])
                if len(sel) == 0:
                    previous_usable = False
                    continue
                pts = np.stack(points).astype(np.float32)
                mats = np.empty((len(sel), 2, 3), dtype=np.float32)
                k = 0
                for a, b in _runs(usable[local]):
                    if a > 0 or not previous_usable:
                        state = SmoothingState()  # a gap: smoothing starts afresh
                    mats[k : k + b - a] = estimate_transforms(
                        pts[k : k + b - a], resolution, smooth=True, state=state
                    )
                    k += b - a
                previous_usable = bool(usable[local][-1])
                warped = warp_faces(batch.frames[sel], mats, resolution)
                unit = crops_to_model_input(warped, resolution).numpy()
                crops[local[sel]] = _to_levels(unit)
        report = detector.report
    stats = {
        "frames_with_face": int(usable.sum()),
        "frames_face_too_small": int(report.too_small),
        "frames_other_faces": int(report.other_faces),
    }
    runs = _runs(usable)
    if not runs:
        if report.too_small:
            return AlignedSegment(
                None, start, "face_too_small",
                f"faces in {report.too_small} of {n} frames, all under {min_face_size} px",
                stats,
            )  # fmt: skip
        return AlignedSegment(None, start, "no_face", f"no face in any of the {n} frames", stats)
    a, b = max(runs, key=lambda r: (r[1] - r[0], -r[0]))
    stats.update(trimmed_frames=int(n - (b - a)), face_size=round(float(np.median(sizes[a:b])), 1))
    if b - a < min_frames:
        return AlignedSegment(
            None, start, "face_lost",
            f"the face is in {int(usable.sum())} of {n} frames; the longest unbroken run "
            f"({(b - a) / FPS:.2f} s) is under the {min_frames / FPS:.2f} s minimum",
            stats,
        )  # fmt: skip
    kept_patches = [patches[i] for i in sorted(patches) if a <= i < b]
    return AlignedSegment(crops[a:b].copy(), start + a, stats=stats, patches=kept_patches)
