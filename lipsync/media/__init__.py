"""Media I/O through PyAV: probe, validate, streaming decode at 25 fps, atomic H.264/AAC encode.

* :func:`probe` -> :class:`MediaInfo`; :func:`validate_inputs` checks a job's inputs/output.
* :func:`iter_frames` -> :class:`VideoReader` yielding :class:`FrameBatch` ``(indices, frames)``,
  frames (n, H, W, 3) uint8 RGB upright, decoded ahead in a background thread.
* :class:`VideoWriter` encodes batches (+ AAC audio) in a background thread, written atomically.
* :mod:`lipsync.media.timeline`: ffmpeg ``fps``-filter resampling, ping-pong looping indices.
"""

from lipsync.media.decode import FrameBatch, VideoReader, iter_frames, read_frames, scan_timeline
from lipsync.media.encode import (
    OUTPUT_FORMATS,
    VideoWriter,
    nvenc_available,
    select_video_encoder,
    write_video,
)
from lipsync.media.probe import (
    MediaInfo,
    Orientation,
    codec_support,
    has_decoder,
    has_encoder,
    orientation_from_matrix,
    probe,
)
from lipsync.media.timeline import (
    FpsResampler,
    audio_samples_for_frames,
    fps_resample_indices,
    frames_for_audio,
    output_frame_indices,
    pingpong_indices,
    rescale_near,
)
from lipsync.media.validate import (
    DEFAULT_MAX_DURATION_S,
    DEFAULT_MAX_SIDE,
    SilentAudioWarning,
    ValidatedInputs,
    check_complete,
    check_output_path,
    validate_inputs,
)

__all__ = [
    "DEFAULT_MAX_DURATION_S",
    "DEFAULT_MAX_SIDE",
    "OUTPUT_FORMATS",
    "FpsResampler",
    "FrameBatch",
    "MediaInfo",
    "Orientation",
    "SilentAudioWarning",
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
    "nvenc_available",
    "orientation_from_matrix",
    "output_frame_indices",
    "pingpong_indices",
    "probe",
    "read_frames",
    "rescale_near",
    "scan_timeline",
    "select_video_encoder",
    "validate_inputs",
    "write_video",
]
