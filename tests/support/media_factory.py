"""Generate small test media with PyAV (no ffmpeg binary, no network). Reusable by any test.

Frames can carry their own frame number as a binary stripe pattern (:func:`index_pattern`,
read back with :func:`read_index`) that survives lossy encoding, so tests can check which source
frame ended up where.
"""

from __future__ import annotations

import wave
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from lipsync.media.encode import mux_encoded, x264_deterministic_params

DrawFn = Callable[[int, float], np.ndarray]  # (frame number, time in s) -> (H, W, 3) uint8

_CONTAINER_FORMATS = {
    ".mp4": "mp4",
    ".m4v": "mp4",
    ".mov": "mov",
    ".mkv": "matroska",
    ".webm": "webm",
    ".avi": "avi",
}
_AUDIO_FOR_CONTAINER = {"webm": "libopus", "avi": "libmp3lame"}
_CODEC_ALIASES = {
    "h264": "libx264",
    "hevc": "libx265",
    "h265": "libx265",
    "vp9": "libvpx-vp9",
    "vp8": "libvpx",
    "av1": "libsvtav1",
}
_AUDIO_CODECS = {
    ".wav": ("wav", "pcm_s16le"),
    ".flac": ("flac", "flac"),
    ".mp3": ("mp3", "libmp3lame"),
    ".m4a": ("ipod", "aac"),
    ".aac": ("adts", "aac"),
    ".ogg": ("ogg", "libopus"),
    ".opus": ("ogg", "libopus"),
}

INDEX_BITS = 10


def index_pattern(index: int, size: tuple[int, int], bits: int = INDEX_BITS) -> np.ndarray:
    """An (H, W, 3) image whose vertical stripes spell ``index`` in binary (MSB left).

    Stripe ``b`` is white (255) if bit ``bits-1-b`` is set, else black (0). Width must be a
    multiple of ``bits`` pixels ... or close: leftover columns on the right stay mid grey.
    """
    w, h = size
    img = np.full((h, w, 3), 128, dtype=np.uint8)
    sw = w // bits
    for b in range(bits):
        on = (index >> (bits - 1 - b)) & 1
        img[:, b * sw : (b + 1) * sw] = 255 if on else 0
    return img


