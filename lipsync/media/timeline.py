"""Frame timelines: ffmpeg-``fps``-filter resampling, ping-pong looping, audio/video lengths.

Everything here is pure integer arithmetic on timestamps and indices (no decoding), so it can be
tested exactly and reused by the streaming decoder (:class:`FpsResampler`).

Frame-rate conversion rule (ffmpeg's ``fps`` filter, ``libavfilter/vf_fps.c``, with its defaults
``round=near``, ``eof_action=round``, no ``start_time``)
----------------------------------------------------------------------------------------------

1. Every input frame's presentation timestamp is moved to the output time base ``1/fps``:
   ``q_i = round_half_away_from_zero(pts_i * time_base * fps)`` (``av_rescale_q_rnd`` with
   ``AV_ROUND_NEAR_INF``), computed exactly in integers. Like the ``ffmpeg`` command line, the
   timestamps are first made relative to the container's start time.
2. The first output frame gets timestamp ``q_0`` (the first input frame's); output timestamps then
   advance by one tick per output frame. Output frame ``k`` therefore sits at time
   ``(q_0 + k) / fps`` and shows the input frame that is *current* at that tick: the last input
   frame ``i`` with ``q_i <= q_0 + k``. When several input frames round to the same tick, the last
   of them wins (the earlier ones are dropped); when an input frame spans several ticks it is
   duplicated. In other words, tick ``n`` shows the most recent input frame that starts less than
   half a tick after it (``t_i * fps < n + 1/2``; a frame exactly half-way rounds up to the next
   tick). This is *not* always the input frame nearest to the tick: with a 60 fps input, tick 1
   (40 ms) shows the frame at 50 ms (rounds to tick 1), not the one at 33.3 ms.
3. End of stream: the filter knows the end time ``E = pts_last + duration_last`` (the last frame's
   duration as ffmpeg's decoder estimates it: the packet duration, else the previous frame
   interval, else ``1 / average rate``), rounded the same way: ``e = round(E * time_base * fps)``.
   Output frames are emitted for ticks ``q_0 .. e - 1``; the last input frame is repeated up to
   there, and input frames whose ticks lie at or beyond ``e`` are dropped. So a clip of
   ``N`` frames at a constant ``r`` fps gives ``round(N * fps / r)`` output frames
   (e.g. 90 frames at 30 fps -> 75 frames at 25 fps; 72 frames at 24 fps -> 75).

The LatentSync reference converts with ``ffmpeg -i in -r 25 ...`` (the CLI's constant-frame-rate
*vsync*, not the ``fps`` filter); for 25 fps inputs (the normal case) both are the identity, for
other rates they can pick a different source frame for a few output frames.

Audio/video length policy (LatentSync ``LipsyncPipeline.loop_video``)
---------------------------------------------------------------------

The output has one frame per audio frame window. When the audio is shorter than the video, the
video is cut (output frames ``0 .. m-1``); when it is longer, the video is looped *ping-pong*:
forward, then the same frames reversed, then forward again, ... (``[v, v[::-1], v, ...]``
concatenated and truncated, so the end frames appear twice at each turn: ``0..n-1, n-1..0, 0..``).
The output audio is the input audio trimmed to ``int(num_frames / fps * sample_rate)`` samples.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from fractions import Fraction
from typing import Generic, TypeVar

import numpy as np

from lipsync.constants import FPS, SAMPLE_RATE

T = TypeVar("T")

__all__ = [
    "FpsResampler",
    "audio_samples_for_frames",
    "fps_resample_indices",
    "frames_for_audio",
    "output_frame_indices",
    "pingpong_indices",
    "rescale_near",
]


def rescale_near(value: int, src: Fraction | int, dst: Fraction | int) -> int:
    """``av_rescale_q_rnd(value, src, dst, AV_ROUND_NEAR_INF)``: ``value * src / dst`` rounded to
    the nearest integer, halves away from zero, exactly."""
    src, dst = Fraction(src), Fraction(dst)
    num = int(value) * src.numerator * dst.denominator
    den = src.denominator * dst.numerator
    if den <= 0:
        raise ValueError(f"invalid time base conversion {src} -> {dst}")
    q, r = divmod(abs(num), den)
    if 2 * r >= den:
        q += 1
    return q if num >= 0 else -q


class FpsResampler(Generic[T]):
    """Online version of ffmpeg's ``fps`` filter (round=near, eof_action=round).

    Feed input frames in presentation order with their timestamps already in output ticks
    (``rescale_near(pts, time_base, 1 / fps)``) via :meth:`push`; it returns the output frames that
    became final as ``(output_index, item)`` pairs. :meth:`finish` takes the end-of-stream tick and
    returns the rest. At most two input items are held at any time, so memory is constant.

    ``output_index`` counts from 0 at the first output frame (tick ``first_tick``). ``origin``
    presets that tick, for resuming mid-stream after a seek (the first frame pushed must then be
    the one current at the first tick wanted: e.g. a keyframe at or before it).
    """

    def __init__(self, origin: int | None = None) -> None:
        self._buf: deque[tuple[int, T]] = deque()
        self._next: int | None = None
        self.first_tick: int | None = origin
        self.frames_in = 0
        self.frames_out = 0
        self.finished = False

    def _start(self) -> None:
        self._next = self._buf[0][0]
        if self.first_tick is None:
            self.first_tick = self._next

    def _emit(self, out: list[tuple[int, T]], item: T) -> None:
        assert self._next is not None and self.first_tick is not None
        out.append((self._next - self.first_tick, item))
        self._next += 1
        self.frames_out += 1

    def push(self, tick: int, item: T) -> list[tuple[int, T]]:
        if self.finished:
            raise RuntimeError("FpsResampler.push() after finish()")
        self._buf.append((int(tick), item))
        self.frames_in += 1
        out: list[tuple[int, T]] = []
        while len(self._buf) == 2:
            if self._next is None:
                self._start()
            if self._buf[1][0] <= self._next:
                self._buf.popleft()  # the next frame is already due: drop this one
            else:
                self._emit(out, self._buf[0][1])
        return out

    def finish(self, end_tick: int) -> list[tuple[int, T]]:
        """Flush at end of stream; ``end_tick`` is the rounded end time of the last frame."""
        if self.finished:
            return []
        self.finished = True
        out: list[tuple[int, T]] = []
        while self._buf:
            if self._next is None:
                self._start()
            if (len(self._buf) == 2 and self._buf[1][0] <= self._next) or end_tick <= self._next:
                self._buf.popleft()
            else:
                self._emit(out, self._buf[0][1])
        return out


def fps_resample_indices(
    pts: Sequence[int] | np.ndarray,
    time_base: Fraction | str | float,
    end_pts: int,
    fps: Fraction | int | float = FPS,
) -> np.ndarray:
    """Source frame index for every output frame of ffmpeg's ``fps`` filter: (num_out,) int64.

    ``pts`` are the input frames' timestamps (in presentation order, relative to the file start) in
    units of ``time_base``; ``end_pts`` is the end of the last frame (its pts plus its duration).
    """
    tb = Fraction(time_base)
    out_tb = 1 / as_fraction(fps)
    rs: FpsResampler[int] = FpsResampler()
    result: list[int] = []
    for i, p in enumerate(pts):
        result.extend(src for _, src in rs.push(rescale_near(int(p), tb, out_tb), i))
    result.extend(src for _, src in rs.finish(rescale_near(int(end_pts), tb, out_tb)))
    return np.asarray(result, dtype=np.int64)


def as_fraction(fps: Fraction | int | float | str) -> Fraction:
    """A frame rate as an exact fraction (a float is approximated by a denominator <= 1001000)."""
    if isinstance(fps, float):
        if not math.isfinite(fps):
            raise ValueError(f"fps must be a positive number, got {fps}")
        frac = Fraction(fps).limit_denominator(1001 * 1000)
    else:
        frac = Fraction(fps)
    if frac <= 0:
        raise ValueError(f"fps must be a positive number, got {fps}")
    return frac


# --------------------------------------------------------------------------------------------
# audio / video length


def pingpong_indices(num_video_frames: int, num_output_frames: int) -> np.ndarray:
    """Source frame for each output frame when looping a video ping-pong: (num_output,) int64.

    Same order as LatentSync's ``loop_video``: the clip forward, then reversed, then forward...,
    i.e. ``0, 1, .., n-1, n-1, .., 1, 0, 0, 1, ..`` (the turning frames appear twice), truncated
    to ``num_output_frames``. When the output is not longer than the video this is simply
    ``0 .. num_output_frames - 1`` (the video is cut to the audio).
    """
    n, m = int(num_video_frames), int(num_output_frames)
    if n <= 0:
        raise ValueError(f"num_video_frames must be positive, got {num_video_frames}")
    if m < 0:
        raise ValueError(f"num_output_frames must be >= 0, got {num_output_frames}")
    k = np.arange(m, dtype=np.int64) % (2 * n)
    return np.where(k < n, k, 2 * n - 1 - k)


def output_frame_indices(
    num_video_frames: int, num_output_frames: int, loop: bool = True
) -> np.ndarray:
    """Source video frame for every output frame, the output being as long as the audio.

    Audio shorter than (or as long as) the video: the video is cut, ``0 .. m-1``. Audio longer:
    ping-pong looping (``loop=True``, the reference behaviour) or, with ``loop=False``, the output
    is limited to the video (``0 .. n-1``; the caller then trims the audio to it).
    """
    if loop:
        return pingpong_indices(num_video_frames, num_output_frames)
    return np.arange(min(int(num_video_frames), int(num_output_frames)), dtype=np.int64)


def frames_for_audio(num_samples: int, fps: float = FPS, sample_rate: int = SAMPLE_RATE) -> int:
    """Video frames needed to cover ``num_samples`` audio samples: ``ceil(n * fps / sr)``.

    (The lip-sync output length itself follows the audio features' window count,
    ``lipsync.audio.num_frame_windows``, which can be up to two frames longer.)
    """
    f = as_fraction(fps)
    return -(-int(num_samples) * f.numerator // (int(sample_rate) * f.denominator))


def audio_samples_for_frames(
    num_frames: int, fps: float = FPS, sample_rate: int = SAMPLE_RATE
) -> int:
    """Audio samples kept for ``num_frames`` output frames: ``int(n / fps * sr)``, the reference's
    float expression (``int(len(frames) / video_fps * audio_sample_rate)``)."""
    return int(int(num_frames) / float(fps) * int(sample_rate))
