"""Model presets, where their files live, and how to load them (:class:`LoadOptions`).

A preset names everything a run needs: the U-Net architecture, the face resolution, and where the
weights come from: the official checkpoints (``v1.6``, ``v1.5``, downloaded), seeded random
weights (``tiny``, a small model for smoke tests: it runs the whole pipeline in seconds on a CPU
and produces meaningless mouths), or one of our own bundles shipped in ``lipsync/weights``
(``demo``, format ``lipsync.bundle/1``, :mod:`lipsync.own_checkpoints`).

This module imports no torch: the job API and the command line read it without loading a model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from lipsync.constants import (
    CHUNK_FRAMES,
    COMPILE_OPTIONS,
    DTYPES,
    PROVIDERS,
    CompileOption,
    DType,
    Provider,
)
from lipsync.errors import ConfigError, check_choice

VAE_REPO = "stabilityai/sd-vae-ft-mse"
VAE_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
UNET_FILE = "latentsync_unet.pt"
WHISPER_FILE = "whisper/tiny.pt"


@cache
def load_packaged_config(name: str) -> dict[str, Any]:
    """A JSON config shipped in ``lipsync/configs`` (e.g. ``unet_stage2_512_config.json``)."""
    try:
        text = resources.files("lipsync.configs").joinpath(name).read_text()
    except FileNotFoundError as e:
        raise ConfigError(f"no packaged config named {name!r}") from e
    return json.loads(text)


@dataclass(frozen=True)
class Preset:
    """Everything that identifies one model version."""

    name: str
    resolution: int  # aligned face crop size in pixels (latent = resolution / 8)
    unet_config_file: str
    hf_repo: str | None  # Hugging Face repo with latentsync_unet.pt and whisper/tiny.pt
    random_weights: bool = False
    num_frames: int = CHUNK_FRAMES  # frames per U-Net chunk
    description: str = ""
    aliases: tuple[str, ...] = field(default=())
    # An own bundle shipped in lipsync/weights/<bundle>/ (manifest.json + shards): U-Net, VAE,
    # audio encoder, resolution and num_frames all come from its manifest (bundle_dir()).
    bundle: str | None = None

    @property
    def unet_config(self) -> dict[str, Any]:
        return load_packaged_config(self.unet_config_file)

    @property
    def latent_size(self) -> int:
        return self.resolution // 8


PRESETS: dict[str, Preset] = {
    "v1.6": Preset(
        name="v1.6",
        resolution=512,
        unet_config_file="unet_stage2_512_config.json",
        hf_repo="ByteDance/LatentSync-1.6",
        description="LatentSync 1.6: 512 px faces (best quality)",
        aliases=("1.6", "16"),
    ),
    "v1.5": Preset(
        name="v1.5",
        resolution=256,
        unet_config_file="unet_stage2_config.json",
        hf_repo="ByteDance/LatentSync-1.5",
        description="LatentSync 1.5: 256 px faces (faster)",
        aliases=("1.5", "15"),
    ),
    "tiny": Preset(
        name="tiny",
        resolution=128,
        unet_config_file="unet_tiny_config.json",
        hf_repo=None,
        random_weights=True,
        description="small random-weight model for smoke tests; produces meaningless mouths",
    ),
    "demo": Preset(
        name="demo",
        resolution=256,
        unet_config_file="train/unet_demo_256_config.json",
        hf_repo=None,
        bundle="demo",
        description="our small model trained on the synthetic corpus (shipped with lipsync; "
        "lip-syncs the synthetic demo faces)",
    ),
}


def get_preset(name: str) -> Preset:
    """Look a preset up by name or alias (``v1.6``, ``1.6``, ``v1.5``, ``tiny``)."""
    key = name.strip().lower()
    for preset in PRESETS.values():
        if key == preset.name or key in preset.aliases:
            return preset
    raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")


def bundle_env_var(preset: Preset) -> str:
    """The environment variable that points a bundle preset elsewhere: ``LIPSYNC_DEMO_BUNDLE``."""
    return f"LIPSYNC_{preset.name.upper().replace('.', '_')}_BUNDLE"


def bundle_dir(preset: Preset, override: str | os.PathLike | None = None) -> Path:
    """The bundle folder of a bundle preset: ``override`` (``LoadOptions.bundle_dir``), else
    ``$LIPSYNC_DEMO_BUNDLE`` (:func:`bundle_env_var`), else the one shipped in
    ``lipsync/weights/<name>/``. ConfigError for a preset without a bundle."""
    if preset.bundle is None:
        raise ConfigError(f"preset {preset.name!r} is not an own bundle (no bundle folder)")
    chosen = override or os.environ.get(bundle_env_var(preset))
    if chosen:
        return Path(chosen).expanduser()
    return Path(str(resources.files("lipsync.weights").joinpath(preset.bundle)))


def cache_dir() -> Path:
    """Where downloaded checkpoints live: ``$LIPSYNC_HOME``, else ``~/.cache/lipsync``."""
    root = os.environ.get("LIPSYNC_HOME")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "lipsync"


@dataclass(frozen=True)
class LoadOptions:
    """How to load a preset's models: what :func:`lipsync.loading.load_models` takes, and what
    every caller builds (``lipsync run/app/bench/profile/check``, :class:`lipsync.api.LipSync`,
    the job-service workers, the Triton server, the benchmarks).

    ``None`` fields follow the default policy of :mod:`lipsync.loading`: the device is CUDA when
    torch sees a GPU, else the CPU; the dtype fp16 on CUDA, fp32 on the CPU; on the CPU torch
    uses all cores but one.
    """

    preset: str | Preset = "v1.6"  # a name or alias of PRESETS, or a Preset
    device: str | None = None  # "cuda", "cuda:1", "cpu"
    dtype: DType | None = None  # of the U-Net and VAE (Whisper always runs in fp32)
    checkpoint_dir: str | os.PathLike | None = None  # default: cache_dir()
    cpu_threads: int | None = None  # torch threads when the models run on the CPU
    # torch.compile the U-Net (and the VAE when not "none"); "auto": compiled only from matching
    # precompiled artefacts (lipsync warmup), else eager (one warning when some do not match)
    compile: CompileOption = "none"
    fp8: bool = False  # FP8 matmuls in the U-Net's big linear layers (CUDA, capability >= 8.9)
    random_weights: bool = False  # the preset's architecture with seeded random weights
    # precompiled artefacts: looked for here first (default $LIPSYNC_COMPILED_DIR), then in
    # $LIPSYNC_HOME/compiled
    compiled_dir: str | os.PathLike | None = None
    # One of our own U-Nets replacing the preset's (lipsync.own_checkpoints.load_own_unet): a
    # bundle folder, a training checkpoint folder, or a .safetensors file with config metadata.
    unet: str | os.PathLike | None = None
    # A bundle preset's folder (default: $LIPSYNC_DEMO_BUNDLE, else the shipped one; bundle_dir)
    bundle_dir: str | os.PathLike | None = None

    def validate(self) -> None:
        """ConfigError for an unknown preset, dtype or compile mode, a bad thread count, or an
        option the preset cannot take."""
        preset = self.resolve_preset()
        if self.dtype is not None:
            check_choice("dtype", str(self.dtype).lower(), DTYPES)
        check_choice("compile mode", self.compile, COMPILE_OPTIONS)
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ConfigError(f"cpu_threads must be at least 1, got {self.cpu_threads}")
        if preset.bundle is not None and self.random_weights:
            raise ConfigError(
                f"--random-weights does not apply to the {preset.name} preset: its architecture "
                "is the bundle's; use --preset tiny for a random-weight model"
            )
        if preset.bundle is None and self.bundle_dir is not None:
            raise ConfigError(f"bundle_dir is for bundle presets (demo), not {preset.name}")

    def resolve_preset(self) -> Preset:
        """The :class:`Preset` named by ``preset`` (ConfigError for an unknown name)."""
        return self.preset if isinstance(self.preset, Preset) else get_preset(self.preset)

    @property
    def root(self) -> Path | None:
        """The checkpoint folder as a path (None: the default cache)."""
        return Path(self.checkpoint_dir).expanduser() if self.checkpoint_dir else None


@dataclass(frozen=True)
class OnnxOptions:
    """How to run on an ``lipsync export onnx`` folder instead of PyTorch models
    (:class:`lipsync.export.ort_engine.OrtEngine`; ``lipsync run --engine onnx``).

    The export fixes the weights, the precision and the preset; only the execution provider and
    ONNX Runtime's threads are chosen here. ``preset``, when given, must name the export's preset.
    """

    onnx_dir: str | os.PathLike
    provider: Provider = "auto"  # auto: CUDA when ONNX Runtime has it, else the CPU
    preset: str | None = None  # None: the export's (its manifest.json)
    threads: int | None = None  # ONNX Runtime intra-op threads (None: its default)

    def validate(self) -> None:
        """ConfigError for an unknown provider or preset, or a bad thread count."""
        check_choice("provider", self.provider, PROVIDERS)
        if self.preset is not None:
            get_preset(self.preset)
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be at least 1, got {self.threads}")
