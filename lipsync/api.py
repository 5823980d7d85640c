"""The Python API: ``from lipsync import LipSync``.

    >>> from lipsync import LipSync
    >>> ls = LipSync.from_pretrained(version="1.6")            # cuda + fp16 when a GPU is there
    >>> report = ls.run("talk.mp4", "speech.wav", "synced.mp4", steps=20, seed=1)
    >>> report.frames, report.fps
    >>> frames, report = ls.run_arrays(frames, waveform)       # in memory, for services
    >>> ls = LipSync.from_onnx("onnx-v1.6", provider="cpu")   # an `lipsync export onnx` folder
    >>> ls = LipSync.from_pretrained("1.5", unet="runs/mine")  # our own U-Net in a preset

``run`` keyword options are the fields of :class:`lipsync.pipeline.RunOptions` (``steps``,
``guidance``, ``seed``, ``mask_path``, ``min_face_size``, ``crf``, ``force`` …).
"""

from __future__ import annotations

import os
from dataclasses import fields, replace

import numpy as np
import torch

from lipsync.config import LoadOptions, OnnxOptions
from lipsync.constants import CompileOption, Provider
from lipsync.errors import ConfigError
from lipsync.loading import dtype_name, load_models
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
        compile: CompileOption = "none",
        fp8: bool = False,
        random_weights: bool = False,
        unet: str | os.PathLike | None = None,
        bundle_dir: str | os.PathLike | None = None,
    ) -> LipSync:
        """Load a preset (``"1.6"``, ``"1.5"``, ``"tiny"`` or ``"demo"``): the official ones from
        the ``lipsync download`` cache, ``demo`` from the bundle shipped with lipsync.

        The arguments are the fields of :class:`~lipsync.config.LoadOptions`; ``None`` follows
        the default policy of :mod:`lipsync.loading` (CUDA when present; fp16 on CUDA, fp32 on
        the CPU; on the CPU all cores but one, leaving one for the decoder and encoder
        threads). ``compile``: ``none``, ``regional`` or ``full``
        (:func:`lipsync.accel.compile.compile_unet`; pays off on CUDA after minutes of
        compiling, docs/PERFORMANCE.md), or ``auto`` (compiled only from matching precompiled
        artefacts, :mod:`lipsync.accel.precompiled`; else eager). ``fp8``: run the U-Net's big
        linear layers in FP8 (:mod:`lipsync.accel.fp8`; CUDA with compute capability ≥ 8.9 and
        a bf16/fp16 model, else a ConfigError; approximate). ``unet``: one of our own U-Nets
        replacing the preset's (:func:`lipsync.own_checkpoints.load_own_unet`; its geometry must
        fit the preset). ``bundle_dir``: the ``demo`` preset's bundle folder, if not the shipped
        one.
        """
        options = LoadOptions(
            preset=version, device=None if device is None else str(device),
            dtype=dtype_name(dtype), checkpoint_dir=checkpoint_dir, cpu_threads=cpu_threads,
            compile=compile, fp8=fp8, random_weights=random_weights, unet=unet,
            bundle_dir=bundle_dir,
        )  # fmt: skip
        return cls.from_options(options)

    @classmethod
    def from_onnx(
        cls,
        onnx_dir: str | os.PathLike,
        provider: Provider = "auto",
        preset: str | None = None,
        threads: int | None = None,
    ) -> LipSync:
        """Run on an ``lipsync export onnx`` folder through ONNX Runtime (docs/EXPORT.md);
        ``preset``, when given, must be the export's. Needs ``pip install lipsync[export]``."""
        return cls.from_options(OnnxOptions(onnx_dir, provider, preset, threads))

    @classmethod
    def from_options(cls, options: LoadOptions | OnnxOptions) -> LipSync:
        """Load the models ``options`` describe: PyTorch models
        (:func:`lipsync.loading.load_models`) or an ONNX export (:class:`OnnxOptions`)."""
        if isinstance(options, OnnxOptions):
            # onnxruntime is an optional dependency (the export extra): imported when asked for
            from lipsync.export.ort_engine import OrtEngine

            return cls(LipSyncPipeline(OrtEngine.from_options(options)))
        models = load_models(options)
        # a few-step student bundle runs at its own steps, guidance and scheduler by default
        return cls(LipSyncPipeline(models), _options(RunOptions(), models.denoise_defaults))

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
