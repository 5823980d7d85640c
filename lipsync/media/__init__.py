"""Media I/O through PyAV: probe, validate, streaming decode at 25 fps, atomic H.264/AAC encode.

* :func:`probe` -> :class:`MediaInfo`; :func:`validate_inputs` checks a job's inputs/output.
* :func:`iter_frames` -> :class:`VideoReader` yielding :class:`FrameBatch` ``(indices, frames)``,
  frames (n, H, W, 3) uint8 RGB upright, decoded ahead in a background thread.
* :class:`VideoWriter` encodes batches (+ AAC audio) in a background thread, written atomically.
* :mod:`lipsync.media.timeline`: ffmpeg ``fps``-filter resampling, ping-pong looping indices.

Names load on first use (PEP 562), except :mod:`~lipsync.media.probe`'s: ``lipsync.media.validate``
and ``probe`` import no torch, so the command line checks its inputs before the seconds of
importing the model stack.
"""

import importlib

# ``probe`` is both a submodule and a function: imported here, the function keeps the name (a
# lazy name would be shadowed by the submodule once anything imports lipsync.media.probe)
from lipsync.media.probe import (
    MediaInfo,
    Orientation,
    codec_support,
    has_decoder,
    has_encoder,
    orientation_from_matrix,
    probe,
)

# name -> submodule that defines it
_NAMES = {
    "FrameBatch": "decode",
    "VideoReader": "decode",
    "iter_frames": "decode",
    "read_frames": "decode",
    "scan_timeline": "decode",
    "OUTPUT_FORMATS": "encode",
    "VideoWriter": "encode",
    "SourceAudio": "audio_track",
    "remove_stale_partials": "partials",
    "nvenc_available": "encode",
    "select_video_encoder": "encode",
    "write_video": "encode",
    "mux_encoded": "encode",
    "FpsResampler": "timeline",
    "audio_samples_for_frames": "timeline",
    "fps_resample_indices": "timeline",
    "frames_for_audio": "timeline",
    "output_frame_indices": "timeline",
    "pingpong_indices": "timeline",
    "rescale_near": "timeline",
    "DEFAULT_MAX_DURATION_S": "validate",
    "DEFAULT_MAX_SIDE": "validate",
    "SilentAudioWarning": "validate",
    "ValidatedInputs": "validate",
    "check_complete": "validate",
    "check_output_path": "validate",
    "silent_audio_message": "validate",
    "validate_inputs": "validate",
}

__all__ = [
    "DEFAULT_MAX_DURATION_S",
    "DEFAULT_MAX_SIDE",
    "OUTPUT_FORMATS",
    "FpsResampler",
    "FrameBatch",
    "MediaInfo",
    "Orientation",
    "SilentAudioWarning",
    "SourceAudio",
    "ValidatedInputs",
    "VideoReader",
    "VideoWriter",
    "audio_samples_for_frames",
    "check_complete",
    "check_output_path",
    "codec_support",
    "fps_resample_indices",
    "frames_for_audio",
    "has_decoder",
    "has_encoder",
    "iter_frames",
    "mux_encoded",
    "nvenc_available",
    "orientation_from_matrix",
    "output_frame_indices",
    "pingpong_indices",
    "probe",
    "read_frames",
    "remove_stale_partials",
    "rescale_near",
    "scan_timeline",
    "select_video_encoder",
    "silent_audio_message",
    "validate_inputs",
    "write_video",
]


def __getattr__(name: str):
    module = _NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'lipsync.media' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"lipsync.media.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
