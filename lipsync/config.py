"""Model presets and where their files live.

A preset names everything a run needs: the U-Net architecture, the face resolution, and where the
official weights come from. ``tiny`` is a small random-weight model for smoke tests: it runs the
whole pipeline in seconds on a CPU and produces meaningless mouths.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from lipsync.errors import ConfigError

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
    num_frames: int = 16  # frames per U-Net chunk
    description: str = ""
    aliases: tuple[str, ...] = field(default=())

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
        description="LatentSync 1.5: 256 px faces (about 3x faster)",
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
}


def get_preset(name: str) -> Preset:
    """Look a preset up by name or alias (``v1.6``, ``1.6``, ``v1.5``, ``tiny``)."""
    key = name.strip().lower()
    for preset in PRESETS.values():
        if key == preset.name or key in preset.aliases:
            return preset
    raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")


def cache_dir() -> Path:
    """Where downloaded checkpoints live: ``$LIPSYNC_HOME``, else ``~/.cache/lipsync``."""
    root = os.environ.get("LIPSYNC_HOME")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "lipsync"
