"""A video as the pipeline reads it (:class:`VideoFrames`: a sequential pass, then indexed chunks)
on the 25 fps output timeline, with bounded memory; or frames already in memory.

The lip-sync output visits source frames in one of two orders: straight through (the audio is
not longer than the video) or ping-pong (``0..n-1, n-1..0, 0..``, when the audio is longer).
:class:`FrameSource` serves both: forward runs come from one streaming decoder; frames needed
again soon after (the turn of a ping-pong loop) come from a small cache; older frames are decoded
again in blocks (from the keyframe before each block: with a long GOP a backward block costs
the decoding of everything from that keyframe on).

A looped dub (told by :meth:`FrameSource.plan`) revisits every source frame once per loop. When
all the frames it visits fit in ``keep_bytes`` (2 GiB by default: 240 frames of 1080p take
1.4 GiB), each is decoded once and kept for the whole run; when they do not, the cache grows to
``keep_bytes`` and backward runs are decoded in blocks of half of it, so a backward pass costs a
few forward passes, not one decode from the keyframe per 16 frames. Memory is at most
``max(keep_bytes, 64 MB)`` of frames, whatever the video's or the audio's length.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Protocol

import numpy as np

from lipsync.constants import FPS
from lipsync.media.decode import iter_frames
from lipsync.media.probe import MediaInfo

CACHE_BYTES = 64 * 2**20  # decoded frames kept for reuse (the turn of a ping-pong loop)
KEEP_BYTES = 2 * 2**30  # decoded frames a looped dub may keep (RunOptions.frame_cache_mb)


class FrameSource:
    """``get(indices)`` -> (len, H, W, 3) uint8 frames, for indices on the output timeline."""

    def __init__(
        self,
        path: str | os.PathLike,
        info: MediaInfo,
        num_frames: int,
        block: int = 16,
        max_cache_frames: int = 64,
        cache_bytes: int = CACHE_BYTES,
        keep_bytes: int = KEEP_BYTES,
    ):
        self.path = path
        self.info = info
        self.num_frames = int(num_frames)
        self.frame_bytes = max(1, info.width * info.height * 3)
        # at least one block (a backward read must fit), at most 64 frames or ~64 MB
        self.block = max(1, int(block))
        self.capacity = max(self.block, min(int(max_cache_frames), cache_bytes // self.frame_bytes))
        self.backward_block = self.block  # frames decoded per backward read
        self.keep_bytes = max(0, int(keep_bytes))
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._reader = None
        self._stream: Iterator | None = None
        self._next = 0  # index the stream yields next
        self.redecoded_blocks = 0
        self.frames_decoded = 0  # frames converted and cached (each decode of a frame counts)

    def plan(self, indices: np.ndarray) -> None:
        """The order frames will be asked for (the whole run). A plan that comes back to frames
        (a looped dub) lets the cache grow to ``keep_bytes``: every frame when they all fit,
        else as many as fit, with backward runs decoded in blocks of half of them."""
        idx = np.asarray(indices, dtype=np.int64)
        distinct = len(np.unique(idx)) if len(idx) else 0
        if distinct == len(idx):
            return  # every frame once: streaming needs no more than the small cache
        fit = self.keep_bytes // self.frame_bytes
        if fit <= self.capacity:
            return
        if distinct <= fit:
            self.capacity = distinct  # each frame decoded once, kept for the run
        else:
            self.capacity = int(fit)
            self.backward_block = max(self.block, self.capacity // 2)

    @property
    def cached_bytes(self) -> int:
        return len(self._cache) * self.frame_bytes

    # -- streaming -----------------------------------------------------------------------

    def _open_stream(self, start: int) -> None:
        self.close()
        self._reader = iter_frames(
            self.path, fps=FPS, batch=8, start=start, stop=self.num_frames, info=self.info
        )
        self._stream = iter(self._reader)
        self._next = start

    def _advance_to(self, index: int) -> None:
        """Stream forward until ``index`` has been decoded (into the cache)."""
        if self._stream is None:
            self._open_stream(index)
        while self._next <= index:
            batch = next(self._stream, None)
            if batch is None:
                raise IndexError(f"frame {index} is past the end of {self.path}")
            for k, frame in zip(batch.indices.tolist(), batch.frames, strict=True):
                self._put(k, frame)
                self._next = k + 1

    def _load_block(self, index: int) -> None:
        """Decode the block of ``self.backward_block`` frames ending at ``index`` (a backward
        run), skipping the frames still cached."""
        lo = max(0, index - self.backward_block + 1)
        while lo < index and lo in self._cache:
            lo += 1
        self.redecoded_blocks += 1
        with iter_frames(
            self.path, fps=FPS, batch=self.block, start=lo, stop=index + 1, info=self.info
        ) as reader:
            for batch in reader:
                for k, frame in zip(batch.indices.tolist(), batch.frames, strict=True):
                    self._put(k, frame)

    def _put(self, k: int, frame: np.ndarray) -> None:
        self.frames_decoded += 1
        self._cache[k] = np.array(frame, copy=True)
        self._cache.move_to_end(k)
        while len(self._cache) > self.capacity:
            self._cache.popitem(last=False)

    # -- public --------------------------------------------------------------------------

    def get(self, indices: np.ndarray) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64).tolist()
        out = []
        for pos, k in enumerate(idx):
            if not 0 <= k < self.num_frames:
                raise IndexError(f"frame {k} outside 0..{self.num_frames - 1}")
            if k not in self._cache:
                forward = (pos + 1 < len(idx) and idx[pos + 1] == k + 1) or (
                    pos > 0 and idx[pos - 1] == k - 1
                )
                if k >= self._next:
                    self._advance_to(k)  # ahead of the stream: keep streaming
                elif forward:
                    self._open_stream(k)  # a new forward run behind the stream
                    self._advance_to(k)
                else:
                    self._load_block(k)  # a backward run: decode the block ending at k
            self._cache.move_to_end(k)
            out.append(self._cache[k])
        return np.stack(out)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
        self._reader = None
        self._stream = None

    def __enter__(self) -> FrameSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class VideoFrames(Protocol):
    """A video as the pipeline reads it: a sequential pass, then indexed chunks."""

    num_frames: int
    frames_decoded: int  # frames decoded by get() so far (0 for frames held in memory)

    def batches(self, stop: int, batch: int = 16) -> Iterator[np.ndarray]: ...

    def plan(self, indices: np.ndarray) -> None:
        """The order :meth:`get` will be asked for frames (a hint for what to keep)."""

    def get(self, indices: np.ndarray) -> np.ndarray: ...

    def close(self) -> None: ...


class FileFrames:
    """A video file on the 25 fps timeline (streamed; see :class:`FrameSource`)."""

    def __init__(
        self,
        path: str | os.PathLike,
        info: MediaInfo,
        num_frames: int,
        keep_bytes: int = KEEP_BYTES,
    ):
        self.path, self.info, self.num_frames = path, info, int(num_frames)
        self.keep_bytes = int(keep_bytes)
        self._source: FrameSource | None = None
        self._plan: np.ndarray | None = None
        self.frames_decoded = 0  # by get() (the pass-1 batches() stream not counted)

    def batches(self, stop: int, batch: int = 16) -> Iterator[np.ndarray]:
        with iter_frames(self.path, fps=FPS, batch=batch, stop=stop, info=self.info) as reader:
            for item in reader:
                yield item.frames

    def plan(self, indices: np.ndarray) -> None:
        self._plan = np.asarray(indices, dtype=np.int64)
        if self._source is not None:
            self._source.plan(self._plan)

    def get(self, indices: np.ndarray) -> np.ndarray:
        if self._source is None:
            self._source = FrameSource(
                self.path, self.info, self.num_frames, keep_bytes=self.keep_bytes
            )
            if self._plan is not None:
                self._source.plan(self._plan)
        return self._source.get(indices)

    def close(self) -> None:
        if self._source is not None:
            self.frames_decoded += self._source.frames_decoded
            self._source.close()
            self._source = None


class ArrayFrames:
    """Frames already in memory: (N, H, W, 3) uint8."""

    def __init__(self, frames: np.ndarray):
        self.frames = frames
        self.num_frames = len(frames)
        self.frames_decoded = 0

    def batches(self, stop: int, batch: int = 16) -> Iterator[np.ndarray]:
        for start in range(0, min(stop, self.num_frames), batch):
            yield self.frames[start : min(start + batch, stop)]

    def plan(self, indices: np.ndarray) -> None:
        pass  # all in memory already

    def get(self, indices: np.ndarray) -> np.ndarray:
        return self.frames[np.asarray(indices, dtype=np.int64)]

    def close(self) -> None:
        pass


class ArraySink:
    """Collects output frames in memory (the in-memory API's "encoder")."""

    def __init__(self) -> None:
        self._chunks: list[np.ndarray] = []

    def write(self, frames: np.ndarray) -> None:
        self._chunks.append(np.asarray(frames))

    def close(self, on_frames: Callable[[int], None] | None = None) -> np.ndarray:
        """All frames written, in order (``on_frames(n)``: as :meth:`VideoWriter.close`)."""
        out = np.concatenate(self._chunks) if self._chunks else np.empty((0, 0, 0, 3), np.uint8)
        if on_frames is not None and len(out):
            on_frames(len(out))
        return out

    def abort(self) -> None:
        self._chunks.clear()
