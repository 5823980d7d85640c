"""``lipsync check``: load a preset strictly and push one second of synthetic input through every
model (Whisper, VAE encoder, one U-Net call), reporting shapes, parameter counts and seconds."""

from __future__ import annotations

import time

import numpy as np
import torch

from lipsync.config import LoadOptions
from lipsync.constants import SAMPLE_RATE
from lipsync.loading import load_models


def check_preset(options: LoadOptions) -> dict:
    """Load ``options``' models (:func:`lipsync.loading.load_models`) and run each once on
    synthetic input; the report ``lipsync check`` prints."""
    bundle = load_models(options)
    p = bundle.preset
    frames = p.num_frames
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    t = np.arange(SAMPLE_RATE)
    wav = (0.1 * np.sin(t * 2 * np.pi * 220 / SAMPLE_RATE)).astype(np.float32)
    features = bundle.audio.features(wav)
    windows = bundle.audio.frame_windows(features)[:frames]
    t_audio = time.perf_counter() - t0

    faces = torch.rand(frames, 3, p.resolution, p.resolution, generator=gen) * 2 - 1
    t0 = time.perf_counter()
    with torch.inference_mode():
        latents = bundle.vae.encode(faces.to(bundle.device))  # (f, 4, h, w)
        lat = latents.permute(1, 0, 2, 3)[None]  # (1, 4, f, h, w)
        mask = torch.ones_like(lat[:, :1])
        sample = torch.cat([torch.randn_like(lat), mask, lat, lat], dim=1)
        t_vae = time.perf_counter() - t0
        t0 = time.perf_counter()
        noise = bundle.unet(sample, 501, windows.to(bundle.device))
        t_unet = time.perf_counter() - t0
    return {
        "preset": p.name,
        "resolution": p.resolution,
        "device": str(bundle.device),
        "dtype": str(bundle.dtype).removeprefix("torch."),
        "unet_parameters": sum(x.numel() for x in bundle.unet.parameters()),
        "vae_parameters": sum(x.numel() for x in bundle.vae.parameters()),
        "audio_features": list(features.shape),
        "audio_windows": list(windows.shape),
        "latents": list(lat.shape),
        "unet_output": list(noise.shape),
        "unet_output_finite": bool(torch.isfinite(noise).all()),
        "load_s": round(bundle.load_seconds, 3),
        "audio_s": round(t_audio, 3),
        "vae_encode_s": round(t_vae, 3),
        "unet_call_s": round(t_unet, 3),
    }
