"""Timing helpers and model-level benchmarks (U-Net call, denoising loop, VAE).

Device work is timed with CUDA events after warm-up (median of several runs); on the CPU with a
host clock. FLOPs are counted once with ``torch.utils.flop_counter`` (matmuls, convolutions and
attention), so TFLOP/s is "useful model FLOPs per second", comparable across implementations.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from lipsync.config import get_preset
from lipsync.models.unet import UNet3D


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
    audio = torch.randn((rows, 50, 384), generator=g, device=device) if rows else None
    return UNetInputs(
        sample.to(dtype),
        torch.tensor(501, device=device),
        audio.to(dtype) if audio is not None else None,
        null_clips,
    )


def build_unet(preset: str, device, dtype, seed: int = 0) -> UNet3D:
    """Random-weight U-Net of a preset's architecture, built directly on ``device``."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = UNet3D.from_config(get_preset(preset).unet_config)
    return model.to(dtype).eval().requires_grad_(False)


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
