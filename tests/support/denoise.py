"""One chunk through :class:`lipsync.diffusion.ChunkDenoiser` on the CPU, as the engine does."""

from __future__ import annotations

import torch

from lipsync.diffusion import ChunkDenoiser, DenoiseOptions, initial_noise


def denoise(bundle, mask, faces, audio, seed=0, **opts) -> torch.Tensor:
    """Denoise ``faces`` (f, 3, R, R) with ``audio`` (f, 50, 384) under ``DenoiseOptions(**opts)``:
    the initial noise and the sampling randomness come from ``seed``."""
    den = ChunkDenoiser(bundle.unet, bundle.vae, mask, DenoiseOptions(**opts))
    gen = torch.Generator().manual_seed(seed)
    noise = initial_noise(faces.shape[0], 16, gen, torch.device("cpu"), torch.float32)
    return den(faces, audio, noise, generator=gen)
