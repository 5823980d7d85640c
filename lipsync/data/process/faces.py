"""Step 5: detect, track and align the face of a segment exactly as inference does.

The same face stage as inference, in two passes over the segment (as the pipeline does):

1. :func:`lipsync.face.detect.track_faces` (MediaPipe FaceMesh in video mode, a fresh graph per
   segment; largest face first, then the same person; faces under ``min_face_size`` do not
   count): per frame a status, the alignment points and the followed face's box;
2. the longest run of frames with a usable face is kept (it must still be ``min_frames`` long;
   the frames before and after it are dropped and counted as ``trimmed_frames``), its points go
   through :func:`lipsync.face.align.estimate_transforms` with ``smooth=True``, and a second
   decode of that run is warped with :func:`lipsync.face.align.warp_faces` +
   :func:`lipsync.face.align.crops_to_model_input`: the model's input crops, turned back into
   the uint8 levels they were made from (exact: the ``[-1, 1]`` values are a lookup of the 256
   levels).

Memory: the crops of one segment (at most 10 s: 250 x R x R x 3 bytes, 49 MB at 256 px) plus one
decoded batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lipsync.data.process.options import FPS
from lipsync.face.align import crops_to_model_input, estimate_transforms, warp_faces
from lipsync.face.detect import MediaPipeDetector, track_faces
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
    with MediaPipeDetector(min_face_size=min_face_size) as detector:
        with iter_frames(
            video, fps=FPS, batch=_BATCH, start=start, stop=stop, threads=threads
        ) as reader:
            track = track_faces((batch.frames for batch in reader), detector)
    usable = track.usable
    report = track.report
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
    sizes = np.minimum(
        track.boxes[a:b, 2] - track.boxes[a:b, 0], track.boxes[a:b, 3] - track.boxes[a:b, 1]
    )
    stats.update(trimmed_frames=int(n - (b - a)), face_size=round(float(np.median(sizes)), 1))
    if b - a < min_frames:
        return AlignedSegment(
            None, start, "face_lost",
            f"the face is in {int(usable.sum())} of {n} frames; the longest unbroken run "
            f"({(b - a) / FPS:.2f} s) is under the {min_frames / FPS:.2f} s minimum",
            stats,
        )  # fmt: skip
    mats = estimate_transforms(track.points[a:b], resolution, smooth=True)
    crops = np.zeros((b - a, resolution, resolution, 3), dtype=np.uint8)
    patch_at = set(np.linspace(a, b - 1, num=min(num_patches, b - a)).round().astype(int).tolist())
    patches: dict[int, np.ndarray] = {}
    with iter_frames(
        video, fps=FPS, batch=_BATCH, start=start + a, stop=start + b, threads=threads
    ) as reader:
        for batch in reader:
            local = batch.indices - start - a  # index into the kept run
            warped = warp_faces(batch.frames, mats[local], resolution)
            crops[local] = _to_levels(crops_to_model_input(warped, resolution).numpy())
            for j, i in enumerate(local.tolist()):
                if i + a in patch_at:
                    patches[i] = _grey_box(batch.frames[j], tuple(track.boxes[a + i]))
    return AlignedSegment(
        crops, start + a, stats=stats, patches=[patches[i] for i in sorted(patches)]
    )
