"""Model files laid out as the official downloads are, for loading tests."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from lipsync.models.vae import TINY_VAE_CONFIG


def write_vae_folder(folder: Path, state: dict) -> None:
    """A diffusers VAE folder: ``config.json`` (the tiny VAE's) and the weights."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(TINY_VAE_CONFIG))
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
