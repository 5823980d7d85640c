"""Step 4: cut each scene into segments of ``min_seconds``..``max_seconds`` (5-10 s).

Rule, per scene of ``L`` frames (only frames that have audio count: the usable length is
``min(video frames, audio samples // 640)``):

* ``L < min``: the scene is too short; it is recorded as a dropped piece (reason
  ``scene_too_short``) so the manifest accounts for every second of the input.
* otherwise ``n = ceil(L / max)`` segments of equal length (sizes differ by at most one frame).
  With ``max >= 2 min`` (enforced by the options) each is at least ``min`` long, so no frame of
  a long enough scene is lost and no segment crosses a scene boundary.

Segment ids are ``<input id>-s<k>`` with ``k`` counting all pieces of the input in time order
(three digits, more when needed), so ids are stable across re-runs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from lipsync.data.process.options import FPS

__all__ = ["Piece", "split_scenes"]


@dataclass(frozen=True)
class Piece:
    id: str
    start: int  # first frame (input timeline, 25 fps)
    stop: int  # one past the last frame
    scene: int  # index of the scene it comes from
    ok: bool  # False: the scene is too short to make a segment

    @property
    def frames(self) -> int:
        return self.stop - self.start

    def as_dict(self) -> dict:
        return asdict(self)


def split_scenes(
    input_id: str,
    scenes: list[tuple[int, int]],
    usable_frames: int,
    min_seconds: float = 5.0,
    max_seconds: float = 10.0,
) -> list[Piece]:
    """Segments (and too-short pieces) of one input; see the module docstring."""
    lo = int(math.ceil(min_seconds * FPS - 1e-9))
    hi = int(math.floor(max_seconds * FPS + 1e-9))
    spans: list[tuple[int, int, int, bool]] = []
    for k, (a, b) in enumerate(scenes):
        b = min(b, usable_frames)
        if b <= a:
            continue
        length = b - a
        if length < lo:
            spans.append((a, b, k, False))
            continue
        n = -(-length // hi)
        edges = [a + (length * i) // n for i in range(n + 1)]
        spans.extend((s, e, k, True) for s, e in zip(edges[:-1], edges[1:], strict=True))
    width = max(3, len(str(max(len(spans) - 1, 0))))
    return [
        Piece(f"{input_id}-s{i:0{width}d}", s, e, k, ok) for i, (s, e, k, ok) in enumerate(spans)
    ]
