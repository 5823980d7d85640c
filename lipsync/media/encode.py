"""H.264 + AAC encoding in a background thread, written atomically.

:class:`VideoWriter` takes batches of RGB uint8 frames, converts them to YUV 4:2:0 (BT.709 by
default, tagged in the stream), encodes them with ``h264_nvenc`` when it works on this machine
(``codec="auto"``) or ``libx264`` otherwise, and muxes audio as AAC: a mono float waveform, or
the original track of a file (:class:`~lipsync.media.audio_track.SourceAudio`: its own sample
rate and channels, decoded as it goes), trimmed to the video's length
(``int(num_frames / fps * sample_rate)`` samples, as the reference does; a shorter track simply
ends early). Audio is encoded alongside the video, so nothing accumulates in memory whatever the
length.

Encoding runs in its own thread behind a bounded queue: :meth:`VideoWriter.write` returns as soon
as the batch is queued (and blocks while ``queue_size`` batches are waiting), so decoding,
processing and encoding overlap. The writer keeps a reference to each written array until it is
encoded: do not modify it after ``write`` (pass ``copy=True`` to let the writer copy it).

Atomicity: everything is written to a hidden temporary file in the destination directory
(``.<name>.<host>-<pid>-<random>.partial.<ext>``, :mod:`lipsync.media.partials`) and moved into
place with :func:`os.replace` (or ``os.link`` when ``overwrite=False``, so an existing file is
never clobbered) only when :meth:`VideoWriter.close` succeeds. On any exception -- including
``KeyboardInterrupt`` inside a ``with`` block -- or an explicit :meth:`VideoWriter.abort`, the
temporary file is deleted and the destination is untouched. A process killed outright (SIGKILL,
power loss) cannot clean up: the next writer of the same output removes such leftovers
(:func:`~lipsync.media.partials.remove_stale_partials`).

Reproducibility: the same frames give the same file. libx264's AVX-512 routines are not
run-to-run deterministic, so on such CPUs the writer limits x264 to its AVX2 code
(``x264-params=asm=avx2``); what that was measured to cost, and the evidence, are in
docs/NOTES.md ("Reproducible files"). ``deterministic=False`` keeps x264's own choice.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import threading
import weakref
from collections.abc import Callable
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from lipsync.constants import FPS, OUTPUT_FORMATS, SAMPLE_RATE
from lipsync.errors import MediaError, OutputPathError, one_line
from lipsync.media.audio_track import SourceAudio
from lipsync.media.color import Yuv420Frames, as_rgb_batch
from lipsync.media.partials import make_partial, remove_stale_partials
from lipsync.media.probe import has_encoder
from lipsync.media.timeline import as_fraction, audio_samples_for_frames

log = logging.getLogger(__name__)

__all__ = [
    "OUTPUT_FORMATS",
    "VideoWriter",
    "nvenc_available",
    "select_video_encoder",
    "write_video",
]


# x264 preset names -> NVENC presets p1 (fastest) .. p7 (slowest)
_NVENC_PRESETS = {
    "ultrafast": "p1",
    "superfast": "p1",
    "veryfast": "p2",
    "faster": "p3",
    "fast": "p3",
    "medium": "p4",
    "slow": "p5",
    "slower": "p6",
    "veryslow": "p7",
    "placebo": "p7",
}
_X264_PRESETS = set(_NVENC_PRESETS)

# name -> (swscale matrix, AVColorSpace, AVColorPrimaries, AVColorTransferCharacteristic)
_COLORSPACES = {
    "bt709": ("ITU709", 1, 1, 1),
    "bt601": ("ITU601", 6, 6, 6),  # SMPTE 170M
}


@lru_cache(maxsize=1)
def nvenc_available() -> bool:
    """True when ``h264_nvenc`` is in this build *and* opens (a usable NVIDIA GPU and driver)."""
    if not has_encoder("h264_nvenc"):
        return False
    import av

    try:
        cc = av.CodecContext.create("h264_nvenc", "w")
        cc.width, cc.height, cc.pix_fmt = 256, 256, "yuv420p"
        cc.time_base, cc.framerate = Fraction(1, 25), Fraction(25)
        cc.open()
    except Exception:  # no GPU / driver / session: PermissionError, OSError, ...
        return False
    return True


def select_video_encoder(codec: str = "auto") -> str:
    """``"auto"`` -> ``h264_nvenc`` if usable else ``libx264``; ``"nvenc"``/``"h264_nvenc"``
    -> NVENC, falling back to ``libx264`` with a warning; ``"libx264"``/``"x264"`` -> libx264."""
    c = (codec or "auto").lower()
    if c in ("auto", "h264"):
        return "h264_nvenc" if nvenc_available() else _require_x264()
    if c in ("nvenc", "h264_nvenc"):
        if nvenc_available():
            return "h264_nvenc"
        log.warning("h264_nvenc is not usable here (no NVIDIA GPU/driver); using libx264")
        return _require_x264()
    if c in ("libx264", "x264"):
        return _require_x264()
    raise ValueError(f"unsupported video codec {codec!r} (use 'auto', 'h264_nvenc' or 'libx264')")


@lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def x264_deterministic_params(params: str = "") -> str:
    """``params`` (an ``x264-params`` string) with ``asm=avx2`` added where the CPU has AVX-512
    (see the module docstring); unchanged where it has not, or where ``params`` sets ``asm``."""
    flags = _cpu_flags()
    if "avx512f" not in flags or "avx2" not in flags:
        return params
    if any(kv.partition("=")[0].strip() == "asm" for kv in params.split(":")):
        return params
    return f"{params}:asm=avx2" if params else "asm=avx2"


def _require_x264() -> str:
    if not has_encoder("libx264"):  # pragma: no cover - PyAV wheels ship libx264
        raise MediaError("this PyAV/FFmpeg build has no libx264 encoder")
    return "libx264"


def _output_format(path: Path) -> str:
    fmt = OUTPUT_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise OutputPathError(
            f"unsupported output file type {path.suffix or '(none)'!r} for {path}: "
            f"use one of {', '.join(sorted(OUTPUT_FORMATS))}"
        )
    return fmt


def _remove(path: str | None) -> None:
    if path:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


_CLOSE = object()


def mux_encoded(container: Any, stream: Any, frame: Any) -> None:
    """Encode ``frame`` on ``stream`` (``None``: flush the encoder) and mux what comes out into
    ``container`` (PyAV objects)."""
    for packet in stream.encode(frame):
        container.mux(packet)


class VideoWriter:
    """Encode RGB frames (+ optional mono audio) to an H.264/AAC file, atomically.

    ``size`` is ``(width, height)``; if omitted it is taken from the first batch. Odd sizes are
    padded to even ones by repeating the last column/row (4:2:0 needs even dimensions).
    ``crf`` is x264's constant rate factor (NVENC: constant quality ``cq``); ``preset`` an x264
    preset name (mapped to NVENC's p1..p7).

    Memory: at most ``queue_size`` queued batches plus the one being encoded, plus the encoder's
    own look-ahead (x264 ``medium``: ~40 frames of YUV), whatever the length of the video.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fps: float | Fraction = FPS,
        size: tuple[int, int] | None = None,
        audio: np.ndarray | SourceAudio | None = None,
        sample_rate: int = SAMPLE_RATE,
        *,
        crf: float = 18,
        preset: str = "medium",
        codec: str = "auto",
        pix_fmt: str = "yuv420p",
        colorspace: str = "bt709",
        audio_bitrate: int = 128_000,
        overwrite: bool = False,
        faststart: bool = True,
        queue_size: int = 1,
        background: bool = True,
        threads: int = 0,
        video_options: dict[str, str] | None = None,
        deterministic: bool = True,
    ) -> None:
        self.path = Path(path)
        self.fps = as_fraction(fps)
        self.format = _output_format(self.path)
        parent = self.path.parent if str(self.path.parent) else Path(".")
        if not parent.is_dir():
            raise OutputPathError(f"output directory does not exist: {parent}")
        if self.path.is_dir():
            raise OutputPathError(f"output path is a directory: {self.path}")
        if not overwrite and self.path.exists():
            raise OutputPathError(f"output file exists (use --force to overwrite): {self.path}")
        if colorspace not in _COLORSPACES:
            raise ValueError(f"colorspace must be one of {sorted(_COLORSPACES)}")
        if preset not in _X264_PRESETS:
            raise ValueError(f"unknown preset {preset!r}; use one of {sorted(_X264_PRESETS)}")
        if not 0 <= float(crf) <= 51:
            raise ValueError(f"crf must be in [0, 51], got {crf}")
        self.codec = select_video_encoder(codec)
        self.crf, self.preset, self.pix_fmt = float(crf), preset, pix_fmt
        self.colorspace = colorspace
        self.audio_bitrate = int(audio_bitrate)
        self.overwrite, self.faststart = bool(overwrite), bool(faststart)
        self.threads = int(threads)
        self.video_options = dict(video_options or {})
        self.deterministic = bool(deterministic)
        if isinstance(audio, SourceAudio):  # the original track, at its own rate and layout
            self.sample_rate, self.audio = audio.sample_rate, audio
        else:
            self.sample_rate, self.audio = int(sample_rate), _check_audio(audio)
        self.size: tuple[int, int] | None = None
        if size is not None:
            self.size = (int(size[0]), int(size[1]))
            if self.size[0] <= 0 or self.size[1] <= 0:
                raise ValueError(f"invalid frame size {size}")

        remove_stale_partials(self.path)
        tmp = make_partial(self.path)
        self._tmp: str | None = tmp
        self._finalizer = weakref.finalize(self, _remove, tmp)

        self.frames_written = 0  # frames handed to the encoder
        self.frames_encoded = 0
        self._audio_fed = 0
        self._container: Any = None
        self._vstream: Any = None
        self._astream: Any = None
        self._reformatter: Any = None
        self._error: BaseException | None = None
        self._closed = False
        self._committed = False
        self._background = bool(background)
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, int(queue_size)))
        self._thread: threading.Thread | None = None
        self._abort = threading.Event()
        if self._background:
            self._thread = threading.Thread(
                target=self._worker, name=f"lipsync-encode:{self.path.name}", daemon=True
            )
            self._thread.start()

    # -- public ------------------------------------------------------------------------------

    @property
    def temp_path(self) -> str | None:
        """The temporary file being written (None once committed or aborted)."""
        return self._tmp

    def write(self, frames: np.ndarray, copy: bool = False) -> None:
        """Queue one frame (H, W, 3) or a batch (n, H, W, 3) of RGB uint8 frames, or a batch
        already converted to planar YUV 4:2:0 (:class:`lipsync.media.color.Yuv420Frames`)."""
        if self._closed:
            raise RuntimeError("VideoWriter is closed")
        self._raise_if_failed()
        if isinstance(frames, Yuv420Frames):
            if self.size is None:
                self.size = (frames.width, frames.height)
            if (frames.width + frames.width % 2, frames.height + frames.height % 2) != (
                self.size[0] + self.size[0] % 2,
                self.size[1] + self.size[1] % 2,
            ):
                raise ValueError("YUV frame size differs from the writer's")
            self.frames_written += len(frames)
            self._submit(frames)
            return
        arr = as_rgb_batch(frames)
        h, w = arr.shape[1:3]
        if self.size is None:
            self.size = (w, h)
        if (w, h) != self.size:
            raise ValueError(
                f"frame size {w}x{h} differs from the writer's {self.size[0]}x{self.size[1]}"
            )
        if arr.shape[0] == 0:
            return
        if copy:
            arr = arr.copy()
        self.frames_written += arr.shape[0]
        self._submit(arr)

    def _submit(self, arr) -> None:
        if not self._background:
            self._encode_batch(arr)
            return
        while True:
            self._raise_if_failed()
            try:
                self._queue.put(arr, timeout=0.1)
                return
            except queue.Full:
                continue

    def close(self, on_frames: Callable[[int], None] | None = None) -> Path:
        """Finish encoding, mux the audio, and move the file into place. Returns the path.

        ``on_frames(n)``, called in this thread while it waits: ``n`` more frames are encoded
        (the first call counts those the encoder finished before ``close``)."""
        if self._committed:
            return self.path
        if self._closed:
            raise RuntimeError("VideoWriter was aborted")
        reported = 0

        def report() -> None:
            nonlocal reported
            done = self.frames_encoded
            if on_frames is not None and done > reported:
                on_frames(done - reported)
                reported = done

        try:
            if self.frames_written == 0:
                raise MediaError(f"no frames were written to {self.path}")
            if self._background:
                report()
                self._put_control(_CLOSE)
                assert self._thread is not None
                while self._thread.is_alive():
                    self._thread.join(timeout=0.1)
                    report()
                self._thread = None
            else:
                self._finish()
            report()
            self._raise_if_failed()
            self._publish()
        except BaseException:
            self.abort()
            raise
        self._closed = True
        return self.path

    def abort(self) -> None:
        """Stop encoding and delete the temporary file; the destination is left untouched."""
        self._closed = True
        self._abort.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            while thread.is_alive():
                self._drain()
                with contextlib.suppress(queue.Full):
                    self._queue.put_nowait(_CLOSE)
                thread.join(timeout=0.05)
        self._drain()
        self._close_container(quiet=True)
        _remove(self._tmp)
        self._tmp = None
        self._finalizer.detach()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # -- worker ------------------------------------------------------------------------------

    def _put_control(self, item: object) -> None:
        while True:
            if self._error is not None or self._thread is None or not self._thread.is_alive():
                return
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _drain(self) -> None:
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _worker(self) -> None:
        try:
            while True:
                item = self._queue.get()
                if self._abort.is_set():
                    return
                if item is _CLOSE:
                    self._finish()
                    return
                self._encode_batch(item)
        except BaseException as exc:
            self._error = _wrap_av_error(exc, self.path)
            self._drain()

    def _open(self) -> None:
        import av

        assert self.size is not None and self._tmp is not None
        w, h = self.size
        ew, eh = w + (w & 1), h + (h & 1)
        options = (
            {"movflags": "+faststart"} if self.faststart and self.format in ("mp4", "mov") else {}
        )
        container = av.open(self._tmp, mode="w", format=self.format, options=options)
        self._container = container
        vs = container.add_stream(self.codec, rate=self.fps)
        vs.width, vs.height, vs.pix_fmt = ew, eh, self.pix_fmt
        _, spc, pri, trc = _COLORSPACES[self.colorspace]
        cc = vs.codec_context
        cc.color_range, cc.colorspace, cc.color_primaries, cc.color_trc = 1, spc, pri, trc
        if self.threads:
            cc.thread_count = self.threads
        crf = f"{self.crf:g}"
        if self.codec == "h264_nvenc":
            opts = {"preset": _NVENC_PRESETS[self.preset], "rc": "vbr", "cq": crf, "b": "0"}
        else:
            opts = {"crf": crf, "preset": self.preset}
        opts.update(self.video_options)
        if self.codec == "libx264" and self.deterministic:
            params = x264_deterministic_params(opts.get("x264-params", ""))
            if params:
                opts["x264-params"] = params
        vs.options = opts
        self._vstream = vs
        if self.audio is not None:
            aus = container.add_stream("aac", rate=self.sample_rate)
            aus.layout = self.audio.layout if isinstance(self.audio, SourceAudio) else "mono"
            aus.bit_rate = self.audio_bitrate
            self._astream = aus

    def _encode_batch(self, arr: np.ndarray) -> None:
        import av

        if self._container is None:
            self._open()
        tb = 1 / self.fps
        if isinstance(arr, Yuv420Frames):  # converted already (on a GPU): no swscale
            for planes in arr.planes:
                if self._abort.is_set():
                    return
                self._encode_frame(av.VideoFrame.from_ndarray(planes, format="yuv420p"), tb)
            return
        pad_h, pad_w = arr.shape[1] & 1, arr.shape[2] & 1
        if pad_h or pad_w:  # 4:2:0 needs even sizes: repeat the last row / column
            arr = np.pad(arr, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
        matrix = _COLORSPACES[self.colorspace][0]
        if self._reformatter is None:
            from av.video.reformatter import VideoReformatter

            self._reformatter = VideoReformatter()  # keeps its SwsContext between frames
        for img in arr:
            if self._abort.is_set():
                return
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            frame = self._reformatter.reformat(
                frame, format=self.pix_fmt, dst_colorspace=matrix, dst_color_range=1
            )
            self._encode_frame(frame, tb)

    def _encode_frame(self, frame, tb) -> None:
        frame.pts = self.frames_encoded
        frame.time_base = tb
        mux_encoded(self._container, self._vstream, frame)
        self.frames_encoded += 1
        self._feed_audio(self._audio_target(self.frames_encoded))

    def _audio_target(self, n_frames: int) -> int:
        return audio_samples_for_frames(n_frames, float(self.fps), self.sample_rate)

    def _feed_audio(self, upto: int) -> None:
        if self.audio is None:
            return
        import av

        if isinstance(self.audio, SourceAudio):
            planes = (
                self.audio.read(int(upto) - self._audio_fed) if upto > self._audio_fed else None
            )
            if planes is None or not planes.shape[1]:
                return
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(planes), format="fltp", layout=self.audio.layout
            )
            upto = self._audio_fed + planes.shape[1]
        else:
            upto = min(int(upto), self.audio.shape[0])
            if upto <= self._audio_fed:
                return
            chunk = np.clip(self.audio[self._audio_fed : upto], -1.0, 1.0)
            frame = av.AudioFrame.from_ndarray(chunk[None, :], format="fltp", layout="mono")
        frame.sample_rate = self.sample_rate
        frame.pts = self._audio_fed
        frame.time_base = Fraction(1, self.sample_rate)
        mux_encoded(self._container, self._astream, frame)
        self._audio_fed = upto

    def _finish(self) -> None:
        if self._container is None:
            if self.frames_written == 0:
                return
            self._open()
        mux_encoded(self._container, self._vstream, None)
        if self._astream is not None:
            self._feed_audio(self._audio_target(self.frames_encoded))
            mux_encoded(self._container, self._astream, None)
        container, self._container = self._container, None
        container.close()
        if isinstance(self.audio, SourceAudio):
            self.audio.close()

    def _close_container(self, quiet: bool) -> None:
        if isinstance(self.audio, SourceAudio):
            self.audio.close()
        container, self._container = self._container, None
        if container is None:
            return
        try:
            container.close()
        except Exception:
            if not quiet:
                raise

    def _publish(self) -> None:
        tmp = self._tmp
        assert tmp is not None
        if self.overwrite:
            os.replace(tmp, self.path)
        else:
            try:
                os.link(tmp, self.path)  # atomic and never clobbers an existing file
            except FileExistsError:
                raise OutputPathError(
                    f"output file appeared while encoding, not overwriting: {self.path}"
                ) from None
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
                    raise
                if self.path.exists():  # hard links unsupported here: best effort
                    raise OutputPathError(f"output file exists: {self.path}") from None
                os.replace(tmp, self.path)
            else:
                os.unlink(tmp)
        self._tmp = None
        self._committed = True
        self._finalizer.detach()


