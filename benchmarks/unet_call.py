"""Time of one classifier-free-guidance U-Net call (2 × 16 frames) per variant, on one GPU.

    python benchmarks/unet_call.py --out unet_call.jsonl [--variants eager-fp16,regional,...]
        [--preset v1.6] [--resolution 512] [--device cuda]

Random weights of the preset's architecture; one JSON line per variant: seconds per call,
TFLOP/s (and its share of the measured bf16 matrix peak), compile seconds (first call), peak
memory and the largest difference from the eager bf16 output relative to its largest magnitude.
Variants, run in the order given (slowest to compile last, so a run cut off at its limit keeps
the others):

- ``eager-fp16`` / ``eager-bf16``: no compilation, the unconditional half's audio skipped (what
  exact mode runs); ``eager-fp16-cfg`` / ``eager-bf16-cfg``: the full CFG batch with zero audio;
- ``full`` / ``full-cudagraphs`` / ``full-autotune``: ``torch.compile`` of the whole model in
  inductor's default, ``reduce-overhead`` and ``max-autotune-no-cudagraphs`` modes (bf16);
- ``regional``: lipsync's ``--compile regional`` (bf16); ``regional-fp8``: after
  ``convert_unet_to_fp8``; ``regional-autotune``: every region in ``max-autotune-no-cudagraphs``.

Folds the first two GPU rounds (``gpu_unet_variants.py``, ``gpu_autotune.py``); their results
are in docs/bench/ (docs/PERFORMANCE.md, "U-Net, one classifier-free-guidance call").
"""

from __future__ import annotations

import argparse

import common
import torch

from lipsync.accel.compile import compile_regions, compile_unet
from lipsync.accel.fp8 import convert_unet_to_fp8
from lipsync.loading import parse_dtype
from lipsync.tools.bench import (
    bench_unet_call,
    build_unet,
    count_flops,
    make_unet_inputs,
    matmul_peak_tflops,
)

DEFAULT_VARIANTS = (
    "eager-fp16,eager-fp16-cfg,eager-bf16,eager-bf16-cfg,regional,regional-fp8,full,"
    "full-cudagraphs,regional-autotune,full-autotune"
)
INDUCTOR = {
    "full": "default",
    "full-cudagraphs": "reduce-overhead",
    "full-autotune": "max-autotune-no-cudagraphs",
}


def prepare(variant: str, preset: str, dev: torch.device):
    """(the callable to time, its dtype) for ``variant``."""
    dtype = parse_dtype("fp16" if "fp16" in variant else "bf16")
    unet = build_unet(preset, dev, dtype)
    if variant.startswith("eager"):
        model = unet
    elif variant == "regional":
        model = compile_unet(unet, "regional")
    elif variant == "regional-fp8":
        convert_unet_to_fp8(unet)
        model = compile_unet(unet, "regional")
    elif variant == "regional-autotune":
        compile_regions(unet, "max-autotune-no-cudagraphs")
        model = unet
    elif variant in INDUCTOR:
        model = torch.compile(unet, mode=INDUCTOR[variant], dynamic=False)
    else:
        raise SystemExit(f"unknown variant {variant!r}")
    return model, dtype


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="also append the JSON lines here")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS)
    ap.add_argument("--preset", default="v1.6")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run (use --preset tiny)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    latent = args.resolution // 8
    peak = matmul_peak_tflops(dev)
    common.emit({"what": "start", "preset": args.preset, "resolution": args.resolution,
                 "matmul_peak_tflops": peak}, args.out)  # fmt: skip

    @torch.inference_mode()
    def reference(dtype):
        unet = build_unet(args.preset, dev, dtype)
        x = make_unet_inputs(2, 16, latent, dev, dtype, null_clips=1)
        flops = count_flops(lambda: unet(x.sample, x.timestep, x.audio, x.null_clips))
        return flops, unet(x.sample, x.timestep, x.audio, x.null_clips).float()

    flops, ref = reference(torch.bfloat16)
    for variant in args.variants.split(","):
        torch._dynamo.reset()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        model, dtype = prepare(variant, args.preset, dev)
        null = 0 if variant.endswith("-cfg") else 1
        inputs = make_unet_inputs(2, 16, latent, dev, dtype, null_clips=null)
        if not null:  # the unconditional clip gets all-zero audio
            inputs.audio[:16].zero_()

        def call(x, model=model):
            return model(x.sample, x.timestep, x.audio, x.null_clips)

        res = bench_unet_call(variant, call, inputs, flops, dev).as_dict()
        with torch.inference_mode():
            out = call(inputs).float()
        if null:
            err = (out - ref).abs().max() / ref.abs().max()
            res["rel_err_vs_eager_bf16"] = round(err.item(), 6)
        if peak:
            res["share_of_peak"] = round(res["tflops"] / peak, 3)
        res["unet_loop_fps_20_steps"] = round(16 / (20 * res["seconds_per_call"]), 2)
        common.emit({"what": "unet_call", "preset": args.preset, **res}, args.out)
        del model


if __name__ == "__main__":
    main()
