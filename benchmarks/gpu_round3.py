"""A/B on the GPU (v1.6, 512 px, bf16, random weights), one JSON line per result:

1. U-Net loop with 1 vs 2 chunks per batch (ChunkDenoiser batches of equal-length chunks):
   does a 64-image U-Net batch use the GPU better than 32?
2. VAE encode/decode: eager vs channels_last vs regional torch.compile (encoder/decoder).

    python benchmarks/gpu_round3.py
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from lipsync.accel.compile import compile_unet, compile_vae  # noqa: E402
from lipsync.bench import time_fn  # noqa: E402
from lipsync.diffusion import ChunkDenoiser, DenoiseOptions, initial_noise  # noqa: E402
from lipsync.face.mask import make_mask  # noqa: E402
from lipsync.models.bundle import load_models  # noqa: E402

dev = torch.device("cuda")
models = load_models("v1.6", device=dev, dtype=torch.bfloat16, random_weights=True)
compile_unet(models.unet, "regional")
mask = torch.from_numpy(make_mask(512))


def emit(**record):
    record.update(device=torch.cuda.get_device_name(), torch=torch.__version__,
                  date=time.strftime("%Y-%m-%d"))  # fmt: skip
    print(json.dumps(record), flush=True)


# 1. chunks per batch (U-Net loop only: the VAE parts are timed by the denoiser's stage timers)
for chunks in (1, 2, 3):
    den = ChunkDenoiser(models.unet, models.vae, mask, DenoiseOptions(steps=20))
    g = torch.Generator(device=dev).manual_seed(0)
    faces = torch.rand(chunks, 16, 3, 512, 512, device=dev, generator=g) * 2 - 1
    audio = torch.randn(chunks, 16, 50, 384, device=dev, generator=g)
    noise = initial_noise(16, 64, g, dev, torch.bfloat16)
    gens = [torch.Generator(device=dev).manual_seed(i) for i in range(chunks)]
    t = time.perf_counter()
    den(faces, audio, noise, gens)  # warm-up / compile
    torch.cuda.synchronize()
    warm = time.perf_counter() - t
    den.stage_seconds = {}
    torch.cuda.reset_peak_memory_stats()
    reps = 2
    for _ in range(reps):
        den(faces, audio, noise, gens)
    frames = reps * chunks * 16
    emit(
        what="chunks_per_batch", chunks=chunks, warmup_s=round(warm, 1),
        ms_per_frame={k: round(v / frames * 1000, 2) for k, v in den.stage_seconds.items()},
        unet_loop_fps=round(frames / den.stage_seconds["unet"], 2),
        model_fps=round(frames / sum(den.stage_seconds.values()), 2),
        peak_gpu_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
    )  # fmt: skip

# 2. VAE variants, 16 frames at 512
x = torch.rand(16, 3, 512, 512, device=dev) * 2 - 1
z = torch.randn(16, 4, 64, 64, device=dev)
for variant in ("eager", "channels_last", "regional", "regional+channels_last"):
    vae = load_models("v1.6", device=dev, dtype=torch.bfloat16, random_weights=True).vae
    if "channels_last" in variant:
        vae.to(memory_format=torch.channels_last)
    t = time.perf_counter()
    if variant.startswith("regional"):
        compile_vae(vae, "regional")
    with torch.inference_mode():
        vae.encode(x)
        vae.decode(z)
        torch.cuda.synchronize()
        first = time.perf_counter() - t
        enc = time_fn(lambda v=vae: v.encode(x), dev, 2, 5)
        dec = time_fn(lambda v=vae: v.decode(z), dev, 2, 5)
    emit(
        what="vae", variant=variant, first_call_s=round(first, 1),
        encode_ms_per_frame=round(enc / 16 * 1000, 2),
        decode_ms_per_frame=round(dec / 16 * 1000, 2),
    )  # fmt: skip
    del vae
    torch._dynamo.reset()
