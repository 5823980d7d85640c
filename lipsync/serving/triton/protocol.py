"""The wire format between :mod:`.server` and :mod:`.client` (both import it; nothing else).

Two models (docs/TRITON.md):

``audio_features`` (no batching) -- Whisper features of one 30 s encoder window:

* ``waveform`` FP32 ``(n,)``: the 16 kHz samples the window's STFT frames read, already
  reflect-padded at the clip's ends (:func:`lipsync.audio.stft_segment`):
  ``n = 160 (frames - 1) + 400``;
* ``log_mel_max`` FP32 ``(1,)``: the clip's largest log10 mel power
  (:func:`lipsync.audio.clip_log_mel_max`); Whisper floors the log-mel at ``max - 8`` over the
  *whole* clip, so a window alone cannot know it. NaN: use this segment's own maximum (right
  when the segment is the whole clip, <= 30 s);
* -> ``features`` FP32 ``(frames // 2, 5, 384)``: exactly what
  :meth:`lipsync.audio.AudioEncoder.features` gives for those positions.

``lipsync`` (dynamic batching) -- one chunk of aligned faces -> the same faces, mouth redrawn
(:class:`ChunkRequest`):

* ``faces`` UINT8 ``(k, 3, r, r)``: the 8-bit levels of the faces; the server maps them to
  ``[-1, 1]`` with :func:`lipsync.face.align.levels_to_unit_table`, the table the local
  pipeline's :func:`~lipsync.face.align.crops_to_model_input` uses, so they are bit-identical
  (and 4x smaller than FP32, 2x smaller than FP16);
* ``windows`` FP32 ``(k, 50, 384)``; ``mask`` FP32 ``(r, r)`` (1 = keep);
* ``seed``, ``chunk_index`` INT64 ``(1,)``; ``options`` BYTES ``(1,)``: the
  :class:`~lipsync.diffusion.DenoiseOptions` fields that differ from their defaults, as JSON
  (``{"steps": 20}``; every field, so fast modes travel too);
* -> ``faces_out`` ``(k, 3, r, r)`` in ``[-1, 1]``: FP16 when the server computes in fp16 (the
  VAE decodes in fp16, so nothing is lost), else FP32.

The server publishes what a client needs to know as model-config parameters ``lipsync_<name>``
(:func:`read_parameters`): preset, dtype, device, resolution, fp8, audio_window_frames, n_mels.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, fields

import numpy as np
import torch

from lipsync.constants import AUDIO_CHANNELS, AUDIO_TOKENS
from lipsync.diffusion import DenoiseOptions
from lipsync.errors import ConfigError
from lipsync.face.align import levels_to_unit_table

__all__ = [
    "ACCESS_HEADER",
    "ACCESS_TOKEN_ENV",
    "AUDIO_CHANNELS",
    "AUDIO_MODEL",
    "AUDIO_TOKENS",
    "LIPSYNC_MODEL",
    "NP_OF_TORCH",
    "NP_OF_TRITON",
    "PARAM_PREFIX",
    "TRITON_OF_NP",
    "ChunkRequest",
    "check_chunk",
    "faces_to_levels",
    "options_from_json",
    "options_to_json",
    "read_parameters",
    "triton_dtype",
]

LIPSYNC_MODEL = "lipsync"
AUDIO_MODEL = "audio_features"
ACCESS_TOKEN_ENV = "LIPSYNC_TRITON_ACCESS_TOKEN"  # server and clients: shared-memory access
ACCESS_HEADER = "triton-access-token"  # PyTriton's header for its restricted endpoints
PARAM_PREFIX = "lipsync_"  # model-config parameters the client reads (preset, dtype, ...)

NP_OF_TORCH = {torch.uint8: np.uint8, torch.float16: np.float16, torch.float32: np.float32}
TRITON_OF_NP = {np.uint8: "UINT8", np.float16: "FP16", np.float32: "FP32"}
NP_OF_TRITON = {"TYPE_FP16": np.float16, "TYPE_FP32": np.float32, "FP16": np.float16,
                "FP32": np.float32}  # fmt: skip
_SCALAR_TYPES = {"int64": "INT64", "int32": "INT32", "float32": "FP32", "bool": "BOOL"}


def triton_dtype(dtype: np.dtype) -> str:
    """Triton's name of a numpy dtype (``BYTES`` for object arrays)."""
    dtype = np.dtype(dtype)
    if dtype == np.object_:
        return "BYTES"
    return TRITON_OF_NP.get(dtype.type) or _SCALAR_TYPES[dtype.name]


