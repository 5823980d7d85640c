"""The Python API: ``from lipsync import LipSync``.

    >>> from lipsync import LipSync
    >>> ls = LipSync.from_pretrained(version="1.6")            # cuda + fp16 when a GPU is there
    >>> report = ls.run("talk.mp4", "speech.wav", "synced.mp4", steps=20, seed=1)
    >>> report.frames, report.fps
    >>> frames, report = ls.run_arrays(frames, waveform)       # in memory, for services

``run`` keyword options are the fields of :class:`lipsync.pipeline.RunOptions` (``steps``,
``guidance``, ``seed``, ``mask_path``, ``min_face_size``, ``crf``, ``force`` …).
"""

from __future__ import annotations

import os
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import torch

from lipsync.errors import ConfigError
from lipsync.models.bundle import load_models, parse_dtype
from lipsync.pipeline import LipSyncPipeline, Progress, RunOptions, RunReport

_OPTION_NAMES = {f.name for f in fields(RunOptions)}


def _options(base: RunOptions, kwargs: dict) -> RunOptions:
    unknown = sorted(set(kwargs) - _OPTION_NAMES)
    if unknown:
        raise ConfigError(
            f"unknown option(s): {', '.join(unknown)}; known: {', '.join(sorted(_OPTION_NAMES))}"
        )
    return replace(base, **kwargs)


class LipSync:
    """Loaded models plus the pipeline; create once, call ``run`` many times."""

    def __init__(self, pipeline: LipSyncPipeline, defaults: RunOptions | None = None):
        self.pipeline = pipeline
        self.defaults = defaults or RunOptions()

    @property
    def models(self):
        return self.pipeline.models

    @classmethod
    def from_pretrained(
        cls,
        version: str = "1.6",
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        cpu_threads: int | None = None,
        compile: str = "none",
        fp8: bool = False,
    ) -> LipSync:
        """Load a preset (``"1.6"``, ``"1.5"`` or ``"tiny"``) from the ``lipsync download`` cache.

        ``device`` defaults to CUDA when available; ``dtype`` to fp16 on CUDA and fp32 on the
        CPU. On the CPU, torch uses all cores but one (``cpu_threads``), leaving one for the
        decoder and encoder threads that run beside the model. ``compile``: ``none``,
        ``regional`` or ``full`` (:func:`lipsync.accel.compile.compile_unet`; on CUDA,
        ``regional`` makes a U-Net call 1.6× faster after about two minutes of compiling).
        ``fp8``: run the U-Net's big linear layers in FP8 (:mod:`lipsync.accel.fp8`; CUDA with
        compute capability ≥ 8.9 and a bf16/fp16 model, else a ConfigError; approximate).
        """
        dev = torch.device(device) if device is not None else _default_device()
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for, but no CUDA GPU is available")
        dt = parse_dtype(dtype) if dtype is not None else (
            torch.float16 if dev.type == "cuda" else torch.float32
        )  # fmt: skip
        if dev.type == "cpu":
            torch.set_num_threads(cpu_threads or max(1, (os.cpu_count() or 2) - 1))
        root = Path(checkpoint_dir).expanduser() if checkpoint_dir else None
        if fp8:
            from lipsync.accel.fp8 import require_fp8_device

            require_fp8_device(dev)  # before the minutes of loading
            if dt not in (torch.bfloat16, torch.float16):
                raise ConfigError("--fp8 needs --dtype bf16 or fp16")
        models = load_models(version, root, dev, dt)
        if fp8:
            from lipsync.accel.fp8 import convert_unet_to_fp8

            convert_unet_to_fp8(models.unet)
        if compile != "none":
            from lipsync.accel.compile import compile_unet, compile_vae

            models.unet = compile_unet(models.unet, compile)
            compile_vae(models.vae, "regional")  # H100: VAE 26.5 -> 13.6 ms per frame
        return cls(LipSyncPipeline(models))

    def run(
        self,
        video_path: str | os.PathLike,
        audio_path: str | os.PathLike,
        out_path: str | os.PathLike,
        progress: Progress | None = None,
        **options,
    ) -> RunReport:
        """Lip-sync ``video_path`` to ``audio_path`` into ``out_path``; returns a report."""
        return self.pipeline.run(
            video_path, audio_path, out_path, _options(self.defaults, options), progress
        )

    def run_arrays(
        self,
        frames: np.ndarray,
        waveform: np.ndarray,
        progress: Progress | None = None,
        **options,
    ) -> tuple[np.ndarray, RunReport]:
        """In memory: frames (N, H, W, 3) uint8 RGB at 25 fps + 16 kHz mono float32 audio in,
        synced frames out (as many as the audio lasts, looping the video if needed)."""
        return self.pipeline.run_arrays(
            frames, waveform, _options(self.defaults, options), progress
        )


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
