"""Numbers and option names the whole package agrees on (one place; imported, never re-typed).

The option types are ``Literal`` types: a type checker sees a misspelt option in code, and
:func:`lipsync.errors.check_choice` refuses a misspelt one from a user (CLI flag, API keyword,
environment variable) with one line naming the choices, which come from the same ``Literal``.
"""

from __future__ import annotations

from typing import Literal, get_args

# -- the timeline every run works on ----------------------------------------------------------

FPS = 25  # output (and model) frame rate; other rates are resampled like ffmpeg's fps filter
SAMPLE_RATE = 16000  # audio sample rate of the Whisper features (mono float32)

# -- the model's chunk --------------------------------------------------------------------------

CHUNK_FRAMES = 16  # frames per U-Net chunk (the reference's num_frames)
MAX_CHUNK_FRAMES = 24  # the motion modules' position table has 24 entries
AUDIO_TOKENS = 50  # per-frame audio window: 10 feature positions × 5 Whisper layers
AUDIO_CHANNELS = 384  # Whisper-tiny's width

# -- run defaults (the reference's) ---------------------------------------------------------------

DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 1.5
DEFAULT_SEED = 1247
DEFAULT_MIN_FACE_SIZE = 64  # pixels, short side of the face box; smaller faces are left alone

# -- option names ---------------------------------------------------------------------------------

DType = Literal["fp32", "fp16", "bf16"]
CompileMode = Literal["none", "regional", "full", "full-cudagraphs"]
# what LoadOptions.compile takes: a mode, or "auto" (precompiled artefacts when they match, else
# eager; lipsync.accel.precompiled)
CompileOption = Literal["none", "regional", "full", "full-cudagraphs", "auto"]
Mode = Literal["exact", "fast"]
SchedulerName = Literal["ddim", "dpm++"]
DetectorName = Literal["mediapipe"]  # InsightFace: see lipsync.face.detect
TemporalAttentionKind = Literal["matmul", "sdpa"]
EngineName = Literal["torch", "onnx"]  # PyTorch models, or an ONNX export on ONNX Runtime
Provider = Literal["auto", "cpu", "cuda", "tensorrt"]  # ONNX Runtime execution provider

DTYPES: tuple[DType, ...] = get_args(DType)
COMPILE_MODES: tuple[CompileMode, ...] = get_args(CompileMode)
COMPILE_OPTIONS: tuple[CompileOption, ...] = get_args(CompileOption)
MODE_NAMES: tuple[Mode, ...] = get_args(Mode)
SCHEDULERS: tuple[SchedulerName, ...] = get_args(SchedulerName)
DETECTORS: tuple[DetectorName, ...] = get_args(DetectorName)
TEMPORAL_ATTENTION_KINDS: tuple[TemporalAttentionKind, ...] = get_args(TemporalAttentionKind)

#: output file extension -> libavformat muxer name (what ``lipsync run -o`` may write)
OUTPUT_FORMATS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska"}
ENGINES: tuple[EngineName, ...] = get_args(EngineName)
PROVIDERS: tuple[Provider, ...] = get_args(Provider)
