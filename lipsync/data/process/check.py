"""Step 1: drop broken inputs, with a reason code a person can act on.

In order (the first failure is the reason recorded):

=====================  ===============================================================
``empty_file``         zero bytes
``unreadable``         not a media file, damaged header, unreadable
``unsupported_codec``  the video codec is unknown to this FFmpeg build, or it has no decoder
``no_video``           no video stream (audio-only file, cover art only)
``no_audio``           no audio stream
``undecodable``        the first video frame cannot be decoded (damaged data, odd stream)
``too_large``          a side over ``max_side`` pixels (8K by default)
``too_long``           longer than ``max_duration_s`` (from the header; nothing is decoded)
``truncated``          the container's sample index points past the end of the file
``corrupt``            damaged packets during the full decode (``strict_decode``), or
                       decoding failed part way
``too_short``          fewer decodable seconds (video and audio both) than one segment needs
=====================  ===============================================================

The full decode check decodes every video and audio packet (no colour conversion, so it costs a
fraction of the real decode in step 2) and keeps nothing: memory is one frame.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lipsync.data.process.options import ProcessOptions
from lipsync.errors import MediaError, one_line
from lipsync.media import check_complete, probe
from lipsync.media.probe import has_decoder, open_input, video_stream

__all__ = ["CheckResult", "check_input"]


@dataclass
class CheckResult:
    ok: bool
    reason: str | None = None
    message: str | None = None
    stats: dict = field(default_factory=dict)


def _drop(reason: str, message: str, stats: dict | None = None) -> CheckResult:
    return CheckResult(False, reason, message, stats or {})


def _full_decode(path: Path, strict: bool) -> tuple[int, float, int, float, int]:
    """Decode everything: (video frames, last video time s, audio samples, audio s, errors)."""
    import av

    errors = 0
    frames, samples = 0, 0
    v_end, a_end = 0.0, 0.0
    with open_input(path) as container:
        vs = video_stream(container)
        aus = container.streams.audio[0] if container.streams.audio else None
        streams = [s for s in (vs, aus) if s is not None]
        if vs is not None:
            vs.thread_type = "AUTO"
        for packet in container.demux(*streams):
            try:
                decoded = packet.decode()
            except av.error.InvalidDataError:
                errors += 1
                if strict:
                    return frames, v_end, samples, a_end, errors
                continue
            for frame in decoded:
                t = float(frame.time) if frame.time is not None else None
                if packet.stream is vs:
                    frames += 1
                    if t is not None:
                        v_end = max(v_end, t)
                else:
                    samples += frame.samples
                    if t is not None:
                        a_end = max(a_end, t + frame.samples / max(frame.sample_rate, 1))
    return frames, v_end, samples, a_end, errors


def _codec_problem(path: Path) -> str | None:
    """Why the main video stream's codec cannot be decoded here, or None."""
    with open_input(path) as container:
        vs = video_stream(container)
        if vs is None:
            return None
        cc = vs.codec_context
        if cc is None or not cc.name or cc.name == "none":
            tag = getattr(vs, "codec_tag", None) or "?"
            return f"the video codec (tag {tag!r}) is unknown to this FFmpeg build"
        if not has_decoder(cc.name):
            return f"this FFmpeg build has no decoder for {cc.name} video"
    return None


def check_input(path: str | Path, options: ProcessOptions) -> CheckResult:
    """Run the checks in the module docstring on one file."""
    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as exc:
        return _drop("unreadable", f"cannot stat {p.name}: {one_line(exc)}")
    if size == 0:
        return _drop("empty_file", "the file is empty (0 bytes)")
    try:
        problem = _codec_problem(p)
    except MediaError as exc:
        return _drop("unreadable", str(exc))
    except Exception as exc:  # anything FFmpeg chokes on while opening
        return _drop("unreadable", f"cannot read {p.name}: {one_line(exc)}")
    if problem:
        return _drop("unsupported_codec", problem)
    try:
        info = probe(p, decode_first_frame=False)
    except MediaError as exc:
        return _drop("unreadable", str(exc))
    stats: dict = {
        "bytes": size,
        "format": info.format_name,
        "duration": None if info.duration is None else round(info.duration, 3),
    }
    if not info.has_video:
        return _drop("no_video", "no video stream", stats)
    if not info.has_audio:
        return _drop("no_audio", "no audio stream", stats)
    try:
        info = probe(p, decode_first_frame=True)
    except MediaError as exc:
        return _drop("undecodable", str(exc), stats)
    stats.update(
        width=info.width,
        height=info.height,
        fps=None if info.fps is None else round(info.fps, 3),
        video_codec=info.video_codec,
        audio_codec=info.audio_codec,
        sample_rate=info.sample_rate,
        channels=info.channels,
        rotation=info.rotation,
    )
    if max(info.width, info.height) > options.max_side:
        return _drop(
            "too_large",
            f"{info.width}x{info.height} is over the {options.max_side}-pixel limit (--max-side)",
            stats,
        )
    if info.duration is not None and info.duration > options.max_duration_s:
        return _drop(
            "too_long",
            f"{info.duration / 3600:.2f} h is over the {options.max_duration_s:.0f} s limit "
            "(--max-duration)",
            stats,
        )
    try:
        check_complete(p)
    except MediaError as exc:
        return _drop("truncated", str(exc), stats)
    try:
        frames, v_end, samples, a_end, errors = _full_decode(p, options.strict_decode)
    except Exception as exc:  # FFmpeg errors other than damaged packets: unusable file
        return _drop("corrupt", f"decoding failed: {one_line(exc)}", stats)
    stats.update(decoded_frames=frames, decode_errors=errors)
    if errors and options.strict_decode:
        return _drop("corrupt", f"damaged packet(s) in the file ({errors} seen)", stats)
    usable = min(v_end + 1.0 / max(info.fps or 25.0, 1.0), a_end)
    stats["usable_seconds"] = round(usable, 3)
    if frames == 0:
        return _drop("corrupt", "no video frame could be decoded", stats)
    if samples == 0:
        return _drop("corrupt", "no audio sample could be decoded", stats)
    if usable < options.min_seconds:
        return _drop(
            "too_short",
            f"{usable:.2f} s of video with audio, under the {options.min_seconds:g} s a segment "
            "needs",
            stats,
        )
    return CheckResult(True, stats=stats)
