"""Probe media files (streams, size after rotation, frame rate, duration) and codec support.

``probe(path)`` reads the container header and, for a video stream, decodes the first frame: that
proves the codec works in this PyAV build and gives the display matrix (rotation), which FFmpeg
attaches to decoded frames.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from lipsync.errors import AudioError, MediaError, VideoError, one_line

__all__ = [
    "MediaInfo",
    "check_complete",
    "Orientation",
    "codec_support",
    "has_decoder",
    "has_encoder",
    "orientation_from_matrix",
    "probe",
    "video_stream",
]


# --------------------------------------------------------------------------------------------
# orientation (display matrix)


@dataclass(frozen=True)
class Orientation:
    """How to turn decoded pixels upright, as the ``ffmpeg`` command line does (autorotate).

    ``rotation`` is the display matrix's counter-clockwise angle in degrees (as
    ``VideoFrame.rotation`` and ``ffprobe`` report it), one of -90, 0, 90, 180; ``transform`` is
    the operation applied to the decoded image: ``"none"``, ``"clock"``, ``"cclock"``,
    ``"clock_flip"``, ``"cclock_flip"`` (the ``transpose`` filter's modes), ``"hflip"``,
    ``"vflip"`` or ``"hvflip"`` (180 degrees).
    """

    rotation: int = 0
    transform: str = "none"

    @property
    def swaps_axes(self) -> bool:
        return self.transform in ("clock", "cclock", "clock_flip", "cclock_flip")

    def display_size(self, width: int, height: int) -> tuple[int, int]:
        return (height, width) if self.swaps_axes else (width, height)

    def apply(self, image: np.ndarray) -> np.ndarray:
        """Apply to an (H, W, C) or (N, H, W, C) array (returns a view; not contiguous)."""
        a = 1 if image.ndim == 4 else 0  # first spatial axis
        t = self.transform
        if t == "none":
            return image
        if t == "clock":  # rotate 90 degrees clockwise
            return np.rot90(image, -1, axes=(a, a + 1))
        if t == "cclock":  # rotate 90 degrees counter-clockwise
            return np.rot90(image, 1, axes=(a, a + 1))
        if t == "cclock_flip":  # counter-clockwise + vertical flip == transpose
            return np.swapaxes(image, a, a + 1)
        if t == "clock_flip":  # clockwise + vertical flip == anti-transpose
            return np.flip(np.swapaxes(image, a, a + 1), axis=(a, a + 1))
        if t == "hflip":
            return np.flip(image, axis=a + 1)
        if t == "vflip":
            return np.flip(image, axis=a)
        if t == "hvflip":
            return np.flip(image, axis=(a, a + 1))
        raise ValueError(f"unknown transform {t!r}")


_IDENTITY = Orientation()


def orientation_from_matrix(matrix: np.ndarray | list[int] | None) -> Orientation:
    """FFmpeg's autorotate decision (``fftools/ffmpeg_filter.c``) for a 3x3 display matrix.

    ``theta = -display_rotation`` normalised to [0, 360): 90 -> ``transpose=clock`` (or
    ``cclock_flip`` when mirrored), 180 -> ``hflip``/``vflip`` by the signs of the diagonal,
    270 -> ``transpose=cclock`` (or ``clock_flip``), 0 -> ``vflip`` if mirrored vertically. Angles
    that are not multiples of 90 (FFmpeg would rotate by an arbitrary angle) snap to the nearest.
    """
    if matrix is None:
        return _IDENTITY
    m = np.asarray(matrix, dtype=np.int64).reshape(-1)
    if m.size != 9:
        return _IDENTITY
    fp = m.astype(np.float64) / 65536.0
    s0, s1 = math.hypot(fp[0], fp[3]), math.hypot(fp[1], fp[4])
    if s0 == 0.0 or s1 == 0.0:
        return _IDENTITY
    rotation = -math.degrees(math.atan2(fp[1] / s1, fp[0] / s0))  # av_display_rotation_get
    theta = -round(rotation)
    theta -= 360 * math.floor(theta / 360 + 0.9 / 360)
    quarter = int(round(theta / 90.0)) % 4
    rot = {0: 0, 1: -90, 2: 180, 3: 90}[quarter]  # counter-clockwise, as VideoFrame.rotation
    if quarter == 1:
        transform = "cclock_flip" if m[3] > 0 else "clock"
    elif quarter == 2:
        h, v = m[0] < 0, m[4] < 0
        transform = "hvflip" if h and v else "hflip" if h else "vflip" if v else "none"
    elif quarter == 3:
        transform = "clock_flip" if m[3] < 0 else "cclock"
    else:
        transform = "vflip" if m[4] < 0 else "none"
    return Orientation(rotation=rot, transform=transform)


def frame_orientation(frame: Any) -> Orientation:
    """Orientation of a decoded ``av.VideoFrame`` from its display-matrix side data."""
    try:
        side = frame.side_data
        for sd in side:
            if sd.type.name == "DISPLAYMATRIX":
                return orientation_from_matrix(np.frombuffer(bytes(sd), dtype="<i4"))
    except (AttributeError, ValueError, TypeError):  # pragma: no cover - very old PyAV
        pass
    rot = int(getattr(frame, "rotation", 0) or 0)
    if rot % 360 == 0:
        return _IDENTITY
    # av_display_rotation_set(-rot) equivalent, no flips
    r = math.radians(rot)
    c, s = math.cos(r), math.sin(r)
    mat = [round(c * 65536), round(-s * 65536), 0, round(s * 65536), round(c * 65536), 0, 0, 0, 1]
    return orientation_from_matrix(mat)


# --------------------------------------------------------------------------------------------
# codec support


@cache
def has_decoder(name: str) -> bool:
    import av

    try:
        av.codec.Codec(name, "r")
    except Exception:  # UnknownCodecError and friends
        return False
    return True


@cache
def has_encoder(name: str) -> bool:
    import av

    try:
        av.codec.Codec(name, "w")
    except Exception:
        return False
    return True


def codec_support() -> dict[str, dict[str, bool]]:
    """Which of the codecs we care about this PyAV build can decode / encode."""
    decoders = ["h264", "hevc", "vp8", "vp9", "av1", "libdav1d", "mpeg4", "mjpeg", "prores"]
    decoders += ["aac", "mp3", "opus", "vorbis", "flac", "pcm_s16le"]
    encoders = ["libx264", "h264_nvenc", "libx265", "hevc_nvenc", "libvpx-vp9", "libsvtav1"]
    encoders += ["libaom-av1", "aac", "libopus", "flac"]
    return {
        "decode": {n: has_decoder(n) for n in decoders},
        "encode": {n: has_encoder(n) for n in encoders},
    }


# --------------------------------------------------------------------------------------------
# probe


@dataclass(frozen=True)
class MediaInfo:
    """What :func:`probe` learned about a file. Sizes are display sizes (after rotation)."""

    path: Path
    format_name: str
    size_bytes: int
    duration: float | None  # seconds: the longest of the streams (or the container's)
    has_video: bool = False
    has_audio: bool = False
    # video
    width: int = 0
    height: int = 0
    coded_width: int = 0
    coded_height: int = 0
    fps: float | None = None  # average frame rate
    frame_rate: Fraction | None = None  # the same as a fraction
    num_frames: int | None = None  # decoded frames (container count, else duration * fps)
    video_duration: float | None = None
    video_codec: str | None = None
    pix_fmt: str | None = None
    rotation: int = 0  # display matrix rotation, counter-clockwise degrees
    orientation: Orientation = field(default_factory=Orientation)
    colorspace: int | None = None  # AVColorSpace of the first frame (1 = BT.709, 2 = unknown)
    color_range: int | None = None  # 1 = limited (MPEG), 2 = full (JPEG)
    # audio
    audio_codec: str | None = None
    sample_rate: int | None = None
    channels: int | None = None
    audio_duration: float | None = None

    def output_frames(self, fps: float = 25) -> int | None:
        """Estimated frame count after resampling to ``fps`` (``round(video_duration * fps)``)."""
        if self.video_duration is None:
            return None
        return int(math.floor(self.video_duration * fps + 0.5))


def video_stream(container: Any) -> Any | None:
    """The container's main video stream: the first that is not cover art (attached picture)."""
    import av

    pic = int(av.stream.Disposition.attached_pic)
    for stream in container.streams.video:
        if not int(stream.disposition) & pic:
            return stream
    return None


def _stream_duration(stream: Any, container: Any) -> float | None:
    if stream.duration is not None and stream.time_base is not None and stream.duration > 0:
        return float(stream.duration * stream.time_base)
    if container.duration is not None and container.duration > 0:
        return container.duration / 1_000_000
    return None


def open_input(path: str | os.PathLike, error: type[MediaError] = MediaError, what: str = "media"):
    """``av.open(path)`` with typed, one-line errors (missing, directory, unreadable, not media)."""
    import av

    p = Path(path)
    if not p.exists():
        raise error(f"{what} file not found: {p}")
    if not p.is_file():
        raise error(f"not a {what} file: {p} is a directory or special file")
    if p.stat().st_size == 0:
        raise error(f"{what} file is empty (0 bytes): {p}")
    try:
        return av.open(str(p), metadata_errors="ignore")
    except av.error.InvalidDataError:
        raise error(f"cannot read {p}: not a media file, or it is damaged or truncated") from None
    except (av.error.FFmpegError, OSError, ValueError, UnicodeDecodeError) as exc:
        raise error(f"cannot read {p}: {one_line(exc)}") from None


def probe(
    path: str | os.PathLike,
    *,
    error: type[MediaError] = MediaError,
    decode_first_frame: bool = True,
) -> MediaInfo:
    """Describe a media file. Raises ``error`` (a :class:`MediaError`) if it cannot be read.

    With ``decode_first_frame`` (default) the first video frame is decoded: a stream whose codec
    this build lacks, or whose data is damaged, is reported here rather than mid-pipeline.
    """
    import av

    p = Path(path)
    what = (
        "video"
        if issubclass(error, VideoError)
        else "audio"
        if issubclass(error, AudioError)
        else "media"
    )
    container = open_input(p, error, what)
    try:
        with container:
            info: dict[str, Any] = {
                "path": p,
                "format_name": container.format.name,
                "size_bytes": p.stat().st_size,
            }
            durations = []
            vs = video_stream(container)
            if vs is not None:
                cc = vs.codec_context
                if cc is None:  # a codec FFmpeg does not know at all (no decoder, no name)
                    raise error(f"the video codec in {p} is unknown to this FFmpeg build")
                info.update(
                    has_video=True,
                    coded_width=cc.width,
                    coded_height=cc.height,
                    video_codec=cc.name,
                    pix_fmt=cc.pix_fmt,
                )
                rate = vs.average_rate or vs.guessed_rate or vs.base_rate
                if rate is not None and rate > 0:
                    info["frame_rate"] = Fraction(rate)
                    info["fps"] = float(rate)
                vdur = _stream_duration(vs, container)
                info["video_duration"] = vdur
                if vdur:
                    durations.append(vdur)
                if vs.frames and vs.frames > 0:
                    info["num_frames"] = int(vs.frames)
                elif vdur and info.get("fps"):
                    info["num_frames"] = int(round(vdur * info["fps"]))
                orientation = _IDENTITY
                width, height = cc.width, cc.height
                if decode_first_frame:
                    frame = _first_frame(container, vs, p, error)
                    orientation = frame_orientation(frame)
                    width, height = frame.width, frame.height
                    info.update(
                        coded_width=width,
                        coded_height=height,
                        pix_fmt=frame.format.name,
                        colorspace=int(frame.colorspace),
                        color_range=int(frame.color_range),
                    )
                if width <= 0 or height <= 0:
                    raise error(f"video stream in {p} has no valid frame size")
                dw, dh = orientation.display_size(width, height)
                info.update(
                    width=dw, height=dh, rotation=orientation.rotation, orientation=orientation
                )
            if container.streams.audio:
                aus = container.streams.audio[0]
                acc = aus.codec_context
                adur = _stream_duration(aus, container)
                info.update(
                    has_audio=True,
                    audio_codec=acc.name,
                    sample_rate=acc.sample_rate or None,
                    channels=acc.channels or None,
                    audio_duration=adur,
                )
                if adur:
                    durations.append(adur)
            if not durations and container.duration:
                durations.append(container.duration / 1_000_000)
            info["duration"] = max(durations) if durations else None
    except MediaError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise error(f"cannot read {p}: {one_line(exc)}") from None
    return MediaInfo(**info)


def _first_frame(container: Any, stream: Any, path: Path, error: type[MediaError]) -> Any:
    import av

    name = stream.codec_context.name
    try:
        for frame in container.decode(stream):
            return frame
    except av.error.FFmpegError as exc:
        raise error(f"cannot decode the {name} video in {path}: {one_line(exc)}") from None
    raise error(f"the video stream in {path} has no decodable frames (damaged or truncated?)")


def check_complete(path: str | os.PathLike, error: type[MediaError] = MediaError) -> None:
    """Raise ``error`` if the container's sample index points past the end of the file.

    Catches MP4/MOV files whose header survived but whose media data was cut off (a truncated
    download or copy). Containers without an index are not checked here.
    """
    p = Path(path)
    size = p.stat().st_size
    container = open_input(p, error)
    with container:
        for stream in container.streams:
            if stream.type not in ("video", "audio"):
                continue
            try:
                entries = stream.index_entries
                end = max((e.pos + e.size for e in entries if e.pos >= 0), default=0)
            except (AttributeError, TypeError):  # pragma: no cover - older PyAV
                continue
            if end > size:
                missing = end - size
                raise error(
                    f"{p} is truncated: its {stream.type} data ends {missing} bytes past the end "
                    "of the file (incomplete download or copy?)"
                )
