# ruff: noqa: B023 (the lambdas are called at once)
"""U-Net / VAE timing variants on one GPU, in one process (a full GPU lease call).

Usage (on the GPU machine): python benchmarks/gpu_unet_variants.py --out $OUT/unet.json
Prints a table; writes every number as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lipsync.bench import (  # noqa: E402
    bench_unet_call,
    build_unet,
    count_flops,
    make_unet_inputs,
    time_fn,
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="unet.json")
    ap.add_argument("--variants", default="all")
    ap.add_argument("--resolutions", default="512,256")
    ap.add_argument("--preset", default="v1.6")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--vae", default="sd")
    args = ap.parse_args()
    dev = torch.device(args.device)
    info = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date": time.strftime("%Y-%m-%d"),
    }
    print(info, flush=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    results = []

    def record(res, extra=None):
        row = res.as_dict() | (extra or {})
        results.append(row)
        print(
            f"{row['name']:48s} {row['seconds_per_call'] * 1000:8.1f} ms/call "
            f"{row['tflops']:6.1f} TFLOP/s  peak {row['peak_gib']:5.1f} GiB  "
            f"compile {row['compile_s']:6.1f} s  {extra or ''}",
            flush=True,
        )
        with open(args.out, "w") as fh:
            json.dump({"info": info, "results": results}, fh, indent=1)

    for res_px in [int(r) for r in args.resolutions.split(",")]:
        latent = res_px // 8
        for dtype_name, dtype in [("fp16", torch.float16), ("bf16", torch.bfloat16)]:
            unet = build_unet(args.preset, dev, dtype)
            full = make_unet_inputs(2, 16, latent, dev, dtype, null_clips=0)
            full.audio[:16].zero_()
            null = make_unet_inputs(2, 16, latent, dev, dtype, null_clips=1)
            null.audio.copy_(full.audio[16:])

            def eager(x, unet=unet):
                return unet(x.sample, x.timestep, x.audio, x.null_clips)

            with torch.inference_mode():
                flops = count_flops(lambda: eager(full))
                ref = eager(full).float()
                out_null = eager(null).float()
            err = ((out_null - ref).abs().max() / ref.abs().max()).item()
            record(
                bench_unet_call(
                    f"{res_px}px {dtype_name} eager, full CFG batch", eager, full, flops, dev
                ),
            )
            record(
                bench_unet_call(
                    f"{res_px}px {dtype_name} eager, null-audio skip", eager, null, flops, dev
                ),
                {"rel_err_vs_full": round(err, 6)},
            )
            if dtype_name == "fp16":
                del unet
                torch.cuda.empty_cache()
                continue
            for mode in ["default", "reduce-overhead", "max-autotune-no-cudagraphs"]:
                if args.variants != "all" and mode not in args.variants:
                    continue
                try:
                    torch._dynamo.reset()
                    compiled = torch.compile(unet, mode=mode, fullgraph=False)

                    def run(x, compiled=compiled):
                        return compiled(x.sample, x.timestep, x.audio, x.null_clips)

                    res = bench_unet_call(
                        f"{res_px}px bf16 compile[{mode}], null skip", run, null, flops, dev
                    )
                    with torch.inference_mode():
                        out = run(null).float()
                    cerr = ((out - ref).abs().max() / ref.abs().max()).item()
                    record(res, {"rel_err_vs_eager_full": round(cerr, 6)})
                except Exception:
                    traceback.print_exc()
            del unet
            torch.cuda.empty_cache()

    # VAE at 512, 16 frames
    from lipsync.models.vae import SD_VAE_FT_MSE_CONFIG, TINY_VAE_CONFIG, Vae, build_autoencoder

    vae_config = SD_VAE_FT_MSE_CONFIG if args.vae == "sd" else TINY_VAE_CONFIG

    for dtype in [torch.float16, torch.bfloat16]:
        with torch.device(dev):
            vae = Vae(build_autoencoder(vae_config).to(dtype).eval())
        side = int(args.resolutions.split(",")[0])
        x = torch.rand(16, 3, side, side, device=dev, dtype=dtype) * 2 - 1
        with torch.inference_mode():
            z = vae.encode(x)
            t_enc = time_fn(lambda: vae.encode(x), dev, 2, 5)
            t_dec = time_fn(lambda: vae.decode(z), dev, 2, 5)
        row = {"name": f"vae 512px {dtype} eager", "encode_s": t_enc, "decode_s": t_dec}
        results.append(row)
        print(row, flush=True)
    with open(args.out, "w") as fh:
        json.dump({"info": info, "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