def _check_audio(audio: np.ndarray | None) -> np.ndarray | None:
    if audio is None:
        return None
    a = np.asarray(audio)
    if a.ndim == 2 and 1 in a.shape:
        a = a.reshape(-1)
    if a.ndim != 1:
        raise ValueError(f"expected a mono waveform (1-D), got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"expected a float waveform in [-1, 1], got {a.dtype}")
    a = np.ascontiguousarray(a, dtype=np.float32)  # no copy for a float32 waveform
    if not np.isfinite(a).all():
        raise ValueError("audio contains NaN or infinite samples")
    return a  # clipped to [-1, 1] chunk by chunk while encoding


def _wrap_av_error(exc: BaseException, path: Path) -> BaseException:
    import av

    if isinstance(exc, av.error.FFmpegError):
        return MediaError(f"cannot encode {path}: {one_line(exc)}")
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return MediaError(f"no space left on the device while writing {path}")
    return exc


def write_video(
    path: str | os.PathLike,
    frames: np.ndarray,
    fps: float = FPS,
    audio: np.ndarray | None = None,
    sample_rate: int = SAMPLE_RATE,
    **kwargs: Any,
) -> Path:
    """Encode an in-memory (N, H, W, 3) uint8 clip (+ audio) in one call."""
    frames = np.asarray(frames)
    with VideoWriter(
        path,
        fps=fps,
        size=(frames.shape[2], frames.shape[1]),
        audio=audio,
        sample_rate=sample_rate,
        **kwargs,
    ) as writer:
        writer.write(frames)
    return writer.path
