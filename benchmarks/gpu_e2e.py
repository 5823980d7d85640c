"""End to end on the GPU: the real demo clip through the whole pipeline, timed, and the output's
quality against our fp32 eager path (same seed).

Random weights of the preset's real architecture (no official checkpoints on the GPU machine);
face tracks come from a --face-cache folder made beforehand on the CPU (mediapipe's wheel does
not fit beside the others in what travels to the GPU machine). Writes one JSON line per result.

    python benchmarks/gpu_e2e.py --video V --audio A --face-cache DIR --out OUT_DIR \
        [--preset v1.6] [--dtype bf16] [--compile regional] [--modes exact,fast]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lipsync.accel.compile import compile_unet, compile_vae  # noqa: E402
from lipsync.audio import load_audio  # noqa: E402
from lipsync.frames import ArraySink, FileFrames  # noqa: E402
from lipsync.media import probe  # noqa: E402
from lipsync.models.bundle import load_models, parse_dtype  # noqa: E402
from lipsync.pipeline import FPS, LipSyncPipeline, RunOptions  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a smoke test with --preset tiny


def emit(record: dict) -> None:
    record["torch"] = torch.__version__
    record["device_name"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    record["date"] = time.strftime("%Y-%m-%d")
    print(json.dumps(record), flush=True)


def build(preset: str, dtype: str, compile_mode: str) -> LipSyncPipeline:
    models = load_models(preset, device=DEVICE, dtype=parse_dtype(dtype), random_weights=True)
    models.unet = compile_unet(models.unet, compile_mode)
    if compile_mode != "none":
        compile_vae(models.vae, "regional")
    return LipSyncPipeline(models)


def timed_run(pipe, video, audio, out, options) -> dict:
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    report = pipe.run(video, audio, out, options)
    wall = time.perf_counter() - t
    return {
        "frames": report.frames,
        "wall_s": round(wall, 2),
        "fps_end_to_end": round(report.frames / wall, 2),
        "seconds": {k: round(v, 2) for k, v in report.seconds.items()},
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if DEVICE == "cuda"
        else None,
        "peak_gpu_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2)
        if DEVICE == "cuda"
        else None,
    }


def frames_in_memory(pipe, video, wav, options) -> np.ndarray:
    """The pipeline's output frames (no encoder in the way), for quality comparisons."""
    info = probe(video)
    frames = FileFrames(video, info, info.output_frames(FPS))
    report = pipe._new_report(options)
    return pipe._run(frames, wav, lambda _: ArraySink(), options, None, report)


def psnr(a: np.ndarray, b: np.ndarray, region: np.ndarray) -> float:
    d = (a.astype(np.float64) - b.astype(np.float64))[region]
    mse = float((d**2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--video", required=True)
    ap.add_argument("--audio", required=True)
    ap.add_argument("--face-cache", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="v1.6")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--compile", default="regional")
    ap.add_argument("--modes", default="exact")
    ap.add_argument("--quality-frames", type=int, default=48)
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--skip-reference", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = RunOptions(seed=1247, face_cache=args.face_cache, force=True)
    modes = args.modes.split(",")

    t = time.perf_counter()
    pipe = build(args.preset, args.dtype, args.compile)
    load_s = time.perf_counter() - t
    wav = load_audio(args.audio)[: int(args.quality_frames * 16000 / FPS)]
    results = {}
    for mode in modes:
        opts = base if mode == "exact" else _with_mode(base, mode)
        if not args.skip_timing:
            first = timed_run(pipe, args.video, args.audio, out / f"{mode}.mp4", opts)
            second = timed_run(pipe, args.video, args.audio, out / f"{mode}.mp4", opts)
            emit(
                {
                    "what": "end_to_end", "preset": args.preset, "dtype": args.dtype,
                    "compile": args.compile, "mode": mode, "load_s": round(load_s, 1),
                    "first_run": first, "warm_run": second,
                }
            )  # fmt: skip
        results[mode] = frames_in_memory(pipe, args.video, wav, opts)

    if not args.skip_reference:
        del pipe
        torch._dynamo.reset()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        ref_pipe = build(args.preset, "fp32", "none")
        reference = frames_in_memory(ref_pipe, args.video, wav, base)
        info = probe(args.video)
        src = FileFrames(args.video, info, info.output_frames(FPS)).get(np.arange(len(reference)))
        region = np.abs(reference.astype(np.int16) - src.astype(np.int16)).max(-1) > 0
        region = np.repeat(region[..., None], 3, axis=-1)
        for mode, frames in results.items():
            emit(
                {
                    "what": "quality_vs_fp32_eager", "preset": args.preset, "dtype": args.dtype,
                    "compile": args.compile, "mode": mode, "frames": len(frames),
                    "psnr_changed_pixels_db": round(psnr(frames, reference, region), 2),
                    "psnr_full_frame_db": round(psnr(frames, reference, np.ones_like(region)), 2),
                    "changed_pixel_share": round(float(region.mean()), 4),
                }
            )  # fmt: skip
        if "exact" in results:
            exact = results["exact"]
            for mode, frames in results.items():
                if mode != "exact":
                    emit(
                        {
                            "what": "quality_vs_exact", "mode": mode, "dtype": args.dtype,
                            "psnr_changed_pixels_db": round(psnr(frames, exact, region), 2),
                        }
                    )  # fmt: skip


def _with_mode(base: RunOptions, mode: str) -> RunOptions:
    from dataclasses import replace

    return replace(base, mode=mode)


if __name__ == "__main__":
    main()
