"""Check a lip-sync job's inputs and output path up front, with one clear typed error each.

:func:`validate_inputs` writes nothing. It raises

* :class:`~lipsync.errors.OutputPathError` -- unsupported output type, output equal to an input
  (after resolving symlinks and relative paths, or a hard link to it), output is a directory,
  output exists and ``force`` is false, output directory missing / not a directory / not
  writable;
* :class:`~lipsync.errors.VideoError` -- video missing, unreadable, not media, truncated, without
  a video stream, undecodable, larger than ``max_side`` pixels on a side, longer than
  ``max_duration_s``;
* :class:`~lipsync.errors.AudioError` -- audio missing, unreadable, not media, truncated, without
  an audio stream, empty (zero samples), longer than ``max_duration_s``.

Silent audio (peak below ``silence_db`` dBFS) is usable -- the result is a closed mouth -- so it
only warns (``warnings.warn`` and the ``lipsync.media`` logger) and sets ``audio_silent``.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lipsync.constants import OUTPUT_FORMATS
from lipsync.errors import AudioError, MediaError, OutputPathError, VideoError
from lipsync.media.probe import MediaInfo, check_complete, probe

log = logging.getLogger("lipsync.media")

__all__ = [
    "DEFAULT_MAX_DURATION_S",
    "DEFAULT_MAX_SIDE",
    "SilentAudioWarning",
    "ValidatedInputs",
    "check_complete",
    "check_output_path",
    "silent_audio_message",
    "validate_inputs",
]

DEFAULT_MAX_DURATION_S = 30 * 60.0
DEFAULT_MAX_SIDE = 7680  # 8K UHD width
_REJECTED_FORMATS = {"tty"}  # FFmpeg's ANSI-art demuxer happily "reads" text files


class SilentAudioWarning(UserWarning):
    """The audio input holds only silence (the output will have a closed mouth)."""


@dataclass(frozen=True)
class ValidatedInputs:
    video_path: Path  # absolute, symlinks resolved
    audio_path: Path
    output_path: Path
    video: MediaInfo
    audio: MediaInfo
    waveform: np.ndarray | None  # 16 kHz mono float32 (None with load_waveform=False)
    audio_duration: float  # seconds of decoded audio (or the container's figure)
    audio_peak: float  # max |sample| (1.0 = full scale); nan without the waveform
    audio_silent: bool


def _resolve(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.abspath(os.fspath(path))))


def _same_file(a: Path, b: Path) -> bool:
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_output_path(
    output: str | os.PathLike,
    inputs: tuple[str | os.PathLike, ...] = (),
    force: bool = False,
) -> Path:
    """Validate the output path alone (see module doc); returns it resolved."""
    raw = Path(output)
    if raw.suffix.lower() not in OUTPUT_FORMATS:
        raise OutputPathError(
            f"unsupported output file type {raw.suffix or '(none)'!r} for {raw}: "
            f"use one of {', '.join(sorted(OUTPUT_FORMATS))}"
        )
    out = _resolve(raw)
    for inp in inputs:
        if _same_file(out, _resolve(inp)):
            raise OutputPathError(
                f"output {raw} is the same file as input {inp}; choose another output path"
            )
    if out.is_dir():
        raise OutputPathError(f"output path is a directory: {raw}")
    if out.exists() and not force:
        raise OutputPathError(f"output file exists (use --force to overwrite): {raw}")
    parent = out.parent
    if not parent.exists():
        raise OutputPathError(f"output directory does not exist: {parent}")
    if not parent.is_dir():
        raise OutputPathError(f"output directory is not a directory: {parent}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"output directory is not writable: {parent}")
    if out.exists() and not os.access(out, os.W_OK) and not os.access(parent, os.W_OK):
        raise OutputPathError(f"output file is not writable: {raw}")  # pragma: no cover
    return out


def _check_exists(path: Path, error: type[MediaError], what: str) -> None:
    if not path.exists():
        raise error(f"{what} file not found: {path}")
    if not path.is_file():
        raise error(f"not a {what} file: {path} is a directory or special file")


# audio file extensions -> what FFmpeg's demuxer for them is called (the ones people pass)
_AUDIO_EXTENSIONS = {
    ".wav": ("WAV", {"wav", "w64"}),
    ".mp3": ("MP3", {"mp3"}),
    ".flac": ("FLAC", {"flac"}),
    ".m4a": ("M4A", {"mov,mp4,m4a,3gp,3g2,mj2"}),
    ".aac": ("AAC", {"aac"}),
    ".ogg": ("Ogg", {"ogg"}),
    ".opus": ("Opus", {"ogg"}),
}


def _probe_role(path: Path, error: type[MediaError]) -> MediaInfo:
    audio_role = issubclass(error, AudioError)
    # the audio role needs no video frame decoded: a damaged audio file that FFmpeg takes for
    # raw video must not be reported as a video decoding error
    info = probe(path, error=error, decode_first_frame=not audio_role)
    if info.format_name in _REJECTED_FORMATS:
        raise error(f"cannot read {path}: not a media file")
    if audio_role and not info.has_audio:
        kind, demuxers = _AUDIO_EXTENSIONS.get(path.suffix.lower(), (None, set()))
        if kind is not None and info.format_name not in demuxers:
            seen = f"{info.video_codec} video" if info.has_video else info.format_name
            raise AudioError(
                f"{path} is not a readable {kind} file: FFmpeg finds no audio in it (it reads "
                f"as {seen}); its header is probably damaged"
            )
    check_complete(path, error)
    return info


def validate_inputs(
    video: str | os.PathLike,
    audio: str | os.PathLike,
    output: str | os.PathLike,
    force: bool = False,
    *,
    max_duration_s: float = DEFAULT_MAX_DURATION_S,
    max_side: int = DEFAULT_MAX_SIDE,
    load_waveform: bool = True,
    silence_db: float = -60.0,
) -> ValidatedInputs:
    """Check everything a lip-sync job needs before any work starts; see the module docstring.

    ``audio`` may be the video file itself (its own soundtrack). With ``load_waveform`` (default)
    the audio is decoded once (16 kHz mono, :func:`lipsync.audio.load_audio`) to find empty and
    silent audio; the waveform is returned for reuse.
    """
    vpath, apath = Path(video), Path(audio)
    _check_exists(vpath, VideoError, "video")
    _check_exists(apath, AudioError, "audio")
    out = check_output_path(output, (vpath, apath), force=force)

    vinfo = _probe_role(vpath, VideoError)
    if not vinfo.has_video:
        kind = "an audio-only file" if vinfo.has_audio else "no video"
        raise VideoError(f"no video stream in {vpath} ({kind}); pass a video file as the video")
    if max(vinfo.width, vinfo.height) > max_side:
        raise VideoError(
            f"video is {vinfo.width}x{vinfo.height}, larger than the {max_side}-pixel limit; "
            "downscale it first"
        )
    vdur = vinfo.video_duration if vinfo.video_duration is not None else vinfo.duration
    if vdur is not None and vdur > max_duration_s:
        raise VideoError(
            f"video is {_fmt_s(vdur)} long, over the {_fmt_s(max_duration_s)} limit; "
            "split it or raise the limit"
        )

    ainfo = vinfo if _same_file(_resolve(apath), _resolve(vpath)) else None
    if ainfo is None:
        ainfo = _probe_role(apath, AudioError)
    if not ainfo.has_audio:
        raise AudioError(
            f"no audio stream in {apath}; pass an audio file (wav, mp3, m4a, ...) or a video "
            "with sound as the audio"
        )
    adur_hdr = ainfo.audio_duration
    if adur_hdr is not None and adur_hdr > max_duration_s:
        raise AudioError(
            f"audio is {_fmt_s(adur_hdr)} long, over the {_fmt_s(max_duration_s)} limit"
        )

    waveform: np.ndarray | None = None
    peak = math.nan
    silent = False
    adur = float(adur_hdr or 0.0)
    if load_waveform:
        from lipsync.audio import SAMPLE_RATE, load_audio

        try:
            waveform = load_audio(apath)
        except AudioError as exc:
            msg = str(exc)
            if "empty" in msg:
                raise AudioError(f"audio in {apath} is empty (zero samples)") from None
            raise
        adur = waveform.shape[0] / SAMPLE_RATE
        if adur > max_duration_s:
            raise AudioError(
                f"audio is {_fmt_s(adur)} long, over the {_fmt_s(max_duration_s)} limit"
            )
        peak = float(np.max(np.abs(waveform))) if waveform.size else 0.0
        silent = peak <= 10.0 ** (silence_db / 20.0)
        if silent:
            msg = silent_audio_message(apath, peak)
            log.warning(msg)
            warnings.warn(msg, SilentAudioWarning, stacklevel=2)
    elif adur_hdr is not None and adur_hdr <= 0:
        raise AudioError(f"audio in {apath} is empty (zero samples)")

    return ValidatedInputs(
        video_path=_resolve(vpath),
        audio_path=_resolve(apath),
        output_path=out,
        video=vinfo,
        audio=ainfo,
        waveform=waveform,
        audio_duration=adur,
        audio_peak=peak,
        audio_silent=silent,
    )


def silent_audio_message(path: str | os.PathLike, peak: float) -> str:
    """The warning for silent audio (logged by :func:`validate_inputs`, kept in run reports)."""
    return f"audio in {path} is silent (peak {_db(peak)} dBFS); the output will show a closed mouth"


def _fmt_s(seconds: float) -> str:
    seconds = float(seconds)
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{int(seconds // 60)} min {seconds % 60:04.1f} s"


def _db(peak: float) -> str:
    return "-inf" if peak <= 0 else f"{20 * math.log10(peak):.1f}"
