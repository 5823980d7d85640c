"""The viseme track: per video frame the 5 mouth parameters, from timed phones.

Co-articulation follows the dominance model of Cohen & Massaro (1993): every phone ``i`` pulls
each parameter ``j`` towards its viseme class's target ``T_ij`` with a weight (dominance)

    D_ij(t) = a_ij                           inside the phone,
    D_ij(t) = a_ij * exp(-d / tau_j)         at distance d (seconds) before or after it,

with a longer ``tau`` before the phone (anticipation: lips round well before an "oo") than after
it (carry-over). Outside its interval a phone's dominance is capped (``max_outside`` = 2), so
that a strong constraint (the bilabial closure, dominance 30) is met inside the phone without
flattening its neighbours. The parameter is the dominance-weighted mean of the targets,
``p_j(t) = sum_i D_ij(t) T_ij / sum_i D_ij(t)``, so a strongly dominant phone (a bilabial's
closure) reaches its target even when short, and weak ones (/h/) take their neighbours' shape.
``p(t)`` is evaluated every millisecond and averaged over each video frame's interval
``[k / fps, (k + 1) / fps)``, the same interval of audio that frame ``k`` is paired with at
inference (Whisper and SyncNet windows start at ``k / fps``).

An ``open_gain`` (per clip, recorded in the sidecar) scales the opening, so speakers differ in
how wide they open their mouths; the track stored in the sidecar is the one rendered.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lipsync.data.synth.phones import PARAMS, phone_id, viseme_tables

__all__ = ["CoarticulationSettings", "viseme_track"]


@dataclass(frozen=True)
class CoarticulationSettings:
    """Time constants (seconds) per parameter (order of :data:`~phones.PARAMS`)."""

    tau_before: tuple[float, ...] = (0.045, 0.06, 0.09, 0.04, 0.035)
    tau_after: tuple[float, ...] = (0.035, 0.045, 0.06, 0.035, 0.03)
    max_outside: float = 2.0  # cap on a phone's dominance outside its own interval
    step: float = 0.001  # evaluation step (s)


def viseme_track(
    phones: Sequence[tuple[str, float, float]],
    num_frames: int,
    fps: float = 25.0,
    open_gain: float = 1.0,
    settings: CoarticulationSettings | None = None,
) -> np.ndarray:
    """``(num_frames, 5)`` float32 parameters in [0, 1] from ``(label, start_s, end_s)`` phones.

    Time outside every phone counts as silence (``SIL``).
    """
    settings = settings or CoarticulationSettings()
    targets, dominance = viseme_tables()
    duration = num_frames / fps
    labels = ["SIL"] + [p[0] for p in phones] + ["SIL"]
    first = min((p[1] for p in phones), default=duration)
    last = max((p[2] for p in phones), default=0.0)
    starts = np.array([min(0.0, first) - 1.0] + [p[1] for p in phones] + [max(duration, last)])
    ends = np.array([first] + [p[2] for p in phones] + [max(duration, last) + 1.0])
    ids = np.array([phone_id(label) for label in labels])
    tgt, dom = targets[ids], dominance[ids]  # (P, 5)

    steps_per_frame = max(1, int(round(1.0 / (fps * settings.step))))
    t = (np.arange(num_frames * steps_per_frame) + 0.5) / (fps * steps_per_frame)  # (T,)
    before = np.clip(starts[:, None] - t[None, :], 0.0, None)  # (P, T) distance to the start
    after = np.clip(t[None, :] - ends[:, None], 0.0, None)
    out = np.empty((num_frames, len(PARAMS)), dtype=np.float64)
    inside = (before == 0) & (after == 0)
    for j in range(len(PARAMS)):
        d = np.exp(-before / settings.tau_before[j] - after / settings.tau_after[j])
        a = dom[:, j : j + 1]
        d *= np.where(inside, a, np.minimum(a, settings.max_outside))
        value = (d * tgt[:, j : j + 1]).sum(0) / np.maximum(d.sum(0), 1e-12)
        out[:, j] = value.reshape(num_frames, steps_per_frame).mean(1)
    out[:, 0] *= open_gain
    return np.clip(out, 0.0, 1.0).astype(np.float32)
