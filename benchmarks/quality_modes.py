"""Quality and speed of the fast modes (issue #5) against the exact fp32 eager reference.

Runs the chunk denoiser (VAE encode → U-Net loop → VAE decode → paste-back) on the same inputs
with the same seed in

- ``exact-fp32-eager``: the reference (fp32, TF32 off, no compilation);
- ``exact-<dtype>`` for each ``--dtypes`` entry (compiled with ``--compile``);
- every ``--modes`` entry in ``--mode-dtype`` (same compilation);
- with ``--fp8`` (CUDA, capability ≥ 8.9): ``exact`` and ``fast`` with FP8 linear layers;

and reports, per variant, PSNR and SSIM of the MOUTH REGION (the mask's generated area, where
the outputs can differ at all) against the reference and against exact mode in the same dtype,
plus the U-Net loop's seconds per chunk and frames/s (after a warm-up chunk). One JSON object.

Inputs (``--source``): ``demo`` (default): real aligned faces and Whisper windows of the demo
clip, aligned by the pipeline's own functions (face tracks from ``--face-cache`` when present,
else FaceMesh on the CPU, then stored there); ``synthetic``: random faces and audio like
``lipsync bench``.

Mode specs (``--modes``, comma-separated; ``+`` joins parts): ``exact``, ``fast`` (the preset),
``cacheN`` (DeepCache interval N), ``branchN`` (DeepCache branch N), ``guideF`` (guidance on
the first share F of the steps), ``dpmN`` / ``ddimN`` (scheduler and N steps). Example:
``fast,cache2,guide0.5,dpm10,dpm10+fast``.

    python benchmarks/quality_modes.py --preset tiny --out q.json                  # CPU, seconds
    python benchmarks/quality_modes.py --preset 1.6 --random-weights --dtypes bf16 \\
        --compile regional --face-cache FACES --out q.json                          # H100

Without official checkpoints the numbers come from random-weight models; the JSON says so.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import common
import torch

from lipsync.accel.compile import compile_unet
from lipsync.accel.fp8 import convert_unet_to_fp8
from lipsync.audio import frame_windows, load_audio
from lipsync.config import LoadOptions
from lipsync.constants import AUDIO_CHANNELS, AUDIO_TOKENS, FPS, SAMPLE_RATE
from lipsync.diffusion import ChunkDenoiser, DenoiseOptions
from lipsync.engine import chunk_generator, chunk_noise
from lipsync.eval.image import psnr, ssim
from lipsync.face.align import crops_to_model_input, warp_faces
from lipsync.face.mask import make_mask
from lipsync.loading import load_models, parse_dtype
from lipsync.media import frames_for_audio, output_frame_indices, probe
from lipsync.media.frames import FileFrames
from lipsync.pipeline import LipSyncPipeline, RunOptions
from lipsync.progress import Progress
from lipsync.tools.bench import sync

DEFAULT_MODES = "fast,cache3,cache2,cache3+branch1,guide0.5,dpm10,dpm10+fast"
CAVEAT_RANDOM = (
    "random weights: the official checkpoints were not loaded, so these PSNR/SSIM values measure "
    "how far each mode's arithmetic drifts from the exact path on a random-weight network of the "
    "same architecture, not the visual quality of real lip sync; re-measure with official "
    "weights (and a sync metric) before choosing a default"
)


shared_media = common.shared_media
parse_mode = common.parse_mode


def synthetic_inputs(n: int, res: int, device, seed: int):
    g = torch.Generator(device=device).manual_seed(seed)
    faces = torch.rand(n, 3, res, res, device=device, generator=g) * 2 - 1
    audio = torch.randn(n, AUDIO_TOKENS, AUDIO_CHANNELS, device=device, generator=g)
    return faces, audio


def demo_inputs(models, video, audio_path, n: int, start: int, face_cache: str | None):
    """Aligned faces (n, 3, r, r) in [-1, 1] and Whisper windows (n, 50, 384) of output frames
    start..start+n-1, exactly as the pipeline builds them for its chunks."""
    pipe = LipSyncPipeline(models)
    info = probe(video)
    wav = load_audio(audio_path)
    n_video = info.output_frames(FPS)
    source_index = output_frame_indices(n_video, frames_for_audio(len(wav), FPS, SAMPLE_RATE))
    if start + n > len(source_index):
        raise SystemExit(f"the clip has {len(source_index)} output frames; asked for {start + n}")
    frames = FileFrames(video, info, n_video)
    try:
        # the whole track, as a run makes it, so the face cache entry is shared with runs
        track = pipe.track_faces(
            frames, int(source_index.max()) + 1, RunOptions(face_cache=face_cache), Progress()
        )
        idx = source_index[start : start + n]
        if not track.usable[idx].all():
            raise SystemExit("some of the chosen frames have no usable face; pick --start-frame")
        src = torch.from_numpy(frames.get(idx)).to(models.device)
    finally:
        frames.close()
    res = models.preset.resolution
    faces = crops_to_model_input(warp_faces(src, track.matrices[idx], res), res).float()
    features = models.audio.lazy_features(wav)
    windows = frame_windows(features, FPS, start=start, stop=start + n).float()
    return faces, windows.to(models.device)


def run_variant(unet, vae, mask, options, faces, audio, frames, seed, device, repeats):
    """Warm-up chunk, then ``repeats`` timed passes over all chunks -> (outputs, timing)."""
    den = ChunkDenoiser(unet, vae, mask, options)
    latent = mask.shape[-1] // 8
    chunks = faces.shape[0] // frames

    def one_pass():
        outs = []
        for c in range(chunks):
            sl = slice(c * frames, (c + 1) * frames)
            noise = chunk_noise(seed, frames, latent, device, torch.float32)
            gen = chunk_generator(seed, c, device)
            outs.append(den(faces[sl], audio[sl], noise, gen))
        return torch.cat(outs)

    t = time.perf_counter()
    den(faces[:frames], audio[:frames], chunk_noise(seed, frames, latent, device, torch.float32),
        chunk_generator(seed, 0, device))  # fmt: skip
    sync(device)
    warmup_s = time.perf_counter() - t
    den.stage_seconds = {}
    t = time.perf_counter()
    for _ in range(repeats):
        out = one_pass()
    sync(device)
    total = time.perf_counter() - t
    n = frames * chunks * repeats
    unet_s = den.stage_seconds.get("unet", 0.0)
    timing = {
        "warmup_chunk_s": round(warmup_s, 3),
        "unet_loop_s_per_chunk": round(unet_s / (chunks * repeats), 4),
        "unet_loop_fps": round(n / unet_s, 2) if unet_s else None,
        "model_fps": round(n / total, 2),
        "ms_per_frame": {k: round(v / n * 1e3, 2) for k, v in den.stage_seconds.items()},
    }
    return out, timing


def compare(out, ref, region) -> dict:
    a = ((out.float() + 1) / 2).clamp(0, 1).cpu()
    b = ((ref.float() + 1) / 2).clamp(0, 1).cpu()
    diff = (a - b)[..., region].abs()
    return {
        "psnr_db": round(psnr(a, b, region), 2),
        "ssim": round(ssim(a, b, region), 5),
        "max_abs_diff": round(float(diff.max()), 4),
        "mean_abs_diff": round(float(diff.mean()), 5),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--device", default=None)
    ap.add_argument("--source", choices=("demo", "synthetic"), default="demo")
    ap.add_argument("--video", default=None)
    ap.add_argument("--audio", default=None)
    ap.add_argument("--face-cache", default=None, help="folder of face tracks (lipsync run's)")
    ap.add_argument("--frames", type=int, default=16, help="frames per chunk")
    ap.add_argument("--chunks", type=int, default=1)
    ap.add_argument("--start-frame", type=int, default=0)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=1.5)
    ap.add_argument("--seed", type=int, default=1247)
    ap.add_argument("--dtypes", default=None, help="exact-mode dtypes (default: bf16 on cuda)")
    ap.add_argument("--mode-dtype", default=None, help="dtype of the modes (default: 1st dtype)")
    ap.add_argument("--modes", default=DEFAULT_MODES)
    ap.add_argument("--compile", default="none", help="none, regional, full (not the reference)")
    ap.add_argument("--fp8", action="store_true", help="add exact and fast with FP8 layers")
    ap.add_argument("--repeats", type=int, default=1, help="timed passes after the warm-up")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtypes = [d for d in (args.dtypes or "bf16").split(",") if d]
    mode_dtype = args.mode_dtype or (dtypes[0] if dtypes else "fp32")
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)

    load = LoadOptions(preset=args.preset, device=str(device), dtype="fp32",
                       random_weights=args.random_weights)  # fmt: skip
    models = load_models(load)
    res = models.preset.resolution
    random_weights = models.random_weights
    n = args.frames * args.chunks
    if args.source == "demo":
        media = shared_media()
        video = args.video or str(media / "demo1_video.mp4")
        audio_path = args.audio or str(media / "demo1_audio.wav")
        faces, audio = demo_inputs(models, video, audio_path, n, args.start_frame, args.face_cache)
    else:
        video = audio_path = None
        faces, audio = synthetic_inputs(n, res, device, args.seed)
    mask_np = make_mask(res)
    mask = torch.from_numpy(mask_np).to(device)
    region = torch.from_numpy(mask_np < 0.5)  # the generated (mouth) area

    copies: dict[tuple[str, bool], tuple] = {}

    def model_copy(dtype: str, fp8: bool = False):
        """U-Net and VAE in ``dtype`` (FP8 layers if asked), compiled with --compile."""
        key = (dtype, fp8)
        if key not in copies:
            dt = parse_dtype(dtype)
            unet = copy.deepcopy(models.unet).to(dt)
            vae = copy.deepcopy(models.vae).to(dt)
            if fp8:
                convert_unet_to_fp8(unet)
            unet = compile_unet(unet, args.compile)
            copies[key] = (unet, vae)
        return copies[key]

    common = {"guidance": args.guidance}
    report: dict = {
        "what": "quality_modes",
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "preset": models.preset.name,
        "weights": "random" if random_weights else "official",
        "caveat": CAVEAT_RANDOM if random_weights else None,
        "source": args.source,
        "video": video,
        "audio": audio_path,
        "start_frame": args.start_frame if args.source == "demo" else None,
        "frames_per_chunk": args.frames,
        "chunks": args.chunks,
        "seed": args.seed,
        "guidance": args.guidance,
        "compile": args.compile,
        "metric_region": "mask generate area (mouth), "
        f"{int(region.sum())} of {res * res} pixels; images in [0, 1]",
        "variants": [],
    }

    # the reference: exact, fp32, eager, TF32 off
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    ref_opts = DenoiseOptions.for_mode("exact", steps=args.steps, **common)
    ref, timing = run_variant(models.unet, models.vae, mask, ref_opts, faces, audio,
                              args.frames, args.seed, device, args.repeats)  # fmt: skip
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    report["reference"] = {
        "name": "exact-fp32-eager",
        "denoise": ref_opts.as_dict(),
        **timing,
    }

    plan = [(f"exact-{dt}", dt, {"mode": "exact", "steps": args.steps}, False) for dt in dtypes]
    for spec in [m for m in args.modes.split(",") if m]:
        plan.append((f"{spec}-{mode_dtype}", mode_dtype, parse_mode(spec, args.steps), False))
    if args.fp8:
        fp8_dt = mode_dtype if mode_dtype != "fp32" else "bf16"
        for spec in ("exact", "fast"):
            plan.append((f"{spec}-{fp8_dt}-fp8", fp8_dt, parse_mode(spec, args.steps), True))

    exact_by_dtype: dict[str, torch.Tensor] = {}
    for name, dt, spec, fp8 in plan:
        options = DenoiseOptions.for_mode(**spec, **common)
        options.validate()
        unet, vae = model_copy(dt, fp8)
        out, timing = run_variant(unet, vae, mask, options, faces, audio, args.frames,
                                  args.seed, device, args.repeats)  # fmt: skip
        entry = {
            "name": name,
            "dtype": dt,
            "fp8": fp8,
            "compile": args.compile,
            "exact_mode": options.exact,
            "denoise": options.as_dict(),
            **timing,
            "vs_reference": compare(out, ref, region),
        }
        same = spec == {"mode": "exact", "steps": args.steps}
        if same and not fp8:
            exact_by_dtype.setdefault(dt, out)
        elif dt in exact_by_dtype:  # the approximation alone, without the dtype's rounding
            entry["vs_exact_same_dtype"] = compare(out, exact_by_dtype[dt], region)
        ref_fps = report["reference"]["unet_loop_fps"]
        exact_fps = next(
            (v["unet_loop_fps"] for v in report["variants"] if v["name"] == f"exact-{dt}"), None
        )
        if exact_fps and timing["unet_loop_fps"]:
            entry["unet_speedup_vs_exact_same_dtype"] = round(
                timing["unet_loop_fps"] / exact_fps, 2
            )
        if ref_fps and timing["unet_loop_fps"]:
            entry["unet_speedup_vs_reference"] = round(timing["unet_loop_fps"] / ref_fps, 2)
        report["variants"].append(entry)
        print(json.dumps({k: entry[k] for k in ("name", "unet_loop_fps", "vs_reference")}),
              file=sys.stderr, flush=True)  # fmt: skip

    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return report


if __name__ == "__main__":
    main()
