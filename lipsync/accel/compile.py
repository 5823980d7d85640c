"""``torch.compile`` for the U-Net and VAE.

Regional compilation compiles each repeated block type (ResNet block, spatial transformer,
motion module, up/down sampler) rather than the whole network: blocks of the same shape share
one compiled graph, so cold-start compile time drops several-fold for nearly the same speed.
"""

from __future__ import annotations

import torch
from torch import nn

from lipsync.constants import COMPILE_MODES, CompileMode
from lipsync.errors import ConfigError, check_choice
from lipsync.models.layers import Downsample3D, ResnetBlock3D, Upsample3D
from lipsync.models.transformer import MotionModule, SpatialTransformer

REGIONS = (ResnetBlock3D, SpatialTransformer, MotionModule, Downsample3D, Upsample3D)
MODES = COMPILE_MODES


def compile_regions(unet: nn.Module, inductor_mode: str | None = None) -> None:
    """Compile every :data:`REGIONS` block of ``unet`` in place (inductor's ``inductor_mode``;
    None: its default)."""
    # One block class sees a dozen (channels, size) combinations; compile each once.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for module in unet.modules():
        if isinstance(module, REGIONS):
            module.compile(mode=inductor_mode, dynamic=False)


def compile_unet(unet: nn.Module, mode: CompileMode = "regional") -> nn.Module:
    """Compile ``unet`` in place (regional) or wrap it (full). Returns the module to call."""
    check_choice("compile mode", mode, COMPILE_MODES)
    if mode == "none":
        return unet
    if mode == "regional":
        compile_regions(unet)
        return unet
    inductor_mode = "reduce-overhead" if mode == "full-cudagraphs" else "default"
    return torch.compile(unet, mode=inductor_mode, dynamic=False)


def compile_vae(vae: nn.Module, mode: str = "regional") -> nn.Module:
    """Compile the VAE's encoder and decoder in place (``regional``) or not (``none``)."""
    if mode not in ("none", "regional"):
        raise ConfigError(f"unknown VAE compile mode {mode!r}; choose none or regional")
    if mode == "regional":
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        ae = vae.autoencoder
        for part in (ae.encoder, ae.decoder):
            part.compile(dynamic=False)
    return vae
