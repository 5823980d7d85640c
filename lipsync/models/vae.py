"""The Stable-Diffusion VAE (diffusers' ``AutoencoderKL``, sd-vae-ft-mse weights).

Images are (n, 3, H, W) in [-1, 1]; latents are (n, 4, H/8, W/8), already multiplied by the
scaling factor 0.18215 (shift 0), which is what the U-Net sees.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lipsync.errors import CheckpointError, CheckpointNotFoundError

SCALING_FACTOR = 0.18215
SHIFT_FACTOR = 0.0

# stabilityai/sd-vae-ft-mse's config.json (the fields that shape the network).
SD_VAE_FT_MSE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 256,
    "scaling_factor": SCALING_FACTOR,
}

# Same shape of network (8x downsampling, 4 latent channels), a few hundred kB: for smoke tests.
TINY_VAE_CONFIG: dict[str, Any] = {
    **SD_VAE_FT_MSE_CONFIG,
    "block_out_channels": [8, 16, 16, 16],
    "layers_per_block": 1,
    "norm_num_groups": 8,
}

# Older diffusers files (sd-vae-ft-mse among them) name the attention projections differently.
_DEPRECATED_ATTENTION_NAMES = {
    ".query.": ".to_q.",
    ".key.": ".to_k.",
    ".value.": ".to_v.",
    ".proj_attn.": ".to_out.0.",
}


class Vae(nn.Module):
    """Encode face images to scaled latents and back."""

    def __init__(self, autoencoder):
        super().__init__()
        self.autoencoder = autoencoder
        self.scaling_factor = SCALING_FACTOR
        self.shift_factor = SHIFT_FACTOR

    @property
    def dtype(self) -> torch.dtype:
        return next(self.autoencoder.parameters()).dtype

    def encode(
        self, images: torch.Tensor, generator: torch.Generator | None = None, sample: bool = False
    ) -> torch.Tensor:
        """images (n, 3, H, W) in [-1, 1] -> latents (n, 4, H/8, W/8), scaled.

        ``sample=False`` takes the posterior mean (deterministic); the reference samples.
        """
        dist = self.autoencoder.encode(images.to(self.dtype)).latent_dist
        z = dist.sample(generator) if sample else dist.mean
        return (z - self.shift_factor) * self.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (n, 4, h, w), scaled -> images (n, 3, 8h, 8w), roughly in [-1, 1]."""
        z = latents.to(self.dtype) / self.scaling_factor + self.shift_factor
        return self.autoencoder.decode(z).sample

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # images (n, 3, H, W) -> reconstruction (n, 3, H, W)
        return self.decode(self.encode(images))


def build_autoencoder(config: dict[str, Any]):
    """An ``AutoencoderKL`` from a diffusers config dict (keys it does not take are ignored)."""
    from diffusers import AutoencoderKL
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # its dtype-cast advice is not for inference use
    allowed = set(inspect.signature(AutoencoderKL.__init__).parameters) - {"self"}
    return AutoencoderKL(**{k: v for k, v in config.items() if k in allowed})


def random_vae(
    config: dict[str, Any] | None = None, seed: int = 0, device="cpu", dtype=torch.float32
) -> Vae:
    """A VAE with seeded random weights (``tiny`` preset)."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with device:
            model = build_autoencoder(config or TINY_VAE_CONFIG)
    return Vae(model.to(dtype=dtype).eval().requires_grad_(False))


def rename_deprecated_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for old, new in _DEPRECATED_ATTENTION_NAMES.items():
            if old in key and ".attentions." in key:
                key = key.replace(old, new)
        out[key] = value
    return out


def load_vae(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Vae:
    """Load the VAE from a folder (``config.json`` + ``diffusion_pytorch_model.safetensors``) or
    a single weights file (the sd-vae-ft-mse config is then assumed). Strict: every key must fit.
    """
    from lipsync.checkpoints import _convert, check_state_dict, read_checkpoint, unwrap_state_dict

    path = Path(path).expanduser()
    if path.is_dir():
        config_file = path / "config.json"
        weights = next(
            (
                path / n
                for n in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
                if (path / n).is_file()
            ),
            None,
        )
        if weights is None or not config_file.is_file():
            raise CheckpointNotFoundError(
                f"VAE folder {path} needs config.json and diffusion_pytorch_model.safetensors; "
                "run: lipsync download"
            )
        try:
            config = json.loads(config_file.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read VAE config {config_file}: {e}") from e
    else:
        weights, config = path, SD_VAE_FT_MSE_CONFIG
    state = rename_deprecated_keys(unwrap_state_dict(read_checkpoint(weights), weights))
    with torch.device("meta"):
        model = build_autoencoder(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_state_dict(expected, state, "VAE", weights)
    model.load_state_dict(_convert(state, device, dtype), strict=True, assign=True)
    return Vae(model.eval().requires_grad_(False))
