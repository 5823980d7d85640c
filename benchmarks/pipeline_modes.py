"""Every mode end to end on a real clip: frames/s of whole ``lipsync run`` calls (a first and a
warm run), and the output's quality against our fp32 eager path with the same seed (PSNR / SSIM of
the mouth region). One JSON line per result.

Random weights of the preset's real architecture (no official checkpoints on the GPU machine);
face tracks come from a --face-cache folder made beforehand on the CPU (mediapipe's wheel does
not fit beside the others in what travels to the GPU machine).

    python benchmarks/pipeline_modes.py --video V --audio A --face-cache DIR --out OUT_DIR \
        [--preset v1.6] [--dtype bf16] [--compile regional] [--modes exact,fast,dpm6+fast]

A mode spec ending in ``+blocking`` runs inside ``lipsync.transfer.blocking_copies()`` (the
host waits for every copy, as before the pipeline stopped waiting on the GPU): an A/B of that.
``--profile-frames N`` also profiles one run of N frames in the last mode. Results:
docs/PERFORMANCE.md ("Every mode end to end"); was ``gpu_e2e.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import time
from pathlib import Path

import common
import numpy as np
import torch

from lipsync.audio import load_audio
from lipsync.config import LoadOptions
from lipsync.constants import FPS, SAMPLE_RATE
from lipsync.eval.image import psnr as psnr_t
from lipsync.eval.image import ssim
from lipsync.loading import load_models
from lipsync.media import probe
from lipsync.media.frames import FileFrames
from lipsync.pipeline import LipSyncPipeline, RunOptions
from lipsync.transfer import blocking_copies

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a smoke test with --preset tiny


emit = common.emit


def build(preset: str, dtype: str, compile_mode: str, fp8: bool = False) -> LipSyncPipeline:
    load = LoadOptions(preset=preset, device=DEVICE, dtype=dtype, compile=compile_mode, fp8=fp8,
                       random_weights=True)  # fmt: skip
    return LipSyncPipeline(load_models(load))


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
    frames, _ = pipe.run_frames(FileFrames(video, info, info.output_frames(FPS)), wav, options)
    return frames


def psnr(a: np.ndarray, b: np.ndarray, region: np.ndarray) -> float:
    d = (a.astype(np.float64) - b.astype(np.float64))[region]
    mse = float((d**2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def run_mode(pipe, args, base: RunOptions, mode: str, out: Path, load_s: float, wav):
    """Time two whole runs in ``mode`` (unless --skip-timing); its output frames in memory."""
    opts = common.with_mode(base, mode.removesuffix("+blocking"))
    if not args.skip_timing:
        first = timed_run(pipe, args.video, args.audio, out / f"{mode}.mp4", opts)
        while args.start_after and not Path(args.start_after).exists():
            time.sleep(1)  # another job shares the GPU until then: keep it out of the timing
        second = timed_run(pipe, args.video, args.audio, out / f"{mode}.mp4", opts)
        emit(
            {
                "what": "end_to_end", "preset": args.preset, "dtype": args.dtype,
                "compile": args.compile, "mode": mode, "load_s": round(load_s, 1),
                "first_run": first, "warm_run": second,
            }
        )  # fmt: skip
    return frames_in_memory(pipe, args.video, wav, opts)


def report_quality(args, base: RunOptions, wav, results: dict) -> None:
    """Each mode's output against our fp32 eager path (and the approximate modes against
    exact): PSNR / SSIM of the mouth region, PSNR of the changed pixels and the whole frame."""
    for mode, frames in results.items():
        other = results.get(mode.removesuffix("+blocking"))
        if mode.endswith("+blocking") and other is not None:
            emit({"what": "same_output_blocking_vs_async", "mode": mode,
                  "identical": bool(np.array_equal(frames, other))})  # fmt: skip
    if args.skip_reference:
        return
    torch._dynamo.reset()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    ref_pipe = build(args.preset, "fp32", "none")
    reference = frames_in_memory(ref_pipe, args.video, wav, base)
    info = probe(args.video)
    src = FileFrames(args.video, info, info.output_frames(FPS)).get(np.arange(len(reference)))
    # pixels the reference changed in any frame: the pasted-back mouth region
    region2d = (np.abs(reference.astype(np.int16) - src.astype(np.int16)).max(-1) > 0).any(0)
    region = np.broadcast_to(region2d[None, ..., None], reference.shape)
    for mode, frames in results.items():
        emit(
            {
                "what": "quality_vs_fp32_eager", "preset": args.preset, "dtype": args.dtype,
                "compile": args.compile, "mode": mode, "frames": len(frames),
                "mouth": mouth_quality(frames, reference, region2d),
                "psnr_changed_pixels_db": round(psnr(frames, reference, region), 2),
                "psnr_full_frame_db": round(psnr(frames, reference, np.ones_like(region)), 2),
                "changed_pixel_share": round(float(region2d.mean()), 4),
            }
        )  # fmt: skip
    exact = results.get("exact")
    for mode, frames in results.items():
        if exact is not None and mode != "exact":
            emit({"what": "quality_vs_exact", "mode": mode, "dtype": args.dtype,
                  "mouth": mouth_quality(frames, exact, region2d)})  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    ap.add_argument("--start-after", default=None, help="time warm runs once this file exists")
    ap.add_argument("--fp8", action="store_true", help="FP8 linear layers in the U-Net")
    ap.add_argument(
        "--profile-frames", type=int, default=0,
        help="after the timings: profile a run of this many frames in the last mode",
    )  # fmt: skip
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = RunOptions(seed=1247, face_cache=args.face_cache, force=True)
    modes = args.modes.split(",")

    t = time.perf_counter()
    pipe = build(args.preset, args.dtype, args.compile, args.fp8)
    load_s = time.perf_counter() - t
    wav = load_audio(args.audio)[: int(args.quality_frames * SAMPLE_RATE / FPS)]
    results = {}
    for mode in modes:
        with blocking_copies() if mode.endswith("+blocking") else contextlib.nullcontext():
            results[mode] = run_mode(pipe, args, base, mode, out, load_s, wav)
        digest = hashlib.md5(results[mode].tobytes()).hexdigest()
        emit({"what": "output_md5", "mode": mode, "frames": len(results[mode]), "md5": digest})
    if args.profile_frames:
        opts = common.with_mode(base, modes[-1].removesuffix("+blocking"))
        profile_run(pipe, args, opts, out, modes[-1])
    del pipe
    report_quality(args, base, wav, results)


def profile_run(pipe, args, opts, out: Path, mode: str) -> None:
    """torch.profiler over one run of --profile-frames frames: wall time, GPU kernel time, and
    each pipeline range's CPU and GPU time (lipsync.* record_function ranges)."""
    from torch.profiler import ProfilerActivity, profile

    clip = common.write_audio_clip(args.audio, args.profile_frames, out / "profile_audio.wav")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    pipe.run(args.video, clip, out / "profile.mp4", opts)  # warm (shapes of a short last chunk)
    with profile(activities=acts) as prof:
        t = time.perf_counter()
        report = pipe.run(args.video, clip, out / "profile.mp4", opts)
        wall = time.perf_counter() - t
    prof.export_chrome_trace(str(out / f"trace_{mode}.json"))
    avg = prof.key_averages()
    # kernels only: the lipsync.* ranges also appear as GPU annotations spanning their kernels
    kernel_us = sum(
        e.self_device_time_total
        for e in avg
        if e.device_type.name == "CUDA" and not e.key.startswith("lipsync.")
    )
    ranges = {
        e.key: {"calls": e.count, "cpu_ms": round(e.cpu_time_total / 1e3, 1),
                "gpu_ms": round(e.device_time_total / 1e3, 1)}
        for e in avg if e.key.startswith("lipsync.")
    }  # fmt: skip
    emit(
        {
            "what": "profile", "mode": mode, "frames": report.frames, "wall_s": round(wall, 3),
            "gpu_kernel_s": round(kernel_us / 1e6, 3),
            "gpu_busy_share": round(kernel_us / 1e6 / wall, 3), "ranges": ranges,
            "top_ops": avg.table(sort_by="device_time_total", row_limit=25).splitlines(),
        }
    )  # fmt: skip


def mouth_quality(frames: np.ndarray, ref: np.ndarray, region: np.ndarray) -> dict:
    """PSNR and SSIM of (n, H, W, 3) uint8 frames on the pixels any run changed (region (H, W)),
    within the region's bounding box (SSIM windows centred in the region)."""
    ys, xs = np.nonzero(region)
    box = (slice(max(ys.min() - 8, 0), ys.max() + 9), slice(max(xs.min() - 8, 0), xs.max() + 9))

    def crop(x):
        return torch.from_numpy(x[:, box[0], box[1]]).permute(0, 3, 1, 2).double() / 255

    r = torch.from_numpy(region[box])
    a, b = crop(frames), crop(ref)
    return {"psnr_db": round(psnr_t(a, b, r), 2), "ssim": round(ssim(a, b, r), 5)}


if __name__ == "__main__":
    main()
