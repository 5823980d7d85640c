"""The Stable-Diffusion VAE (diffusers' ``AutoencoderKL``, sd-vae-ft-mse weights).

Images are (n, 3, H, W) in [-1, 1]; latents are (n, 4, H/8, W/8), already multiplied by the
scaling factor 0.18215 (shift 0), which is what the U-Net sees. Reading the official files is
:func:`lipsync.checkpoints.load_vae`'s job.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

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
        Same as ``latents(moments(images), generator, sample)``.
        """
        return self.latents(self.moments(images), generator, sample)

    def moments(self, images: torch.Tensor) -> torch.Tensor:
        """images (n, 3, H, W) in [-1, 1] -> the posterior's parameters (n, 8, H/8, W/8): mean
        and log-variance, unscaled (what the encoder computes; no randomness)."""
        return self.autoencoder.encode(images.to(self.dtype)).latent_dist.parameters

    def latents(
        self,
        moments: torch.Tensor,
        generator: torch.Generator | None = None,
        sample: bool = False,
    ) -> torch.Tensor:
        """Posterior parameters (n, 8, h, w) from :meth:`moments` -> latents (n, 4, h, w),
        scaled: a draw from ``generator`` (``sample``) or the mean."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        dist = DiagonalGaussianDistribution(moments)
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
