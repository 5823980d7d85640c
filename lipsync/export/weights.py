"""The models an export reads: a preset's checkpoints, or its architecture with seeded random
weights; and the re-randomisation that keeps parity tests honest.

**The testing trap** (issue #17): LatentSync initialises ``conv_in``, ``conv_out`` and every
motion module's ``proj_out`` to zero (and every norm to weight 1, bias 0), so a freshly built
reference U-Net outputs exactly 0, and an export that drops or mangles those layers passes any
parity test. :func:`randomize_constant_parameters` redraws every parameter tensor whose values
are all equal before such a test.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lipsync.config import Preset, get_preset
from lipsync.models.unet import UNet3D
from lipsync.models.vae import SD_VAE_FT_MSE_CONFIG, TINY_VAE_CONFIG, Vae, random_vae
from lipsync.models.whisper import WhisperDims, WhisperEncoder


@dataclass
class ExportModels:
    """fp32 CPU models of one preset, and where their weights came from."""

    preset: Preset
    unet: UNet3D
    vae: Vae
    whisper: WhisperEncoder
    weights: str  # "checkpoint" or "random (seed S)"

    @classmethod
    def from_bundle(cls, bundle, weights: str = "checkpoint") -> ExportModels:
        """From a loaded model bundle (``preset``, ``unet``, ``vae``, ``audio``)."""
        return cls(bundle.preset, bundle.unet, bundle.vae, bundle.audio.encoder, weights)


def random_models(preset: str | Preset, seed: int = 0) -> ExportModels:
    """``preset``'s architecture with weights drawn from ``seed`` (fp32, CPU); the global random
    state is left as it was. Seed 0 gives the weights ``load_models(preset, random_weights=True)``
    (and the ``tiny`` preset) runs with."""
    preset = preset if isinstance(preset, Preset) else get_preset(preset)
    vae_config = TINY_VAE_CONFIG if preset.random_weights else SD_VAE_FT_MSE_CONFIG
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet3D.from_config(preset.unet_config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        whisper = WhisperEncoder(WhisperDims())
    vae = random_vae(vae_config, seed=seed)
    for model in (unet, whisper):
        model.eval().requires_grad_(False)
    return ExportModels(preset, unet, vae, whisper, f"random (seed {seed})")


@torch.no_grad()
def randomize_constant_parameters(model: nn.Module, seed: int = 0, scale: float = 0.05) -> int:
    """Redraw every parameter whose values are all equal (zero-initialised layers, norm weights
    of 1 and biases of 0): ``c + scale · N(0, 1)`` with ``c`` the old constant. Returns how many
    tensors were redrawn. Deterministic for a given ``seed`` and model."""
    gen = torch.Generator().manual_seed(seed)
    count = 0
    for param in model.parameters():
        flat = param.detach().reshape(-1)
        if flat.numel() and bool((flat == flat[0]).all()):
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            param.copy_((flat[0].float() + scale * noise).to(param.dtype))
            count += 1
    return count