# -- faces ------------------------------------------------------------------------------------


def faces_to_levels(faces: torch.Tensor) -> torch.Tensor | None:
    """(k, 3, r, r) float faces -> uint8 levels, or None when they are not exactly 8-bit levels
    (then they cannot travel as UINT8 without changing the result)."""
    f = faces.detach().float()
    levels = ((f * 0.5 + 0.5) * 255.0).round_().clamp_(0, 255).to(torch.uint8)
    table = levels_to_unit_table().to(f.device)
    if not torch.equal(table[levels.long()], f):
        return None
    return levels


# -- denoising options --------------------------------------------------------------------------


def options_to_json(options: DenoiseOptions) -> bytes:
    """The options that differ from the defaults, as JSON: a server that predates a new option
    still serves every request that leaves it at its default."""
    default = DenoiseOptions()
    changed = {
        f.name: getattr(options, f.name)
        for f in fields(DenoiseOptions)
        if getattr(options, f.name) != getattr(default, f.name)
    }
    return json.dumps(changed, sort_keys=True).encode()


def options_from_json(raw) -> DenoiseOptions:
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    try:
        values = json.loads(text or "{}")
    except json.JSONDecodeError as exc:
        raise ConfigError(f"bad denoise options {text[:80]!r}: {exc}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"denoise options must be a JSON object, got {text[:80]!r}")
    unknown = sorted(set(values) - {f.name for f in fields(DenoiseOptions)})
    if unknown:
        raise ConfigError(
            f"this server does not know the denoise option(s) {', '.join(unknown)}; update it"
        )
    options = DenoiseOptions(**values)
    options.validate()
    return options


# -- one chunk ----------------------------------------------------------------------------------


@dataclass
class ChunkRequest:
    """One ``lipsync`` request: a chunk of faces as 8-bit levels, its audio windows and mask,
    where its randomness comes from, and the denoising options."""

    levels: torch.Tensor  # (k, 3, r, r) uint8
    windows: torch.Tensor  # (k, 50, 384) float32
    mask: torch.Tensor  # (r, r) float32, 1 = keep
    seed: int
    chunk_index: int
    options: DenoiseOptions

    def tensors(self) -> dict[str, torch.Tensor]:
        """The large inputs, batch dimension first (what may travel through shared memory)."""
        return {
            "faces": self.levels[None],
            "windows": self.windows.detach().to(torch.float32)[None],
            "mask": self.mask.detach().to(torch.float32)[None],
        }

    def scalars(self) -> dict[str, np.ndarray]:
        """The small inputs, batch dimension first."""
        return {
            "seed": np.array([[int(self.seed)]], dtype=np.int64),
            "chunk_index": np.array([[int(self.chunk_index)]], dtype=np.int64),
            "options": np.array([[options_to_json(self.options)]], dtype=np.object_),
        }

    def output_shape(self) -> tuple[int, ...]:
        return (1, *self.levels.shape)


def check_chunk(faces, windows, mask, resolution: int, max_frames: int) -> None:
    """ValueError unless faces (k, 3, r, r), windows (k, 50, 384), mask (r, r), 1 <= k."""
    r, k = resolution, faces.shape[0]
    if tuple(faces.shape) != (k, 3, r, r) or not 1 <= k <= max_frames:
        raise ValueError(f"faces must be (1..{max_frames}, 3, {r}, {r}), got {tuple(faces.shape)}")
    if tuple(windows.shape) != (k, AUDIO_TOKENS, AUDIO_CHANNELS):
        raise ValueError(
            f"windows must be ({k}, {AUDIO_TOKENS}, {AUDIO_CHANNELS}), got {tuple(windows.shape)}"
        )
    if tuple(mask.shape) != (r, r):
        raise ValueError(f"mask must be ({r}, {r}), got {tuple(mask.shape)}")


# -- model parameters ---------------------------------------------------------------------------


def read_parameters(config: Mapping) -> dict[str, str]:
    """The ``lipsync_*`` parameters of a model config (as Triton's client returns it), without
    the prefix."""
    return {
        k.removeprefix(PARAM_PREFIX): (v.get("string_value") if isinstance(v, dict) else v)
        for k, v in (config.get("parameters") or {}).items()
    }
