"""Streaming video decode: upright RGB frames on a constant-rate timeline, in batches.

``iter_frames(path, fps=25, batch=16)`` returns a :class:`VideoReader`; iterating it yields
:class:`FrameBatch` tuples ``(indices, frames)`` with ``frames`` (n, H, W, 3) uint8 RGB and
``indices`` the (n,) int64 output frame numbers (0, 1, 2, ... on the ``fps`` timeline, see
:mod:`lipsync.media.timeline` for the resampling rule). A background thread demuxes, decodes,
resamples, converts and orients frames ``prefetch`` batches ahead through a bounded queue, so host
memory is bounded by ``(prefetch + 2) * batch`` frames whatever the length of the video.

Details:

* Timestamps, not frame counts, place frames (variable-frame-rate input is handled exactly as
  ffmpeg's ``fps`` filter does). Timestamps are taken relative to the container start time, like
  the ``ffmpeg`` command line does; frames without a timestamp continue the previous one.
* Rotation/mirroring from the display matrix is applied (``ffmpeg``'s autorotate), so frames come
  out upright and ``frames.shape[1:3]`` is the display ``(height, width)``.
* YUV -> RGB uses the matrix and range the stream is tagged with (BT.601 when untagged, as
  ``ffmpeg``/``swscale`` assume). If the frame size changes mid-stream, later frames are scaled to
  the first frame's size. HDR transfer functions are not tone-mapped.
* Damaged packets are skipped (``ffmpeg`` does the same); more than ``max_decode_errors`` of them
  raise :class:`VideoError`.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from lipsync.constants import FPS
from lipsync.errors import VideoError, one_line
from lipsync.media.probe import (
    MediaInfo,
    Orientation,
    check_complete,
    frame_orientation,
    open_input,
    probe,
    video_stream,
)
from lipsync.media.timeline import FpsResampler, as_fraction, rescale_near

log = logging.getLogger(__name__)

__all__ = ["FrameBatch", "VideoReader", "iter_frames", "read_frames", "scan_timeline"]

_AV_TIME_BASE = Fraction(1, 1_000_000)


class FrameBatch(NamedTuple):
    indices: np.ndarray  # (n,) int64 output frame numbers
    frames: np.ndarray  # (n, H, W, 3) uint8 RGB, upright


class _Failure:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_DONE = object()


class _DurationEstimator:
    """The last frame's duration, as ffmpeg's decoder estimates it (``video_duration_estimate``)."""

    def __init__(self, stream: Any) -> None:
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        tb = stream.time_base
        self.rate_duration = 0
        if rate and tb and rate > 0:
            self.rate_duration = max(1, rescale_near(1, 1 / Fraction(rate), Fraction(tb)))
        self.last_pts: int | None = None
        self.last_estimate = 1

    def update(self, pts: int, frame_duration: int | None) -> int:
        dur = int(frame_duration or 0)
        ts_diff = pts - self.last_pts if self.last_pts is not None else -1
        unreliable = dur == 1 and ts_diff > 2 * dur
        if dur > 0 and not unreliable:
            est = dur
        elif ts_diff > 0:
            est = ts_diff
        elif dur > 0:
            est = dur
        elif self.rate_duration > 0:
            est = self.rate_duration
        else:
            est = max(self.last_estimate, 1)
        self.last_pts = pts
        self.last_estimate = est
        return est

    def next_pts(self) -> int:
        return (self.last_pts if self.last_pts is not None else 0) + self.last_estimate


def _start_offset(container: Any, stream: Any) -> int:
    """ffmpeg CLI input offset: minus the container start time, in stream ticks."""
    start = container.start_time
    if start is None:
        start = 0
    return rescale_near(-int(start), _AV_TIME_BASE, Fraction(stream.time_base))


def _to_rgb(frame: Any, width: int, height: int) -> np.ndarray:
    kwargs: dict[str, Any] = {}
    if int(frame.color_range) in (1, 2):  # 1 = limited (MPEG), 2 = full (JPEG)
        kwargs["src_color_range"] = int(frame.color_range)
    if frame.width != width or frame.height != height:
        frame = frame.reformat(width=width, height=height, format="rgb24", **kwargs)
    elif frame.format.name != "rgb24":
        frame = frame.reformat(format="rgb24", **kwargs)
    return frame.to_ndarray()


def _decoded_frames(container: Any, stream: Any, path: Path, max_errors: int) -> Iterator[Any]:
    """Demux + decode, skipping (and counting) damaged packets like ffmpeg does."""
    import av

    errors = 0
    for packet in container.demux(stream):
        try:
            frames = packet.decode()
        except av.error.InvalidDataError as exc:
            errors += 1
            log.warning("skipping damaged video packet in %s: %s", path, one_line(exc))
            if errors > max_errors:
                raise VideoError(
                    f"too many decoding errors in {path} ({errors}); the file is damaged"
                ) from None
            continue
        yield from frames


class VideoReader:
    """Background-thread, batched, resampled, upright RGB frame reader; iterate it once.

    Use as a context manager (or call :meth:`close`) to stop the decoder thread early.
    ``start``/``stop`` select output frame numbers ``start <= k < stop`` (frames before ``start``
    are decoded but not converted). ``fps=None`` keeps the source frames (numbered in order).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fps: float | Fraction | None = FPS,
        batch: int = 16,
        *,
        start: int = 0,
        stop: int | None = None,
        prefetch: int = 1,
        threads: int = 0,
        max_decode_errors: int = 100,
        info: MediaInfo | None = None,
    ) -> None:
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {prefetch}")
        self.path = Path(path)
        self.info = info if info is not None else probe(self.path, error=VideoError)
        if info is None:
            check_complete(self.path, VideoError)
        if not self.info.has_video:
            raise VideoError(f"no video stream in {self.path}")
        self.fps = None if fps is None else as_fraction(fps)
        self.batch = int(batch)
        self.start = max(0, int(start))
        self.stop = None if stop is None else int(stop)
        self.prefetch = int(prefetch)
        self.threads = int(threads)
        self.max_decode_errors = int(max_decode_errors)
        self.width, self.height = self.info.width, self.info.height  # display size
        self._queue: queue.Queue = queue.Queue(maxsize=self.prefetch)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._iterated = False
        self.frames_decoded = 0  # source frames decoded (set by the worker)
        self.frames_out = 0  # output frames produced (set by the worker)
        self.first_time: float | None = None  # time (s) of output frame 0 relative to the start

    # -- public ------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[FrameBatch]:
        if self._iterated:
            raise RuntimeError("a VideoReader can only be iterated once")
        self._iterated = True
        self._thread = threading.Thread(
            target=self._worker, name=f"lipsync-decode:{self.path.name}", daemon=True
        )
        self._thread.start()
        return self._consume()

    def close(self) -> None:
        """Stop the decoder thread and release its buffers (idempotent)."""
        self._stop.set()
        thread = self._thread
        if thread is None:
            return
        while thread.is_alive():
            self._drain()
            thread.join(timeout=0.05)
        self._drain()

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self._stop.set()
        except Exception:
            pass

    # -- consumer ----------------------------------------------------------------------------

    def _drain(self) -> None:
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass

    def _consume(self) -> Iterator[FrameBatch]:
        try:
            while True:
                item = self._queue.get()
                if item is _DONE:
                    return
                if isinstance(item, _Failure):
                    raise item.exc
                yield item
        finally:
            self.close()

    # -- producer ----------------------------------------------------------------------------

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _worker(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # forwarded to the consumer, which re-raises it
            import av

            if isinstance(exc, av.error.FFmpegError):
                exc = VideoError(f"cannot decode {self.path}: {one_line(exc)}")
            self._put(_Failure(exc))
        else:
            self._put(_DONE)

    def _run(self) -> None:
        if self.start > 0 and self.fps is not None and self._run_once(seek=True):
            return
        self._run_once(seek=False)

    def _run_once(self, seek: bool) -> bool:
        """Decode and emit. With ``seek``, jump to the keyframe before output frame ``start``
        first; returns False (having emitted nothing) if the seek cannot be trusted."""
        import av

        container = open_input(self.path, VideoError, "video")
        with container:
            stream = video_stream(container)
            if stream is None:
                raise VideoError(f"no video stream in {self.path}")
            stream.thread_type = "AUTO"
            if self.threads:
                stream.codec_context.thread_count = self.threads
            tb = Fraction(stream.time_base)
            offset = _start_offset(container, stream)
            out_tb = 1 / self.fps if self.fps else None
            frames = _decoded_frames(container, stream, self.path, self.max_decode_errors)
            origin: int | None = None
            if seek:
                first = next(iter(frames), None)
                if first is None or first.pts is None:
                    return False
                origin = rescale_near(first.pts + offset, tb, out_tb)
                target = rescale_near(origin + self.start - 1, out_tb, tb) - offset
                try:
                    container.seek(target, stream=stream, backward=True)
                except av.error.FFmpegError:
                    return False
                frames = _decoded_frames(container, stream, self.path, self.max_decode_errors)
            durations = _DurationEstimator(stream)
            resampler: FpsResampler[Any] | None = FpsResampler(origin) if self.fps else None
            batcher = _Batcher(self)
            n_src = 0
            for frame in frames:
                if self._stop.is_set():
                    return True
                n_src += 1
                self.frames_decoded = n_src
                if resampler is None:
                    if not batcher.add(n_src - 1, frame):
                        return True
                    continue
                pts = frame.pts if frame.pts is not None else durations.next_pts()
                durations.update(pts, frame.duration)
                tick = rescale_near(pts + offset, tb, out_tb)
                if seek and n_src == 1 and (frame.pts is None or tick - origin > self.start):
                    return False  # landed after the wanted frame: decode from the start instead
                for k, f in resampler.push(tick, frame):
                    if not batcher.add(k, f):
                        return True
                if self.first_time is None and resampler.first_tick is not None:
                    self.first_time = float(resampler.first_tick * out_tb)
            if n_src == 0:
                if seek:
                    return False
                raise VideoError(f"no video frames could be decoded from {self.path}")
            if resampler is not None:
                end = rescale_near(durations.next_pts() + offset, tb, out_tb)
                for k, f in resampler.finish(end):
                    if not batcher.add(k, f):
                        return True
                if self.first_time is None and resampler.first_tick is not None:
                    self.first_time = float(resampler.first_tick * out_tb)
            batcher.flush()
            return True


class _Batcher:
    """Collects output frames into (batch, H, W, 3) arrays and hands them to the queue."""

    def __init__(self, reader: VideoReader) -> None:
        self.r = reader
        self.orientation: Orientation | None = None
        self.coded: tuple[int, int] | None = None
        self.buf: np.ndarray | None = None
        self.idx: list[int] = []
        self.last_frame: Any = None
        self.last_rgb: np.ndarray | None = None

    def add(self, k: int, frame: Any) -> bool:
        """Returns False when the reader should stop (``stop`` reached or closed)."""
        r = self.r
        if r.stop is not None and k >= r.stop:
            self.flush()
            return False
        r.frames_out = k + 1
        if k < r.start:
            return True
        if self.orientation is None:
            self.orientation = frame_orientation(frame)
            self.coded = (frame.width, frame.height)
        if frame is self.last_frame and self.last_rgb is not None:
            rgb = self.last_rgb  # duplicated frame: convert once
        else:
            rgb = self.orientation.apply(_to_rgb(frame, *self.coded))
            self.last_frame, self.last_rgb = frame, rgb
        if self.buf is None:
            self.buf = np.empty((r.batch, *rgb.shape), dtype=np.uint8)
        self.buf[len(self.idx)] = rgb
        self.idx.append(k)
        if len(self.idx) == r.batch:
            return self.flush()
        return True

    def flush(self) -> bool:
        if not self.idx or self.buf is None:
            return True
        n = len(self.idx)
        item = FrameBatch(np.asarray(self.idx, dtype=np.int64), self.buf[:n])
        self.buf, self.idx = None, []
        return self.r._put(item)


def iter_frames(
    path: str | os.PathLike,
    fps: float | Fraction | None = FPS,
    batch: int = 16,
    **kwargs: Any,
) -> VideoReader:
    """Stream a video as :class:`FrameBatch` es; see :class:`VideoReader` for the options."""
    return VideoReader(path, fps=fps, batch=batch, **kwargs)


def read_frames(
    path: str | os.PathLike,
    fps: float | Fraction | None = FPS,
    *,
    start: int = 0,
    stop: int | None = None,
) -> np.ndarray:
    """All (selected) frames of a short video as one (N, H, W, 3) uint8 array."""
    with iter_frames(path, fps=fps, batch=32, start=start, stop=stop) as reader:
        batches = [b.frames for b in reader]
        h, w = reader.height, reader.width
    if not batches:
        return np.empty((0, h, w, 3), dtype=np.uint8)
    return np.concatenate(batches)


def scan_timeline(path: str | os.PathLike, fps: float | Fraction = FPS) -> np.ndarray:
    """Source frame number (in presentation order) of every output frame, from packet timestamps.

    Demuxes without decoding (fast: seconds for hours of video), so the output frame count is
    known before decoding. Equals what :class:`VideoReader` produces for a well-formed file;
    frames lost to damaged packets while decoding can make the real stream shorter.
    """
    import av

    p = Path(path)
    out_tb = 1 / as_fraction(fps)
    container = open_input(p, VideoError, "video")
    try:
        with container:
            stream = video_stream(container)
            if stream is None:
                raise VideoError(f"no video stream in {p}")
            tb = Fraction(stream.time_base)
            offset = _start_offset(container, stream)
            pkts: list[tuple[int, int]] = []
            last_dts: int | None = None
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue
                pts = packet.pts
                if pts is None:
                    pts = packet.dts if packet.dts is not None else last_dts
                    if pts is None:
                        continue
                last_dts = packet.dts if packet.dts is not None else pts
                pkts.append((int(pts), int(packet.duration or 0)))
    except av.error.FFmpegError as exc:
        raise VideoError(f"cannot read {p}: {one_line(exc)}") from None
    if not pkts:
        raise VideoError(f"no video frames in {p}")
    pkts.sort(key=lambda x: x[0])
    # durations in presentation order, as the decoder would see them
    est = _DurationEstimator(stream)
    for pts, dur in pkts:
        est.update(pts, dur)
    resampler: FpsResampler[int] = FpsResampler()
    out: list[int] = []
    for i, (pts, _) in enumerate(pkts):
        out.extend(src for _, src in resampler.push(rescale_near(pts + offset, tb, out_tb), i))
    end = rescale_near(est.next_pts() + offset, tb, out_tb)
    out.extend(src for _, src in resampler.finish(end))
    return np.asarray(out, dtype=np.int64)
