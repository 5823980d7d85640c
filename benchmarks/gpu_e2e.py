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
import hashlib
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # quality_modes

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


def build(preset: str, dtype: str, compile_mode: str, fp8: bool = False) -> LipSyncPipeline:
    models = load_models(preset, device=DEVICE, dtype=parse_dtype(dtype), random_weights=True)
    if fp8:
        from lipsync.accel.fp8 import convert_unet_to_fp8

        convert_unet_to_fp8(models.unet)
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
    wav = load_audio(args.audio)[: int(args.quality_frames * 16000 / FPS)]
    results = {}
    for mode in modes:
        blocking_copies(mode.endswith("+blocking"))
        spec = mode.removesuffix("+blocking")
        opts = base if spec == "exact" else with_mode(base, spec)
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
        results[mode] = frames_in_memory(pipe, args.video, wav, opts)
        digest = hashlib.md5(results[mode].tobytes()).hexdigest()
        emit({"what": "output_md5", "mode": mode, "frames": len(results[mode]), "md5": digest})
    for mode, frames in results.items():
        other = results.get(mode.removesuffix("+blocking"))
        if mode.endswith("+blocking") and other is not None:
            emit({"what": "same_output_blocking_vs_async", "mode": mode,
                  "identical": bool(np.array_equal(frames, other))})  # fmt: skip
    if args.profile_frames:
        profile_run(pipe, args, opts, out, modes[-1])

    if not args.skip_reference:
        del pipe
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
        if "exact" in results:
            exact = results["exact"]
            for mode, frames in results.items():
                if mode != "exact":
                    emit(
                        {
                            "what": "quality_vs_exact", "mode": mode, "dtype": args.dtype,
                            "mouth": mouth_quality(frames, exact, region2d),
                        }
                    )  # fmt: skip


def write_audio_clip(audio: str, frames: int, path) -> str:
    """The first ``frames`` video frames' worth of ``audio`` as a 16 kHz mono wav at ``path``."""
    import wave

    wav = load_audio(audio)[: int(frames * 16000 / FPS)]
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes((np.clip(wav, -1, 1) * 32767).astype("<i2").tobytes())
    return str(path)


def profile_run(pipe, args, opts, out: Path, mode: str) -> None:
    """torch.profiler over one run of --profile-frames frames: wall time, GPU kernel time, and
    each pipeline range's CPU and GPU time (lipsync.* record_function ranges)."""
    from torch.profiler import ProfilerActivity, profile

    clip = write_audio_clip(args.audio, args.profile_frames, out / "profile_audio.wav")
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


_ORIGINAL = {}


def blocking_copies(on: bool) -> None:
    """A/B switch for this benchmark: ``+blocking`` after a mode spec makes the host-to-GPU
    copies blocking (lipsync.transfer.BLOCKING) and waits for each chunk's download at once,
    instead of the pipeline's pinned non-blocking copies."""
    import lipsync.pipeline as pl

    try:
        import lipsync.transfer as transfer
    except ImportError:  # an older tree (A/B runs against a previous commit)
        transfer = None
    if not _ORIGINAL:
        _ORIGINAL.update(rgb_to_yuv420=pl.rgb_to_yuv420)
    if transfer is not None:
        transfer.BLOCKING = on
    if not on:
        pl.rgb_to_yuv420 = _ORIGINAL["rgb_to_yuv420"]
        return

    def rgb_to_yuv420(frames):
        out = _ORIGINAL["rgb_to_yuv420"](frames)
        out.planes  # noqa: B018 - wait for the download here, as the blocking path did
        return out

    pl.rgb_to_yuv420 = rgb_to_yuv420


def with_mode(base: RunOptions, spec: str) -> RunOptions:
    """A mode spec of benchmarks/quality_modes.py (``fast``, ``dpm10+fast``, ``cache2``, ...)."""
    from dataclasses import replace

    from quality_modes import parse_mode

    return replace(base, **parse_mode(spec, base.steps))


def mouth_quality(frames: np.ndarray, ref: np.ndarray, region: np.ndarray) -> dict:
    """PSNR and SSIM of (n, H, W, 3) uint8 frames on the pixels any run changed (region (H, W)),
    within the region's bounding box (SSIM windows centred in the region)."""
    from lipsync.eval.image import psnr as psnr_t
    from lipsync.eval.image import ssim

    ys, xs = np.nonzero(region)
    box = (slice(max(ys.min() - 8, 0), ys.max() + 9), slice(max(xs.min() - 8, 0), xs.max() + 9))

    def crop(x):
        return torch.from_numpy(x[:, box[0], box[1]]).permute(0, 3, 1, 2).double() / 255

    r = torch.from_numpy(region[box])
    a, b = crop(frames), crop(ref)
    return {"psnr_db": round(psnr_t(a, b, r), 2), "ssim": round(ssim(a, b, r), 5)}


if __name__ == "__main__":
    main()
