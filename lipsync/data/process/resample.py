"""Step 2: resample to 25 fps and 16 kHz with the resamplers inference uses.

* Video: :func:`lipsync.media.iter_frames` (ffmpeg ``fps``-filter timing, rotation applied,
  colour matrix honoured) -> H.264 (``intermediate_crf``, keyframe every 2 s so step 5 can seek
  to a segment), written with :class:`lipsync.media.VideoWriter` (atomic).
* Audio: the first audio stream through libswresample to signed 16-bit mono 16 kHz -- exactly
  what :func:`lipsync.audio.load_audio` does, but streamed (:func:`lipsync.audio.iter_audio`,
  which ``load_audio`` reads too) so a long input never sits in memory -- written losslessly as
  a 16-bit WAV. ``load_audio(wav)`` returns the
  same samples ``load_audio(input)`` would (tested).

Memory: a few video batches and one audio frame, whatever the input's length.
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np

from lipsync.audio import iter_audio
from lipsync.data.process.options import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME
from lipsync.data.process.store import atomic_path
from lipsync.media import VideoWriter, iter_frames

__all__ = ["read_wav", "resample_input"]

KEYFRAME_INTERVAL = 2 * FPS


def read_wav(path: str | Path, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Samples ``start:stop`` of a 16-bit mono WAV as float32 in [-1, 1) (``/ 32768``, as
    :func:`lipsync.audio.load_audio`); reads only that range."""
    with wave.open(str(path), "rb") as wf:
        n = wf.getnframes()
        start = max(0, min(int(start), n))
        stop = n if stop is None else max(start, min(int(stop), n))
        wf.setpos(start)
        data = wf.readframes(stop - start)
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / np.float32(32768.0)


def _write_wav(src: Path, dst: Path) -> int:
    samples = 0
    with atomic_path(dst) as tmp:
        with wave.open(str(tmp), "wb") as wf:
            wf.setnchannels(1)
            wf.setsampwidth(2)
            wf.setframerate(SAMPLE_RATE)
            for chunk in iter_audio(src):
                wf.writeframes(chunk.astype("<i2", copy=False).tobytes())
                samples += chunk.shape[0]
    return samples


def _write_video(src: Path, dst: Path, crf: float, threads: int) -> tuple[int, int, int]:
    frames = 0
    with iter_frames(src, fps=FPS, batch=16, threads=threads) as reader:
        writer = VideoWriter(
            dst, fps=FPS, crf=crf, preset="veryfast", codec="libx264", overwrite=True,
            threads=threads, video_options={"g": str(KEYFRAME_INTERVAL)},
        )  # fmt: skip
        with writer:
            for batch in reader:
                writer.write(batch.frames)
                frames += len(batch.frames)
        return frames, reader.width, reader.height


def resample_input(
    src: str | Path, video_out: Path, wav_out: Path, crf: float, threads: int = 0
) -> dict:
    """Write ``video_out`` (25 fps H.264) and ``wav_out`` (16 kHz mono s16); returns stats."""
    src = Path(src)
    samples = _write_wav(src, wav_out)
    frames, width, height = _write_video(src, video_out, crf, threads)
    usable = min(frames, samples // SAMPLES_PER_FRAME)
    return {
        "frames": frames,
        "samples": samples,
        "usable_frames": usable,
        "width": width,
        "height": height,
        "video_seconds": round(frames / FPS, 3),
        "audio_seconds": round(samples / SAMPLE_RATE, 4),
    }
