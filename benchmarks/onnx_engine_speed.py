"""The ONNX Runtime engine next to the PyTorch engine: one chunk of the model part of a run.

    python benchmarks/onnx_engine_speed.py --preset tiny --onnx-dir /tmp/onnx-tiny --out speed.jsonl
    python benchmarks/onnx_engine_speed.py --preset v1.6 --onnx-dir /tmp/onnx-v16 --fp16 \\
        --provider cuda --torch-device cuda --torch-dtype fp16 --compile regional \\
        --out $OUT/onnx_speed.jsonl                               # a GPU machine

Random weights of the preset's architecture (seed 0), exported into ``--onnx-dir`` first when
that folder holds no export (a JSON line with the export's seconds and its verification against
PyTorch: this is also the full-size parity check). Synthetic aligned faces and audio windows
(model time does not depend on content). Per engine: one warm-up chunk (compilation, TensorRT
engine builds, ORT arena growth), then ``--repeat`` timed chunks of ``--frames`` frames and
``--steps`` guided DDIM steps, with the seconds spent in VAE encode / U-Net / VAE decode. One
JSON line per engine; the ONNX line also holds the largest difference from the PyTorch output.

``--unet-calls N`` instead times N guided U-Net calls per engine, alternating PyTorch and ONNX
Runtime call by call (medians), so a machine shared with other jobs slows both sides alike.

``--engines torch`` or ``--engines onnx`` runs one side only (full-size models on a small
machine: one set of weights in memory at a time).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import onnxruntime
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lipsync.diffusion import ChunkDenoiser, DenoiseOptions  # noqa: E402
from lipsync.engine import chunk_generator, chunk_noise  # noqa: E402
from lipsync.export.manifest import MANIFEST  # noqa: E402
from lipsync.export.onnx_export import ExportOptions, export_onnx  # noqa: E402
from lipsync.export.ort_engine import OrtEngine  # noqa: E402
from lipsync.export.weights import random_models  # noqa: E402
from lipsync.face.mask import make_mask  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_chunks(denoiser: ChunkDenoiser, faces, windows, noise_for, gen_for, repeat, device):
    """(seconds per chunk, stage seconds per chunk, first-call seconds, last output)."""
    start = time.perf_counter()
    out = denoiser(faces, windows, noise_for(), gen_for())
    sync(device)
    first = time.perf_counter() - start
    denoiser.stage_seconds = {}
    start = time.perf_counter()
    for _ in range(repeat):
        out = denoiser(faces, windows, noise_for(), gen_for())
    sync(device)
    total = (time.perf_counter() - start) / repeat
    stages = {k: round(v / repeat, 4) for k, v in denoiser.stage_seconds.items()}
    return total, stages, first, out.float().cpu()


def alternate_unet_calls(models, args, common) -> dict:
    """Median seconds of one guided U-Net call (2 clips of ``--frames``), PyTorch fp32 CPU and
    ONNX Runtime, called alternately."""
    if not os.path.isfile(os.path.join(args.onnx_dir, MANIFEST)):
        export_onnx(models, args.onnx_dir, ExportOptions("fp16" if args.fp16 else "fp32"))
    engine = OrtEngine(args.onnx_dir, provider=args.provider, threads=args.threads)
    h = models.preset.resolution // 8
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 13, args.frames, h, h, generator=g)
    audio = torch.randn(args.frames, 50, 384, generator=g)
    t = torch.tensor(501)
    times = {"pytorch": [], "onnxruntime": []}
    diff = 0.0
    with torch.inference_mode():
        for _ in range(args.unet_calls + 1):  # the first round is a warm-up
            start = time.perf_counter()
            ref = models.unet(sample, t, audio, 1)
            times["pytorch"].append(time.perf_counter() - start)
            start = time.perf_counter()
            out = engine.unet(sample, t, audio, 1)
            times["onnxruntime"].append(time.perf_counter() - start)
            diff = max(diff, float((out - ref).abs().max() / ref.abs().max()))
    median = {k: round(statistics.median(v[1:]), 4) for k, v in times.items()}
    return {
        **common, "measure": "guided U-Net call, alternating", "calls": args.unet_calls,
        "seconds_median": median, "onnx_over_pytorch": round(
            median["pytorch"] / median["onnxruntime"], 3),
        "providers": engine.providers, "precision": engine.manifest.precision,
        "onnxruntime": onnxruntime.__version__, "max_rel_diff": diff,
        "load_average": os.getloadavg(),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--onnx-dir", required=True)
    ap.add_argument("--fp16", action="store_true", help="export (if needed) the fp16 variant")
    ap.add_argument("--provider", default="auto", choices=["auto", "cpu", "cuda", "tensorrt"])
    ap.add_argument("--torch-device", default="cpu")
    ap.add_argument("--torch-dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--compile", default="none", choices=["none", "regional", "full"])
    ap.add_argument("--engines", default="torch,onnx")
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for both engines")
    ap.add_argument("--out", default=None, help="append JSON lines here")
    ap.add_argument("--unet-calls", type=int, default=0, help="alternate N U-Net calls per engine")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    engines = args.engines.split(",")
    models = random_models(args.preset, seed=0)
    r = models.preset.resolution
    g = torch.Generator().manual_seed(0)
    faces = torch.rand(args.frames, 3, r, r, generator=g) * 2 - 1
    windows = torch.randn(args.frames, 50, 384, generator=g)
    mask = torch.from_numpy(make_mask(r))
    options = DenoiseOptions(steps=args.steps)
    common = {
        "preset": args.preset, "weights": models.weights, "frames": args.frames,
        "steps": args.steps, "repeat": args.repeat, "host": platform.node(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip
    lines, reference = [], None
    if args.unet_calls:
        lines.append(alternate_unet_calls(models, args, common))
        print(json.dumps(lines[-1]), flush=True)
        engines = []

    if "torch" in engines:
        device, dtype = torch.device(args.torch_device), DTYPES[args.torch_dtype]
        unet = models.unet.to(device=device, dtype=dtype)
        vae = models.vae.to(device=device, dtype=dtype)
        if args.compile != "none":
            from lipsync.accel.compile import compile_unet, compile_vae

            unet = compile_unet(unet, args.compile)
            compile_vae(vae, "regional")
        denoiser = ChunkDenoiser(unet, vae, mask.to(device), options)
        secs, stages, first, reference = time_chunks(
            denoiser, faces.to(device), windows,
            lambda: chunk_noise(1, args.frames, r // 8, device, dtype),
            lambda: chunk_generator(1, 0, device), args.repeat, device,
        )  # fmt: skip
        lines.append({
            **common, "engine": "pytorch", "device": str(device), "dtype": args.torch_dtype,
            "compile": args.compile, "seconds_per_chunk": round(secs, 3),
            "frames_per_second": round(args.frames / secs, 3), "stages": stages,
            "first_chunk_seconds": round(first, 1),
        })  # fmt: skip
        print(json.dumps(lines[-1]), flush=True)
        models.unet = models.vae = unet = vae = denoiser = None  # free before the ONNX side
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if "onnx" in engines:
        if not os.path.isfile(os.path.join(args.onnx_dir, MANIFEST)):
            if models.unet is None:
                models = random_models(args.preset, seed=0)
            start = time.perf_counter()
            precision = "fp16" if args.fp16 else "fp32"
            manifest = export_onnx(models, args.onnx_dir, ExportOptions(precision))
            seconds = round(time.perf_counter() - start)
            lines.append({**common, "export_seconds": seconds, **manifest.verification})
            print(json.dumps(lines[-1]), flush=True)
        del models
        engine = OrtEngine(args.onnx_dir, provider=args.provider, threads=args.threads)
        denoiser = engine.denoiser(mask, options)
        secs, stages, first, out = time_chunks(
            denoiser, faces, windows,
            lambda: chunk_noise(1, args.frames, r // 8, engine.device, torch.float32),
            lambda: chunk_generator(1, 0, engine.device), args.repeat, engine.device,
        )  # fmt: skip
        line = {
            **common, "engine": "onnxruntime", "providers": engine.providers,
            "precision": engine.manifest.precision, "onnxruntime": onnxruntime.__version__,
            "seconds_per_chunk": round(secs, 3), "frames_per_second": round(args.frames / secs, 3),
            "stages": stages, "first_chunk_seconds": round(first, 1),
        }  # fmt: skip
        if reference is not None:
            line["max_abs_diff_vs_pytorch"] = float((out - reference).abs().max())
        lines.append(line)
        print(json.dumps(line), flush=True)

    if args.out:
        with open(args.out, "a") as f:
            for line in lines:
                f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
