"""Load every model a preset needs, in one place: U-Net, VAE, Whisper audio encoder.

``load_models("v1.6")`` reads the official files from the ``lipsync download`` cache (strictly);
``load_models("tiny")`` builds seeded random-weight models in milliseconds for smoke tests.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lipsync.audio import AudioEncoder
from lipsync.checkpoints import load_unet, random_unet, require_checkpoints
from lipsync.config import Preset, get_preset
from lipsync.models.unet import UNet3D
from lipsync.models.vae import SD_VAE_FT_MSE_CONFIG, TINY_VAE_CONFIG, Vae, load_vae, random_vae
from lipsync.models.whisper import WhisperDims, WhisperEncoder

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    from lipsync.errors import ConfigError

    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}; choose one of: {', '.join(DTYPES)}") from None


@dataclass
class ModelBundle:
    preset: Preset
    unet: UNet3D
    vae: Vae
    audio: AudioEncoder
    device: torch.device
    dtype: torch.dtype
    load_seconds: float


def random_audio_encoder(seed: int = 0, device="cpu", dtype=torch.float32) -> AudioEncoder:
    """Whisper-tiny-shaped encoder with seeded random weights (``tiny`` preset)."""
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        encoder = WhisperEncoder(WhisperDims())
    finally:
        torch.random.set_rng_state(state)
    return AudioEncoder(encoder, device=device, dtype=dtype)


def load_models(
    preset: str | Preset,
    root: Path | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = torch.float32,
    random_weights: bool = False,
) -> ModelBundle:
    """All models of ``preset`` on ``device``: U-Net and VAE in ``dtype``; Whisper in fp32.

    ``random_weights=True`` builds the preset's architecture with seeded random weights instead
    of reading checkpoints: for timing (``lipsync bench``), never for real output.
    """
    preset = preset if isinstance(preset, Preset) else get_preset(preset)
    device = torch.device(device)
    dtype = parse_dtype(dtype)
    start = time.perf_counter()
    if preset.random_weights or random_weights:
        vae_config = TINY_VAE_CONFIG if preset.random_weights else SD_VAE_FT_MSE_CONFIG
        unet = random_unet(preset.unet_config, seed=0, device=device, dtype=dtype)
        vae = random_vae(vae_config, seed=0, device=device, dtype=dtype)
        audio = random_audio_encoder(seed=0, device=device)
    else:
        paths = require_checkpoints(preset, root)
        unet = load_unet(paths["unet"], preset.unet_config, device=device, dtype=dtype)
        vae = load_vae(paths["vae"], device=device, dtype=dtype)
        audio = AudioEncoder.from_checkpoint(paths["whisper"], device=device)
    return ModelBundle(preset, unet, vae, audio, device, dtype, time.perf_counter() - start)


def check_preset(
    preset: str, root: Path | None = None, device: str = "cpu", dtype: str = "fp32"
) -> dict:
    """Load ``preset`` strictly and push one second of synthetic input through every model.

    Returns a small report (shapes, parameter counts, seconds) — ``lipsync check`` prints it.
    """
    bundle = load_models(preset, root, device, dtype)
    p = bundle.preset
    frames = p.num_frames
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    wav = (0.1 * np.sin(np.arange(16000) * 2 * np.pi * 220 / 16000)).astype(np.float32)
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
