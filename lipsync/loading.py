"""Load a preset's models: one function (:func:`load_models`), one options type
(:class:`~lipsync.config.LoadOptions`), one default policy.

Every caller loads through here: ``lipsync run``, ``app``, ``bench``, ``profile`` and ``check``,
:meth:`lipsync.api.LipSync.from_pretrained`, the job-service workers (``--runner engine``), the
Triton server and the benchmarks.

Default policy (a ``None`` option):

* **device**: ``cuda`` when torch sees a GPU, else ``cpu``. Asking for ``cuda`` without one is
  a :class:`~lipsync.errors.ConfigError`.
* **dtype** of the U-Net and VAE: ``fp16`` on CUDA (the reference's inference dtype), ``fp32``
  on the CPU (half precision on a CPU is slow and inexact: asking for ``fp16`` there works but
  warns). The Whisper encoder always runs in fp32.
* **CPU threads** (models on the CPU): all cores but one, which is left to the decoder and
  encoder threads that run beside the model. A server without media threads (Triton) passes
  ``cpu_threads=os.cpu_count()``.
* **compile** ``none``; **fp8** off; checkpoints from ``$LIPSYNC_HOME`` (``~/.cache/lipsync``).

Own models (:mod:`lipsync.own_checkpoints`): a bundle preset (``demo``) loads U-Net, VAE and
audio encoder from its bundle folder (:func:`lipsync.config.bundle_dir`: ``LoadOptions.bundle_dir``,
else ``$LIPSYNC_DEMO_BUNDLE``, else the one shipped in ``lipsync/weights/demo``), with the
resolution and chunk length its manifest records. ``LoadOptions.unet`` replaces any preset's
U-Net with one of ours (``lipsync run --unet PATH``) once :func:`check_unet_fits` has checked,
from its config alone, that it fits the preset; the preset's official U-Net is then not needed.

``fp8`` converts the U-Net's big linear layers (:mod:`lipsync.accel.fp8`; needs a CUDA GPU of
compute capability ≥ 8.9 and a bf16/fp16 model, checked before the minutes of loading);
``compile`` compiles the U-Net in that mode and the VAE's encoder and decoder regionally
(:mod:`lipsync.accel.compile`), after the FP8 conversion.

Precompiled artefacts (:mod:`lipsync.accel.precompiled`, built by ``lipsync warmup``): with
compilation on, a matching artefact is hot-loaded first, so compiling finds its code in the
caches. ``compile="auto"`` compiles only from a matching artefact (in its compile mode) and runs
eagerly otherwise, with one warning when artefacts exist but were built for something else.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from lipsync.accel import compile as accel_compile
from lipsync.accel import precompiled
from lipsync.accel.fp8 import convert_unet_to_fp8, has_fp8, require_fp8_device
from lipsync.audio import AudioEncoder
from lipsync.checkpoints import load_unet, load_vae, read_whisper_checkpoint, require_checkpoints
from lipsync.config import LoadOptions, Preset, bundle_dir, bundle_env_var
from lipsync.constants import DTYPES, CompileMode, DType
from lipsync.errors import CheckpointNotFoundError, ConfigError, check_choice
from lipsync.models.unet import UNet3D, UNetConfig, random_unet
from lipsync.models.vae import SD_VAE_FT_MSE_CONFIG, TINY_VAE_CONFIG, Vae, random_vae
from lipsync.models.whisper import random_whisper_encoder
from lipsync.own_checkpoints import (
    MANIFEST,
    OwnUNetInfo,
    bundle_denoise_defaults,
    load_bundle,
    load_own_unet,
    own_unet_info,
    read_manifest,
)

log = logging.getLogger(__name__)

# fp16 on the CPU computes the right thing (fp16 numerics can be checked there) but slowly:
# docs/NOTES.md, "fp16 on the CPU"
CPU_FP16_WARNING = (
    "fp16 on the CPU is slow (6-9x slower than fp32 in lipsync bench, tiny preset) and less "
    "exact; use --dtype fp32, the CPU default, unless you are checking fp16 numerics"
)

__all__ = [
    "CPU_FP16_WARNING",
    "TORCH_DTYPES",
    "LoadOptions",
    "ModelBundle",
    "check_unet_fits",
    "compile_models",
    "default_cpu_threads",
    "dtype_name",
    "load_models",
    "parse_dtype",
    "require_bundle",
    "resolve_device",
    "resolve_dtype",
]

TORCH_DTYPES: dict[DType, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"fp16"`` (any case) or a torch dtype -> the torch dtype; ConfigError otherwise."""
    if isinstance(name, torch.dtype):
        return name
    return TORCH_DTYPES[check_choice("dtype", str(name).lower(), DTYPES)]


