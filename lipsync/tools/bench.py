"""``lipsync bench``: timing helpers and the model-level and end-to-end benchmarks.

Device work is timed with CUDA events after warm-up (median of several runs); on the CPU with a
host clock. FLOPs are counted once with ``torch.utils.flop_counter`` (matmuls, convolutions and
attention), so TFLOP/s is "useful model FLOPs per second", comparable across implementations.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import wave
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from lipsync.audio import load_audio
from lipsync.config import LoadOptions, get_preset
from lipsync.constants import (
    AUDIO_CHANNELS,
    AUDIO_TOKENS,
    SAMPLE_RATE,
    CompileMode,
    TemporalAttentionKind,
)
from lipsync.diffusion import ChunkDenoiser, DenoiseOptions, initial_noise
from lipsync.face.mask import make_mask
from lipsync.loading import ModelBundle, compile_models, dtype_name, load_models
from lipsync.models.transformer import set_temporal_attention
from lipsync.models.unet import StepCache, UNet3D, random_unet
from lipsync.pipeline import LipSyncPipeline, RunOptions
from lipsync.tools.gpu_busy import GpuBusy


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, warmup: int = 2, iters: int = 5):
    """Median seconds of ``fn()`` after ``warmup`` calls (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def count_flops(fn: Callable[[], object]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@dataclass
class UNetInputs:
    sample: torch.Tensor  # (b, 13, f, h, w)
    timestep: torch.Tensor
    audio: torch.Tensor | None  # ((b - null) * f, 50, 384)
    null_clips: int


def make_unet_inputs(
    batch: int, frames: int, latent: int, device, dtype, null_clips: int = 0, seed: int = 0
) -> UNetInputs:
    g = torch.Generator(device=device).manual_seed(seed)
    sample = torch.randn((batch, 13, frames, latent, latent), generator=g, device=device)
    rows = (batch - null_clips) * frames
    shape = (rows, AUDIO_TOKENS, AUDIO_CHANNELS)
    audio = torch.randn(shape, generator=g, device=device) if rows else None
    return UNetInputs(
        sample.to(dtype),
        torch.tensor(501, device=device),
        audio.to(dtype) if audio is not None else None,
        null_clips,
    )


def build_unet(preset: str, device, dtype, seed: int = 0) -> UNet3D:
    """Random-weight U-Net of a preset's architecture, built directly on ``device``."""
    return random_unet(get_preset(preset).unet_config, seed, device, dtype)


@dataclass
class UNetBenchResult:
    name: str
    seconds_per_call: float
    frames_per_call: int
    gflop_per_call: float
    tflops: float
    peak_gib: float
    compile_s: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def bench_unet_call(
    name: str,
    fn: Callable[[UNetInputs], torch.Tensor],
    inputs: UNetInputs,
    flops: int,
    device: torch.device,
    warmup: int = 3,
    iters: int = 10,
) -> UNetBenchResult:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        fn(inputs)  # first call: compilation, autotuning, graph capture
        sync(device)
        first = time.perf_counter() - t0
        seconds = time_fn(lambda: fn(inputs), device, warmup, iters)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    b, _, f = inputs.sample.shape[:3]
    return UNetBenchResult(
        name=name,
        seconds_per_call=seconds,
        frames_per_call=b * f,
        gflop_per_call=flops / 1e9,
        tflops=flops / seconds / 1e12,
        peak_gib=peak,
        compile_s=max(0.0, first - seconds),
    )


def matmul_peak_tflops(device: torch.device, n: int = 8192) -> float | None:
    """Measured bf16 matrix rate of this GPU (the denominator of 'share of peak')."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    seconds = time_fn(lambda: a @ b, device, warmup=3, iters=10)
    return 2 * n**3 / seconds / 1e12


def unet_flops_by_call(unet: UNet3D, frames: int, latent: int, options, device, dtype) -> dict:
    """FLOPs of each kind of U-Net call a denoising run with ``options`` makes:
    ``{(guided, full): flops}`` (guided: the CFG batch of 2 clips; full: every layer, else
    the shallow part a DeepCache step runs). Count before compiling (see bench_model)."""
    counts = {}
    with torch.inference_mode():
        for guided, full in sorted(set(options.plan())):
            batch = 2 if guided else 1
            inp = make_unet_inputs(batch, frames, latent, device, dtype, null_clips=batch - 1)

            def call(cache=None, inp=inp):
                return unet(inp.sample, inp.timestep, inp.audio, inp.null_clips, cache=cache)

            if full:
                counts[(guided, full)] = count_flops(call)
            else:
                cache = StepCache(options.cache_branch)
                call(cache)  # a full call stores the deep feature
                cache.refresh = False
                counts[(guided, full)] = count_flops(lambda cache=cache: call(cache))
    return counts


@dataclass
class SyntheticChunk:
    """One chunk of synthetic faces/audio/noise and a denoiser for it (bench and profile)."""

    models: ModelBundle
    denoiser: ChunkDenoiser
    faces: torch.Tensor  # (f, 3, r, r) in [-1, 1]
    audio: torch.Tensor  # (f, 50, 384)
    noise: torch.Tensor  # (1, 4, f, r/8, r/8)
    generator: torch.Generator

    @property
    def device(self) -> torch.device:
        return self.models.device

    @property
    def dtype(self) -> str:
        return dtype_name(self.models.dtype)

    def run(self) -> torch.Tensor:
        return self.denoiser(self.faces, self.audio, self.noise, self.generator)

    def compile(self, mode: CompileMode) -> None:
        """Compile like ``lipsync run --compile`` (:func:`lipsync.loading.compile_models`); the
        denoiser calls what that leaves in the bundle ("full" modes wrap rather than patch)."""
        compile_models(self.models, mode)
        self.denoiser.unet = self.models.unet


def synthetic_chunk(load: LoadOptions, frames: int, options: DenoiseOptions) -> SyntheticChunk:
    """Load ``load``'s models uncompiled (:func:`lipsync.loading.load_models`; compile later
    with :meth:`SyntheticChunk.compile`) and make one seeded chunk of ``frames`` frames."""
    options.validate()
    models = load_models(replace(load, compile="none"))
    dev = models.device
    res = models.preset.resolution
    den = ChunkDenoiser(models.unet, models.vae, torch.from_numpy(make_mask(res)), options)
    g = torch.Generator(device=dev).manual_seed(0)
    faces = torch.rand(frames, 3, res, res, device=dev, generator=g) * 2 - 1
    audio = torch.randn(frames, AUDIO_TOKENS, AUDIO_CHANNELS, device=dev, generator=g)
    noise = initial_noise(frames, res // 8, g, dev, models.dtype)
    return SyntheticChunk(models, den, faces, audio, noise, g)


def bench_model(
    load: LoadOptions,
    run: RunOptions,
    chunks: int = 2,
    temporal_attention: TemporalAttentionKind = "matmul",
) -> dict:
    """Synthetic-input benchmark of the model stages for ``chunks`` chunks of
    ``run.chunk_frames`` frames:
    VAE encode, the U-Net loop, VAE decode; per-frame milliseconds, frames/s, U-Net TFLOP/s
    and its share of the measured matrix peak, peak GPU memory. The first chunk (warm-up,
    compilation) is reported separately and excluded from the rates.

    ``load`` says what to load and how (``load.compile`` is applied after the FLOPs are
    counted); ``run`` gives the denoising (mode, steps, scheduler…; reported as ``denoise``);
    ``temporal_attention`` how the motion modules attend
    (:func:`lipsync.models.transformer.set_temporal_attention`). FLOPs are those the loop
    really runs (cached steps count their shallow part only); ``unet_flop_share_of_exact``
    compares them with the exact loop's."""
    run.validate()
    options, frames = run.denoise_options(), run.chunk_frames
    chunk = synthetic_chunk(load, frames, options)
    models, den, dev = chunk.models, chunk.denoiser, chunk.device
    res = models.preset.resolution
    set_temporal_attention(models.unet, temporal_attention)

    # FLOPs, counted before compiling: a first call under the FLOP counter's dispatch mode
    # would leave the compiled regions running eagerly
    exact = DenoiseOptions(options.steps, options.guidance, options.scheduler)
    per_call = unet_flops_by_call(models.unet, frames, res // 8, exact, dev, models.dtype)
    per_call |= unet_flops_by_call(models.unet, frames, res // 8, options, dev, models.dtype)
    plan = options.plan()
    flops_per_chunk = sum(per_call[step] for step in plan)
    exact_flops_per_chunk = sum(per_call[step] for step in exact.plan())
    flops_per_call = per_call[(options.guidance > 1.0, True)]  # one exact call
    calls = {
        f"{'guided' if gd else 'conditional'}_{'full' if fl else 'cached'}": plan.count((gd, fl))
        for gd, fl in sorted(set(plan), reverse=True)
    }

    chunk.compile(load.compile)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    den.stage_seconds = {}
    t0 = time.perf_counter()
    chunk.run()
    warmup_s = time.perf_counter() - t0
    den.stage_seconds = {}
    t0 = time.perf_counter()
    with GpuBusy(_device_index(dev)) as busy:
        for _ in range(chunks):
            chunk.run()
        sync(dev)
    total = time.perf_counter() - t0
    n = frames * chunks
    unet_s = den.stage_seconds.get("unet", 0.0)
    tflops = flops_per_chunk * chunks / unet_s / 1e12 if unet_s else 0.0
    peak = matmul_peak_tflops(dev)
    return {
        "preset": models.preset.name,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "dtype": chunk.dtype,
        "torch": torch.__version__,
        "mode": run.mode,
        "denoise": options.as_dict(),
        "exact": options.exact,
        "fp8": models.fp8,
        "compile": load.compile,
        "temporal_attention": temporal_attention,
        "weights": "random" if models.random_weights else "official",
        "frames_per_chunk": frames,
        "steps": options.steps,
        "guidance": options.guidance,
        "unet_calls_per_chunk": calls,
        "chunks_timed": chunks,
        "warmup_chunk_s": round(warmup_s, 3),
        "ms_per_frame": {k: round(v / n * 1e3, 2) for k, v in den.stage_seconds.items()},
        "model_fps": round(n / total, 2),
        "unet_loop_fps": round(n / unet_s, 2) if unet_s else None,
        "unet_gflop_per_call": round(flops_per_call / 1e9, 1),
        "unet_gflop_per_chunk": round(flops_per_chunk / 1e9, 1),
        "unet_flop_share_of_exact": round(flops_per_chunk / exact_flops_per_chunk, 3),
        "unet_tflops": round(tflops, 2),
        "matmul_peak_tflops": round(peak, 1) if peak else None,
        "unet_share_of_peak": round(tflops / peak, 3) if peak else None,
        "peak_gpu_gib": _peak_gib(dev),
        "gpu_busy_share": _rounded(busy.share),
    }


def _peak_gib(dev: torch.device) -> float | None:
    if dev.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)


def _device_index(dev: torch.device) -> int | None:
    if dev.type != "cuda":
        return None
    return dev.index if dev.index is not None else torch.cuda.current_device()


def _rounded(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(x, digits)


def looped_audio(audio: str, seconds: float, path: Path) -> Path:
    """``audio`` (16 kHz mono) repeated to ``seconds``, written to ``path`` as 16-bit WAV: the
    long dub of :func:`bench_video`."""
    wav = load_audio(audio)
    n = int(round(seconds * SAMPLE_RATE))
    samples = np.tile(wav, -(-n // len(wav)))[:n]
    pcm = (np.clip(samples, -1.0, 1.0) * 32767.0).round().astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        out.writeframes(pcm.tobytes())
    return path


def _timed(pipe, video, audio, out, options, runs, dev) -> dict:
    """``runs`` timed runs of one clip: frames/s end to end, stages, pass-2 details, GPU busy."""
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    walls, reports = [], []
    with GpuBusy(_device_index(dev)) as busy:
        for _ in range(runs):
            t0 = time.perf_counter()
            reports.append(pipe.run(video, audio, out, options))
            walls.append(time.perf_counter() - t0)
    report = reports[-1]
    wall = statistics.median(walls)
    return {
        "audio": str(audio),
        "frames": report.frames,
        "frames_with_face": report.frames_with_face,
        "video_frames": report.video_frames,
        "looped": report.looped,
        "runs_timed": runs,
        "wall_s": round(wall, 3),
        "fps_end_to_end": round(report.frames / wall, 2),
        "stage_seconds": {k: round(v, 3) for k, v in report.seconds.items()},
        "details": report.details,
        "peak_gpu_gib": _peak_gib(dev),
        "gpu_busy_share": _rounded(busy.share),
        "gpu_busy_source": busy.source,
    }


def bench_video(
    video: str,
    audio: str,
    load: LoadOptions,
    options: RunOptions,
    runs: int = 1,
    dub_seconds: float | None = None,
) -> dict:
    """A real clip end to end (decode, faces, audio, denoise, restore, encode): one warm-up run
    (compilation, face track into ``options.face_cache`` when given), then ``runs`` timed
    runs. Reports frames/s end to end, the pipeline's stage seconds, peak GPU memory and the
    GPU busy share (NVML) of the timed runs.

    ``dub_seconds``: then also one timed long dub, the clip under its audio repeated to that
    length (looped ping-pong), as ``long_dub``, and its frames/s over the clip's."""
    options = replace(options, force=True)
    options.validate()
    t0 = time.perf_counter()
    models = load_models(load)
    dev = models.device
    pipe = LipSyncPipeline(models)
    load_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="lipsync-bench-") as tmp:
        out = Path(tmp) / "out.mp4"
        t0 = time.perf_counter()
        pipe.run(video, audio, out, options)
        warmup_s = time.perf_counter() - t0
        short = _timed(pipe, video, audio, out, options, runs, dev)
        dub = None
        if dub_seconds is not None:
            long_audio = looped_audio(audio, dub_seconds, Path(tmp) / "dub.wav")
            dub = _timed(pipe, video, long_audio, out, options, 1, dev)
            dub["audio"] = f"{audio} repeated to {dub_seconds:g} s"
    result = {
        "video": str(video),
        "preset": models.preset.name,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "dtype": dtype_name(models.dtype),
        "torch": torch.__version__,
        "compile": load.compile,
        "fp8": models.fp8,
        "weights": "random" if models.random_weights else "official",
        "mode": options.mode,
        "denoise": options.denoise_options().as_dict(),
        "frame_cache_mb": options.frame_cache_mb,
        "load_s": round(load_s, 2),
        "warmup_run_s": round(warmup_s, 2),
        **short,
    }
    if dub is not None:
        result["long_dub"] = dub
        result["long_dub_fps_ratio"] = round(dub["fps_end_to_end"] / short["fps_end_to_end"], 3)
    return result
