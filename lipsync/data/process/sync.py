"""Step 6: audio-visual sync filter -- estimate the offset, shift the audio to offset 0, drop
segments whose sync confidence is under the threshold (3, like the reference).

The estimator is any :class:`SyncScorer`: lower-half face crops and the segment's 16 kHz audio
in, :class:`SyncEstimate` (offset in frames, confidence) out. The SyncNet scorer
(:mod:`lipsync.eval.sync`) is plugged in by :func:`load_sync_scorer`; without a checkpoint the
step is skipped and the record says so (``status: "skipped"``), keeping every segment and its
audio as they are.

Offset convention: ``offset = k`` means the sound belonging to video frame ``i`` is heard at frame
``i + k`` (the audio lags by ``k`` frames; negative: it leads). The shift takes the audio from
``k`` frames later in the input's 16 kHz track, so sound and picture line up; where the shifted
window would run past either end of the input's audio, the segment loses those frames
(:func:`shift_plan`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from lipsync.errors import ConfigError

__all__ = [
    "SyncDecision",
    "SyncEstimate",
    "SyncScorer",
    "decide",
    "load_sync_scorer",
    "lower_half",
    "shift_plan",
]


@dataclass(frozen=True)
class SyncEstimate:
    offset: int  # frames; see the module docstring for the sign
    confidence: float  # SyncNet confidence (median distance minus minimum distance, as LSE-C)


class SyncScorer(Protocol):
    """What step 6 needs from a SyncNet."""

    def estimate(self, faces: np.ndarray, audio: np.ndarray) -> SyncEstimate:
        """faces: (N, R/2, R, 3) uint8 lower halves of the aligned crops at 25 fps; audio:
        (N * 640,) float32 16 kHz mono. Returns the best offset and its confidence."""
        ...


def lower_half(crops: np.ndarray) -> np.ndarray:
    """(N, R, R, 3) -> (N, R/2, R, 3): the mouth half SyncNet looks at."""
    r = crops.shape[1]
    return crops[:, r // 2 :]


@dataclass(frozen=True)
class SyncDecision:
    keep: bool
    reason: str | None
    message: str | None
    offset: int
    confidence: float


def decide(estimate: SyncEstimate, threshold: float) -> SyncDecision:
    """Keep when the confidence reaches ``threshold``."""
    conf = float(estimate.confidence)
    if not np.isfinite(conf) or conf < threshold:
        return SyncDecision(
            False, "low_sync_confidence",
            f"SyncNet confidence {conf:.2f} is under the {threshold:g} threshold "
            f"(offset {estimate.offset} frames)",
            int(estimate.offset), conf,
        )  # fmt: skip
    return SyncDecision(True, None, None, int(estimate.offset), conf)


def shift_plan(start: int, frames: int, offset: int, audio_frames: int) -> tuple[int, int]:
    """Video frames ``[a, b)`` (input timeline) that keep their sound after shifting the audio by
    ``offset``: frame ``i`` then plays the input's audio of frame ``i + offset``, which must lie
    in ``[0, audio_frames)``. ``b - a`` may be below ``frames`` (even 0)."""
    a = max(start, -offset)
    b = min(start + frames, audio_frames - offset)
    return a, max(a, b)


def load_sync_scorer(checkpoint: str | os.PathLike | None) -> SyncScorer | None:
    """The SyncNet scorer for ``--syncnet``, or None when no checkpoint is given.

    The SyncNet model and its offset search live in :mod:`lipsync.eval.sync` (issue 14); until
    that module is merged a checkpoint cannot be used and this raises a clear error.
    """
    if checkpoint is None:
        return None
    raise ConfigError(
        "--syncnet needs the SyncNet offset estimator (lipsync.eval.sync), which this build does "
        "not include yet; run without --syncnet to skip the sync filter"
    )