def dtype_name(dtype: str | torch.dtype | None) -> DType | None:
    """The option name (``"fp16"``…) of a dtype given as a name or a torch dtype."""
    if dtype is None:
        return None
    wanted = parse_dtype(dtype)
    return next(name for name, value in TORCH_DTYPES.items() if value == wanted)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The policy's device: ``device`` if given (CUDA must be there), else CUDA when present."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but no CUDA GPU is available")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The policy's dtype: ``dtype`` if given, else fp16 on CUDA and fp32 on the CPU."""
    if dtype is not None:
        return parse_dtype(dtype)
    return torch.float16 if device.type == "cuda" else torch.float32


def default_cpu_threads() -> int:
    """All cores but one (at least one)."""
    return max(1, (os.cpu_count() or 2) - 1)


@dataclass
class ModelBundle:
    """Everything a preset runs: U-Net and VAE (in ``dtype``), the Whisper encoder, where."""

    preset: Preset
    unet: UNet3D
    vae: Vae
    audio: AudioEncoder
    device: torch.device
    dtype: torch.dtype
    load_seconds: float
    options: LoadOptions | None = None  # what it was loaded with
    compile_mode: CompileMode = "none"  # set by compile_models
    # the precompiled artefact loaded (None: none), and whether only what it covers may run
    # compiled (compile="auto": anything else runs eagerly)
    precompiled: precompiled.Artefact | None = None
    precompiled_only: bool = False
    notes: list[str] = field(default_factory=list)  # warnings of the loading, for reports
    fingerprint: str = ""  # the models' architecture (precompiled.model_fingerprint), as loaded
    # denoising settings the U-Net's bundle asks for (a few-step student: its steps, guidance,
    # scheduler; own_checkpoints.bundle_denoise_defaults); {} for every other model
    denoise_defaults: dict[str, Any] = field(default_factory=dict)

    @property
    def random_weights(self) -> bool:
        return self.preset.random_weights or bool(self.options and self.options.random_weights)

    @property
    def fp8(self) -> bool:
        """The U-Net's big linear layers run in FP8."""
        return has_fp8(self.unet)

    @property
    def compiled(self) -> bool:
        """The U-Net and VAE were handed to ``torch.compile``."""
        return self.compile_mode != "none"


def load_models(options: LoadOptions | str | Preset = "v1.6", **fields) -> ModelBundle:
    """Load the models ``options`` name, following the module's default policy.

    ``options``: a :class:`LoadOptions`, or a preset (name or :class:`Preset`) with the other
    :class:`LoadOptions` fields as keywords: ``load_models("tiny")``,
    ``load_models("v1.6", dtype="bf16", compile="regional")``.
    """
    if not isinstance(options, LoadOptions):
        options = LoadOptions(preset=options)
    if "dtype" in fields:
        fields["dtype"] = dtype_name(fields["dtype"])
    if "device" in fields and fields["device"] is not None:
        fields["device"] = str(fields["device"])
    options = replace(options, **fields)
    options.validate()
    preset = options.resolve_preset()
    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    if device.type == "cpu":
        torch.set_num_threads(options.cpu_threads or default_cpu_threads())
    if options.fp8:  # before the minutes of loading
        require_fp8_device(device)
        if dtype not in (torch.bfloat16, torch.float16):
            raise ConfigError("--fp8 needs --dtype bf16 or fp16")
    # everything that can be checked without weights, before the minutes of loading
    folder = require_bundle(preset, options.bundle_dir) if preset.bundle is not None else None
    unet_config = preset.unet_config
    # denoising settings the U-Net's bundle asks for: the --unet bundle's, else the preset's
    denoise_defaults: dict[str, Any] = {}
    if folder is not None:
        manifest = read_manifest(folder)
        preset = replace(
            preset, resolution=int(manifest["resolution"]), num_frames=int(manifest["num_frames"])
        )
        unet_config = manifest["unet"]["config"]
        denoise_defaults = bundle_denoise_defaults(manifest)
    if options.unet is not None:
        unet_info = own_unet_info(options.unet)
        check_unet_fits(unet_info, unet_config, preset, options.unet)
        denoise_defaults = unet_info.denoise
    start = time.perf_counter()
    own_unet = None if options.unet is None else load_own_unet(options.unet, device, dtype)
    if folder is not None:
        own = load_bundle(folder, device=device, dtype=dtype)
        unet = own.unet if own_unet is None else own_unet
        vae, audio = own.vae, own.audio
    elif preset.random_weights or options.random_weights:
        vae_config = TINY_VAE_CONFIG if preset.random_weights else SD_VAE_FT_MSE_CONFIG
        unet = own_unet
        if unet is None:
            unet = random_unet(preset.unet_config, seed=0, device=device, dtype=dtype)
        vae = random_vae(vae_config, seed=0, device=device, dtype=dtype)
        audio = AudioEncoder(random_whisper_encoder(seed=0), device=device)
    else:
        parts = ("whisper", "vae") if own_unet is not None else ("unet", "whisper", "vae")
        paths = require_checkpoints(preset, options.root, parts)
        unet = own_unet
        if unet is None:
            unet = load_unet(paths["unet"], preset.unet_config, device=device, dtype=dtype)
        vae = load_vae(paths["vae"], device=device, dtype=dtype)
        audio = AudioEncoder(read_whisper_checkpoint(paths["whisper"]), device=device)
    seconds = time.perf_counter() - start
    bundle = ModelBundle(preset, unet, vae, audio, device, dtype, seconds, options)
    bundle.denoise_defaults = denoise_defaults
    if device.type == "cpu" and dtype == torch.float16:
        bundle.notes.append(CPU_FP16_WARNING)
        log.warning(CPU_FP16_WARNING)
    if options.fp8:
        convert_unet_to_fp8(bundle.unet)
    bundle.fingerprint = precompiled.model_fingerprint(bundle.unet, bundle.vae)  # not compiled yet
    compile_models(bundle, _use_precompiled(bundle, options))
    return bundle


