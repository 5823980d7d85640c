"""Small face-crop clips: write (H.264 + AAC 16 kHz, atomic) and read back."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lipsync.data.process.options import FPS, SAMPLE_RATE
from lipsync.media import VideoWriter, read_frames

__all__ = ["read_clip_frames", "write_clip"]


def write_clip(
    path: Path, frames: np.ndarray, audio: np.ndarray, crf: float, threads: int = 0
) -> None:
    """(N, R, R, 3) uint8 crops + 16 kHz mono float audio -> ``path`` (atomic; replaces a file a
    killed attempt may have completed)."""
    writer = VideoWriter(
        path, fps=FPS, audio=audio, sample_rate=SAMPLE_RATE, crf=crf, preset="medium",
        codec="libx264", overwrite=True, threads=threads,
    )  # fmt: skip
    with writer:
        for i in range(0, len(frames), 32):
            writer.write(frames[i : i + 32])


def read_clip_frames(path: str | Path, indices: np.ndarray | list[int] | None = None) -> np.ndarray:
    """All frames of a short 25 fps clip, or only ``indices`` (sorted, unique), as
    (n, R, R, 3) uint8."""
    frames = read_frames(path, fps=FPS)
    if indices is None:
        return frames
    return frames[np.asarray(indices, dtype=np.int64)]