def read_index(img: np.ndarray, bits: int = INDEX_BITS) -> int:
    """Inverse of :func:`index_pattern` (robust to codec noise: stripe means vs 128)."""
    h, w = img.shape[:2]
    sw = w // bits
    value = 0
    for b in range(bits):
        stripe = img[h // 4 : 3 * h // 4, b * sw + sw // 4 : (b + 1) * sw - sw // 4]
        value = (value << 1) | int(stripe.mean() > 128)
    return value


def read_indices(frames: np.ndarray, bits: int = INDEX_BITS) -> list[int]:
    return [read_index(f, bits) for f in frames]


def solid(color: Sequence[int], size: tuple[int, int]) -> np.ndarray:
    w, h = size
    img = np.empty((h, w, 3), dtype=np.uint8)
    img[:] = np.asarray(color, dtype=np.uint8)
    return img


def quadrants(size: tuple[int, int]) -> np.ndarray:
    """Red top-left, green top-right, blue bottom-left, white bottom-right: shows orientation."""
    w, h = size
    img = np.zeros((h, w, 3), dtype=np.uint8)
    img[: h // 2, : w // 2] = (255, 0, 0)
    img[: h // 2, w // 2 :] = (0, 255, 0)
    img[h // 2 :, : w // 2] = (0, 0, 255)
    img[h // 2 :, w // 2 :] = (255, 255, 255)
    return img


def sine(
    seconds: float, sample_rate: int = 16000, freq: float = 440.0, amplitude: float = 0.5
) -> np.ndarray:
    t = np.arange(int(round(seconds * sample_rate))) / sample_rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def speechlike(seconds: float, sample_rate: int = 16000, seed: int = 0) -> np.ndarray:
    """A deterministic, broadband, amplitude-modulated test signal (harmonics + noise)."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sample_rate))
    t = np.arange(n) / sample_rate
    f0 = 140 + 30 * np.sin(2 * np.pi * 1.3 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 3.0 * t) ** 2
    x = env * voiced + 0.05 * rng.standard_normal(n)
    return (0.4 * x / np.max(np.abs(x))).astype(np.float32)


def make_video(
    path: str | Path,
    seconds: float = 1.0,
    fps: float = 25,
    size: tuple[int, int] = (64, 48),
    codec: str = "libx264",
    container: str | None = None,
    audio: bool | np.ndarray = False,
    rotation: int | None = None,
    draw: DrawFn | None = None,
    *,
    pts: Sequence[int] | None = None,
    time_base: Fraction | None = None,
    sample_rate: int = 16000,
    audio_codec: str | None = None,
    pix_fmt: str = "yuv420p",
    crf: int = 18,
    preset: str = "veryfast",
    faststart: bool = False,
    gop: int | None = None,
) -> Path:
    """Write a test video; returns its path.

    * ``draw(i, t)`` gives frame ``i`` (default: :func:`index_pattern` of ``i``).
    * Frame timestamps: ``i`` in ``1/fps`` units by default; or explicit ``pts`` (in
      ``time_base`` units, e.g. ``Fraction(1, 1000)``) for variable frame rate -- then the number
      of frames is ``len(pts)`` and ``seconds`` is ignored.
    * ``audio=True`` adds a 440 Hz sine of the same length; an array gives the exact waveform
      (mono float32 at ``sample_rate``).
    * ``rotation``: display-matrix rotation in degrees counter-clockwise (mp4/mov).
    * ``gop``: keyframe interval (frames), e.g. to exercise seeking.
    """
    path = Path(path)
    fmt = container or _CONTAINER_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"unknown container for {path}")
    codec = _CODEC_ALIASES.get(codec, codec)
    fps_frac = Fraction(fps).limit_denominator(100000)
    if pts is None:
        n = int(round(seconds * float(fps_frac)))
        tb = 1 / fps_frac
        stamps = list(range(n))
    else:
        stamps = [int(p) for p in pts]
        n = len(stamps)
        tb = time_base or Fraction(1, 1000)
    draw = draw or (lambda i, t: index_pattern(i, size))
    options = {"movflags": "+faststart"} if faststart and fmt in ("mp4", "mov") else {}
    with av.open(str(path), "w", format=fmt, options=options) as out:
        vs = out.add_stream(codec, rate=fps_frac)
        vs.width, vs.height, vs.pix_fmt = size[0], size[1], pix_fmt
        vs.codec_context.time_base = tb
        if gop:
            vs.codec_context.gop_size = gop
        opts: dict[str, str] = {}
        if codec in ("libx264", "libx265"):
            opts = {"crf": str(crf), "preset": preset}
            if codec == "libx264" and x264_deterministic_params():  # reproducible inputs
                opts["x264-params"] = x264_deterministic_params()
            if codec == "libx265":
                opts["x265-params"] = "log-level=error"
        elif codec in ("libvpx-vp9", "libvpx"):
            opts = {"crf": str(crf + 12), "b": "0", "deadline": "realtime", "cpu-used": "8"}
        elif codec == "libsvtav1":
            opts = {"crf": str(crf + 12), "preset": "12"}
        vs.options = opts
        if rotation:
            vs.set_display_rotation(rotation)
        astream = None
        wav = None
        if audio is not False and audio is not None:
            if isinstance(audio, np.ndarray):
                wav = np.asarray(audio, dtype=np.float32).reshape(-1)
            else:
                dur = (stamps[-1] + 1) * float(tb) if stamps else seconds
                wav = sine(dur, sample_rate)
            acodec = audio_codec or _AUDIO_FOR_CONTAINER.get(fmt, "aac")
            astream = out.add_stream(acodec, rate=sample_rate if acodec != "libopus" else 48000)
            astream.layout = "mono"
        for i, p in enumerate(stamps):
            img = draw(i, float(p * tb))
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            frame.pts = p
            frame.time_base = tb
            mux_encoded(out, vs, frame)
        mux_encoded(out, vs, None)
        if astream is not None and wav is not None:
            _encode_audio(out, astream, wav, sample_rate)
    return path


def _encode_audio(
    out: av.container.OutputContainer, stream, wav: np.ndarray, rate: int, channels: int = 1
) -> None:
    """Encode mono ``wav`` into ``stream``, copied to ``channels`` identical channels."""
    step = 4096
    layout = "mono" if channels == 1 else "stereo"
    for s in range(0, len(wav), step):
        chunk = np.repeat(wav[None, s : s + step], channels, axis=0)
        chunk = np.ascontiguousarray(chunk, dtype=np.float32)
        frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=layout)
        frame.sample_rate = rate
        frame.pts = s
        frame.time_base = Fraction(1, rate)
        mux_encoded(out, stream, frame)
    mux_encoded(out, stream, None)


def make_audio(
    path: str | Path,
    seconds: float = 1.0,
    sample_rate: int = 16000,
    signal: np.ndarray | None = None,
    *,
    freq: float = 440.0,
    amplitude: float = 0.5,
    channels: int = 1,
    cover_art: bool = False,
) -> Path:
    """Write an audio file (wav/flac/mp3/m4a/aac/ogg by extension); ``signal`` overrides the
    default sine (mono float32 at ``sample_rate``; may be empty for a zero-length file).
    ``cover_art`` (mp3) adds a JPEG picture stream flagged as an attached picture."""
    path = Path(path)
    fmt, codec = _AUDIO_CODECS[path.suffix.lower()]
    wav = sine(seconds, sample_rate, freq, amplitude) if signal is None else signal
    wav = np.asarray(wav, dtype=np.float32).reshape(-1)
    layout = "mono" if channels == 1 else "stereo"
    if codec == "pcm_s16le":  # the stdlib writes a valid header even for zero samples
        data = np.clip(np.round(wav * 32768), -32768, 32767).astype("<i2")
        with wave.open(str(path), "wb") as wf:
            wf.setnchannels(channels)
            wf.setsampwidth(2)
            wf.setframerate(sample_rate)
            wf.writeframes(np.repeat(data[:, None], channels, axis=1).tobytes())
        return path
    with av.open(str(path), "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=sample_rate)
        stream.layout = layout
        if cover_art:
            pic = out.add_stream("mjpeg")
            pic.width, pic.height, pic.pix_fmt = 32, 32, "yuvj420p"
            pic.disposition = av.stream.Disposition.attached_pic
            image = av.VideoFrame.from_ndarray(quadrants((32, 32)), format="rgb24")
            mux_encoded(out, pic, image)
            mux_encoded(out, pic, None)
        _encode_audio(out, stream, wav, sample_rate, channels)
    return path


def make_text_file(path: str | Path, text: str = "this is not a video\n") -> Path:
    path = Path(path)
    path.write_text(text * 20)
    return path


def truncate_copy(src: str | Path, dst: str | Path, keep: float = 0.5) -> Path:
    """Copy the first ``keep`` fraction of ``src``'s bytes to ``dst`` (a cut-off download)."""
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[: int(len(data) * keep)])
    return Path(dst)