def _use_precompiled(bundle: ModelBundle, options: LoadOptions) -> CompileMode:
    """Load the artefact that matches ``bundle`` (if any); the compile mode to apply."""
    if options.compile == "none":
        return "none"
    auto = options.compile == "auto"
    key = precompiled.artefact_key(
        bundle.preset.name, bundle.device, dtype_name(bundle.dtype),
        "regional" if auto else options.compile, options.fp8, bundle.preset.num_frames,
        bundle.fingerprint,
    )  # fmt: skip
    match, others = precompiled.find(
        key, precompiled.compiled_dirs(options.compiled_dir), any_compile=auto
    )
    if match is not None:
        try:
            precompiled.load(match)
        except ConfigError as exc:
            match = None
            others = []
            bundle.notes.append(f"{exc}; " + ("running eagerly" if auto else "compiling now"))
            log.warning(bundle.notes[-1])
    if match is not None:
        bundle.precompiled = match
        bundle.precompiled_only = auto
        return match.key.compile if auto else options.compile
    if not auto:
        return options.compile  # compile now (minutes on a GPU; `lipsync warmup` saves them)
    if others:
        bundle.notes.append(precompiled.mismatch_message(key, others))
        log.warning(bundle.notes[-1])
    return "none"


def require_bundle(preset: Preset, override: str | os.PathLike | None = None) -> Path:
    """The bundle folder of bundle preset ``preset`` (:func:`lipsync.config.bundle_dir`), or one
    clear error saying it is not there."""
    folder = bundle_dir(preset, override)
    if not (folder / MANIFEST).is_file():
        where = "given" if override else f"from ${bundle_env_var(preset)}"
        if not override and not os.environ.get(bundle_env_var(preset)):
            where = "shipped with lipsync"
        raise CheckpointNotFoundError(
            f"the {preset.name} preset's model bundle is missing: {folder} ({where}) has no "
            f"{MANIFEST}; install a lipsync that ships it, or point ${bundle_env_var(preset)} "
            "at a bundle folder (docs/TRAINING.md)"
        )
    return folder


def check_unet_fits(
    info: OwnUNetInfo,
    preset_unet_config: dict[str, Any],
    preset: Preset,
    source: str | os.PathLike = "the U-Net",
) -> None:
    """ConfigError, naming every mismatch, unless an own U-Net (``info``: its config and
    training resolution) can take the place of ``preset``'s: the same input, output and audio
    channels, trained at the preset's face size (when recorded), latents its down blocks can
    halve, and motion modules that take the preset's chunk length."""
    try:
        ours = UNetConfig.from_dict(dict(info.config))
    except ConfigError as e:
        raise ConfigError(f"--unet {source}: its config is not a U-Net config: {e}") from None
    theirs = UNetConfig.from_dict(dict(preset_unet_config))
    problems = [
        f"{name} {getattr(ours, name)} (the preset's: {getattr(theirs, name)})"
        for name in ("in_channels", "out_channels", "cross_attention_dim")
        if getattr(ours, name) != getattr(theirs, name)
    ]
    if info.resolution is not None and info.resolution != preset.resolution:
        problems.append(f"trained at {info.resolution} px (the preset's faces: "
                        f"{preset.resolution} px)")  # fmt: skip
    factor = 2 ** (len(ours.down_block_types) - 1)
    if preset.latent_size % factor:
        problems.append(
            f"{len(ours.down_block_types)} down blocks need latents divisible by {factor} "
            f"(the preset's: {preset.latent_size})"
        )
    max_len = ours.motion_module_kwargs.temporal_position_encoding_max_len
    if ours.use_motion_module and max_len < preset.num_frames:
        problems.append(f"motion modules of at most {max_len} frames (the preset's chunks: "
                        f"{preset.num_frames})")  # fmt: skip
    if problems:
        raise ConfigError(
            f"--unet {source} does not fit the {preset.name} preset: {'; '.join(problems)}; "
            "choose the preset it was trained for (lipsync presets lists their sizes)"
        )


def compile_models(bundle: ModelBundle, mode: CompileMode) -> None:
    """Compile ``bundle``'s U-Net in ``mode`` (``bundle.unet`` becomes what
    :func:`~lipsync.accel.compile.compile_unet` returns) and, unless ``mode`` is ``none``, the
    VAE's encoder and decoder regionally. Compilation itself happens at the first call."""
    if mode == "none":
        return
    bundle.compile_mode = mode
    bundle.unet = accel_compile.compile_unet(bundle.unet, mode)
    accel_compile.compile_vae(bundle.vae, "regional")
