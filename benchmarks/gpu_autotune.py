"""Regional-compile variants of the U-Net's guided call on one GPU, one JSON line per variant.

    python benchmarks/gpu_autotune.py --out $OUT/autotune.jsonl [--variants regional,fp8,autotune]

Variants (bf16, v1.6 architecture at 512 px, random weights, 2 × 16 frames with the
unconditional half's audio skipped, like exact mode):

- ``regional``: lipsync's default (``compile_unet(unet, "regional")``: inductor's default mode);
- ``fp8``: the same after ``convert_unet_to_fp8`` (row-wise scaled FP8 linears, quantisation
  compiled into the regions);
- ``autotune``: every region compiled with ``mode="max-autotune-no-cudagraphs"`` (inductor
  benchmarks Triton GEMM / convolution templates against cuBLAS / cuDNN and fuses epilogues).

Each line: seconds per call, TFLOP/s, compile seconds (first call), peak memory and the largest
difference from the eager bf16 output relative to its largest magnitude. The variants run in
the order given, slowest to compile last, so a call cut off at its limit keeps the others.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lipsync.accel.compile import compile_regions, compile_unet  # noqa: E402
from lipsync.bench import (  # noqa: E402
    bench_unet_call,
    build_unet,
    count_flops,
    make_unet_inputs,
    matmul_peak_tflops,
)


@torch.inference_mode()
def eager_reference(preset: str, x, dev: torch.device, dtype: torch.dtype):
    """(FLOPs of one call, its eager output in fp32) for a fresh random-weight U-Net."""
    unet = build_unet(preset, dev, dtype)
    flops = count_flops(lambda: unet(x.sample, x.timestep, x.audio, x.null_clips))
    return flops, unet(x.sample, x.timestep, x.audio, x.null_clips).float()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="autotune.jsonl")
    ap.add_argument("--variants", default="regional,fp8,autotune")
    ap.add_argument("--preset", default="v1.6")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run (use --preset tiny)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    info = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "preset": args.preset,
        "resolution": args.resolution,
        "matmul_peak_tflops": matmul_peak_tflops(dev),
    }
    print(json.dumps(info), flush=True)
    latent = args.resolution // 8
    dtype = torch.bfloat16
    inputs = make_unet_inputs(2, 16, latent, dev, dtype, null_clips=1)

    flops, ref = eager_reference(args.preset, inputs, dev, dtype)

    for variant in args.variants.split(","):
        torch._dynamo.reset()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        unet = build_unet(args.preset, dev, dtype)
        if variant == "regional":
            compile_unet(unet, "regional")
        elif variant == "fp8":
            from lipsync.accel.fp8 import convert_unet_to_fp8

            convert_unet_to_fp8(unet)
            compile_unet(unet, "regional")
        elif variant == "autotune":
            compile_regions(unet, "max-autotune-no-cudagraphs")
        else:
            raise SystemExit(f"unknown variant {variant!r}")

        def call(x, unet=unet):
            return unet(x.sample, x.timestep, x.audio, x.null_clips)

        res = bench_unet_call(variant, call, inputs, flops, dev).as_dict()
        with torch.inference_mode():
            out = call(inputs).float()
        res["rel_err_vs_eager"] = round(((out - ref).abs().max() / ref.abs().max()).item(), 6)
        if info["matmul_peak_tflops"]:
            res["share_of_peak"] = round(res["tflops"] / info["matmul_peak_tflops"], 3)
        res["unet_loop_fps_20_steps"] = round(16 / (20 * res["seconds_per_call"]), 2)
        res.update(info)
        print(json.dumps(res), flush=True)
        with open(args.out, "a") as fh:
            fh.write(json.dumps(res) + "\n")
        del unet


if __name__ == "__main__":
    main()
