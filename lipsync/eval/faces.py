"""Face track → aligned crops for evaluation, the way inference aligns faces.

One pass over the video at 25 fps: MediaPipe landmarks per frame, the tracked face
(:mod:`lipsync.face.track`: largest face, followed, never jumping), the three alignment points,
the smoothed similarity transforms (streamed, :class:`lipsync.face.align.SmoothingState`), the
crops warped and resized to the SyncNet's resolution like the U-Net's input. Only the lower half
(what SyncNet sees) is kept, as uint8, plus each frame's 468 landmarks for the landmark metrics.
Memory: 96 KiB per frame at 256 px (about 140 MiB per minute of video).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from lipsync.face.align import SmoothingState, crops_to_model_input, estimate_transforms, warp_faces
from lipsync.face.detect import MediaPipeDetector
from lipsync.face.track import DEFAULT_MIN_FACE_SIZE, TrackReport, require_faces
from lipsync.media import iter_frames

FPS = 25


@dataclass
class FaceCrops:
    lower: np.ndarray  # (T, R/2, R, 3) uint8: lower halves of the aligned crops (0 without face)
    usable: np.ndarray  # (T,) bool: frames with a usable tracked face
    landmarks: list[np.ndarray | None] = field(repr=False)  # (468, 2) frame pixels or None
    report: TrackReport = field(repr=False)
    frame_size: tuple[int, int] = (0, 0)  # (height, width) of the video frames

    def __len__(self) -> int:
        return len(self.usable)


def lower_half(crops: np.ndarray) -> np.ndarray:
    """(N, R, R, 3) -> (N, R/2, R, 3): the rows SyncNet sees (mouth and chin)."""
    r = crops.shape[1]
    return crops[:, r // 2 :]


def to_uint8(images) -> np.ndarray:
    """(N, 3, h, w) float in [-1, 1] (torch) -> (N, h, w, 3) uint8 (exact for 8-bit levels)."""
    levels = ((images.float() + 1.0) * 127.5).round().clamp(0, 255).byte()
    return levels.permute(0, 2, 3, 1).cpu().numpy()


def track_and_crop(
    video: str | os.PathLike,
    resolution: int = 256,
    *,
    min_face_size: int = DEFAULT_MIN_FACE_SIZE,
    max_frames: int | None = None,
    crops: bool = True,
    on_frames: Callable[[int], None] | None = None,
) -> FaceCrops:
    """Track the face of ``video`` and cut aligned lower-half crops at ``resolution``.

    Raises :class:`~lipsync.errors.VideoError` for unreadable input and
    :class:`~lipsync.errors.NoFaceError` when no frame has a usable face. ``crops=False`` keeps
    only the landmarks (faster).
    """
    lowers: list[np.ndarray] = []
    usable: list[bool] = []
    landmarks: list[np.ndarray | None] = []
    state = SmoothingState()
    half = (resolution // 2, resolution, 3)
    size = (0, 0)
    with MediaPipeDetector(min_face_size=min_face_size) as detector:
        with iter_frames(video, fps=FPS, batch=16, stop=max_frames) as reader:
            for batch in reader:
                size = batch.frames.shape[1:3]
                found = detector.detect_all(batch.frames)
                faces = [detector.tracker.update(obs).face for obs in found]
                ok = [f is not None for f in faces]
                usable.extend(ok)
                landmarks.extend(f.landmarks if f is not None else None for f in faces)
                if crops:
                    out = np.zeros((len(faces), *half), dtype=np.uint8)
                    if any(ok):
                        pts = np.stack([f.points3 for f in faces if f is not None])
                        pts = pts.astype(np.float32)
                        mats = estimate_transforms(pts, resolution, smooth=True, state=state)
                        warped = warp_faces(batch.frames[np.array(ok)], mats, resolution)
                        full = to_uint8(crops_to_model_input(warped, resolution))
                        out[np.array(ok)] = lower_half(full)
                    lowers.append(out)
                if on_frames is not None:
                    on_frames(len(faces))
        report = detector.report
    require_faces(_Report(report))
    lower = np.concatenate(lowers) if lowers else np.zeros((0, *half), dtype=np.uint8)
    return FaceCrops(lower, np.array(usable, dtype=bool), landmarks, report, tuple(size))


class _Report:
    """Adapter so :func:`require_faces` can read a detector's report."""

    def __init__(self, report: TrackReport):
        self.report = report
