"""The original audio track of a file, as an output carries it.

The model hears 16 kHz mono (:func:`lipsync.audio.load_audio`); the output keeps what the user
gave: :class:`SourceAudio` decodes the first audio stream of a file at its own sample rate, mono
or stereo as it is (more channels are mixed down to stereo; a rate the AAC encoder cannot carry
becomes 48 kHz), a block at a time while the video is encoded, so nothing but one decoded frame is
held in memory. :class:`lipsync.media.encode.VideoWriter` trims it to the video's length.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from lipsync.errors import AudioError, one_line

__all__ = ["AAC_RATES", "SourceAudio"]

# sample rates FFmpeg's AAC encoder takes
AAC_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000)


class SourceAudio:
    """The first audio stream of ``path``: ``sample_rate``, ``channels`` (1 or 2) and ``layout``
    (``"mono"``/``"stereo"``) are what the output will carry. :meth:`read` returns the next
    samples as planar float32 ``(channels, <=n)`` in [-1, 1]; an empty array at the end."""

    def __init__(self, path: str | os.PathLike):
        import av

        self.path = Path(path)
        try:
            with av.open(str(self.path)) as container:
                if not container.streams.audio:
                    raise AudioError(f"no audio stream in {self.path}")
                cc = container.streams.audio[0].codec_context
                rate, channels = int(cc.sample_rate or 0), int(cc.channels or 1)
        except av.error.FFmpegError as exc:
            raise AudioError(f"cannot read audio from {self.path}: {one_line(exc)}") from None
        self.source_rate, self.source_channels = rate, channels
        self.sample_rate = rate if rate in AAC_RATES else 48000
        self.channels = 1 if channels == 1 else 2
        self.layout = "mono" if self.channels == 1 else "stereo"
        self._blocks: Any = None  # generator of decoded (channels, n) blocks
        self._container: Any = None
        self._buffer = np.zeros((self.channels, 0), dtype=np.float32)

    def _decode(self):
        import av

        self._container = av.open(str(self.path))
        stream = self._container.streams.audio[0]
        resampler = av.AudioResampler(format="fltp", layout=self.layout, rate=self.sample_rate)
        for frame in self._container.decode(stream):
            for out in resampler.resample(frame):
                yield out.to_ndarray()
        for out in resampler.resample(None):
            yield out.to_ndarray()

    def read(self, n: int) -> np.ndarray:
        """The next ``n`` samples per channel (fewer at the end of the track)."""
        if self._blocks is None:
            self._blocks = self._decode()
        parts, have = [self._buffer], self._buffer.shape[1]
        while have < n:
            block = next(self._blocks, None)
            if block is None:
                break
            parts.append(np.asarray(block, dtype=np.float32))
            have += block.shape[1]
        data = np.concatenate(parts, axis=1) if len(parts) > 1 else self._buffer
        self._buffer = data[:, n:]
        return np.clip(data[:, :n], -1.0, 1.0)

    def close(self) -> None:
        """Release the decoder (idempotent)."""
        if self._blocks is not None:
            self._blocks.close()
        if self._container is not None:
            self._container.close()
        self._blocks = self._container = None
