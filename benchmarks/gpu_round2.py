# ruff: noqa: B023 (the lambdas are called at once)
"""Round 2 on one GPU: attention backends, regional vs full compile, a profile, the 20-step loop
and the VAE. Usage: python benchmarks/gpu_round2.py --out $OUT/round2.json"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lipsync.accel.compile import compile_unet  # noqa: E402
from lipsync.bench import bench_unet_call, build_unet, count_flops, make_unet_inputs, time_fn  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="round2.json")
    ap.add_argument("--steps", default="sdpa,regional,profile,loop,vae")
    args = ap.parse_args()
    steps = args.steps.split(",")
    dev = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    info = {
        "device": torch.cuda.get_device_name(dev),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    out = {"info": info}
    print(info, flush=True)

    def save():
        with open(args.out, "w") as fh:
            json.dump(out, fh, indent=1)

    if "sdpa" in steps:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        rows = []
        for shape in [(32, 8, 4096, 40), (32, 8, 1024, 80), (8192, 8, 16, 40)]:
            q, k, v = (torch.randn(shape, device=dev, dtype=torch.bfloat16) for _ in range(3))
            flops = 4 * shape[0] * shape[1] * shape[2] ** 2 * shape[3]
            for backend in [
                SDPBackend.FLASH_ATTENTION,
                SDPBackend.EFFICIENT_ATTENTION,
                SDPBackend.CUDNN_ATTENTION,
                None,
            ]:
                try:
                    if backend is None:
                        t = time_fn(lambda: F.scaled_dot_product_attention(q, k, v), dev, 3, 10)
                    else:
                        with sdpa_kernel([backend]):
                            t = time_fn(lambda: F.scaled_dot_product_attention(q, k, v), dev, 3, 10)
                    rows.append(
                        {
                            "shape": shape,
                            "backend": str(backend),
                            "ms": t * 1e3,
                            "tflops": flops / t / 1e12,
                        }
                    )
                except Exception as e:  # noqa: BLE001
                    rows.append({"shape": shape, "backend": str(backend), "error": str(e)[:120]})
                print(rows[-1], flush=True)
        out["sdpa"] = rows
        save()

    unet = build_unet("v1.6", dev, torch.bfloat16)
    null = make_unet_inputs(2, 16, 64, dev, torch.bfloat16, null_clips=1)
    with torch.inference_mode():
        flops = count_flops(lambda: unet(null.sample, null.timestep, null.audio, 1))
        ref = unet(null.sample, null.timestep, null.audio, 1).float()
    results = []
    out["unet"] = results

    def call(m):
        return lambda x: m(x.sample, x.timestep, x.audio, x.null_clips)

    if "regional" in steps:
        try:
            torch._dynamo.reset()
            compile_unet(unet, "regional")
            r = bench_unet_call("512 bf16 regional compile", call(unet), null, flops, dev)
            with torch.inference_mode():
                err = (
                    (unet(null.sample, null.timestep, null.audio, 1).float() - ref).abs().max()
                    / ref.abs().max()
                ).item()
            results.append(r.as_dict() | {"rel_err_vs_eager": err})
            print(results[-1], flush=True)
            save()
        except Exception:
            traceback.print_exc()

    if "profile" in steps:
        from torch.profiler import ProfilerActivity, profile

        with torch.inference_mode():
            for _ in range(2):
                unet(null.sample, null.timestep, null.audio, 1)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                unet(null.sample, null.timestep, null.audio, 1)
                torch.cuda.synchronize()
        table = prof.key_averages().table(
            sort_by="device_time_total", row_limit=30, max_name_column_width=70
        )
        print(table, flush=True)
        out["profile_table"] = table
        save()

    if "loop" in steps:
        from lipsync.diffusion import ChunkDenoiser, DenoiseOptions, initial_noise
        from lipsync.face.mask import make_mask
        from lipsync.models.vae import SD_VAE_FT_MSE_CONFIG, Vae, build_autoencoder

        with torch.device(dev):
            vae = Vae(build_autoencoder(SD_VAE_FT_MSE_CONFIG).to(torch.bfloat16).eval())
        den = ChunkDenoiser(unet, vae, torch.from_numpy(make_mask(512)), DenoiseOptions())
        faces = torch.rand(16, 3, 512, 512, device=dev) * 2 - 1
        audio = torch.randn(16, 50, 384, device=dev)
        g = torch.Generator(device=dev).manual_seed(0)
        noise = initial_noise(16, 64, g, dev, torch.bfloat16)
        t = time_fn(lambda: den(faces, audio, noise, g), dev, 1, 3)
        out["chunk_loop"] = {
            "seconds_per_16_frames": t,
            "fps": 16 / t,
            "peak_gib": torch.cuda.max_memory_allocated(dev) / 2**30,
        }
        print(out["chunk_loop"], flush=True)
        save()
        if "vae" in steps:
            x = faces.to(torch.bfloat16)
            with torch.inference_mode():
                z = vae.encode(x)
                out["vae"] = {
                    "encode_16x512_s": time_fn(lambda: vae.encode(x), dev, 2, 5),
                    "decode_16x512_s": time_fn(lambda: vae.decode(z), dev, 2, 5),
                }
            print(out["vae"], flush=True)
            save()


if __name__ == "__main__":
    main()
