"""The model side of a run, behind one small interface, so the same pipeline drives local models
or a remote model server.

The pipeline (media, faces, alignment, encoding) needs exactly two things from the models:

* ``lazy_features(waveform)`` -> Whisper features (T, 5, 384), indexable by position tensors
  (what :func:`lipsync.audio.frame_windows` reads);
* ``denoise(faces, windows, mask, seed, chunk_index, options)`` -> faces with the mouth
  regenerated: faces (k, 3, r, r) in [-1, 1], windows (k, 50, 384), mask (r, r) 1 = keep.

:class:`LocalEngine` runs them in this process; ``lipsync.serving.triton.client.TritonEngine``
sends them to Triton. Randomness is a function of ``(seed, chunk_index)`` only
(:func:`chunk_generator`), so a chunk gives the same result whether it runs alone, batched with
other chunks, or on a server.
"""

from __future__ import annotations

import logging
from typing import Protocol

import numpy as np
import torch

from lipsync.accel.precompiled import plan_items
from lipsync.diffusion import ChunkDenoiser, DenoiseOptions, FaceReuse, initial_noise
from lipsync.loading import ModelBundle

log = logging.getLogger(__name__)

_CHUNK_SEED_STRIDE = 1_000_003  # a prime: distinct (seed, chunk) pairs give distinct seeds


def chunk_seed(seed: int, chunk_index: int) -> int:
    """Seed of the VAE posterior draws of chunk ``chunk_index`` of a run seeded ``seed``."""
    return (int(seed) * _CHUNK_SEED_STRIDE + int(chunk_index) + 1) % 2**63


def chunk_noise(
    seed: int, frames: int, latent_size: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """The run's initial noise, (1, 4, frames, h, w): one draw from ``seed`` repeated over every
    frame of every chunk (the reference draws once per video and reuses it)."""
    g = torch.Generator(device=device).manual_seed(int(seed))
    return initial_noise(frames, latent_size, g, device, dtype)


def chunk_generator(seed: int, chunk_index: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(chunk_seed(seed, chunk_index))


class SyncEngine(Protocol):
    """What the pipeline needs from the models (local or remote)."""

    preset_name: str
    dtype_name: str
    resolution: int
    device: torch.device  # where the pipeline keeps frames and crops (cuda or cpu)
    fp8: bool  # the U-Net's big linear layers run in FP8 (reported)

    def lazy_features(self, waveform: np.ndarray): ...

    def denoise(
        self,
        faces: torch.Tensor,
        windows: torch.Tensor,
        mask: torch.Tensor,
        seed: int,
        chunk_index: int,
        options: DenoiseOptions,
        reuse: FaceReuse | None = None,
    ) -> torch.Tensor: ...


class LocalEngine:
    """Models loaded in this process (:func:`lipsync.loading.load_models`)."""

    def __init__(self, models: ModelBundle):
        self.models = models
        self.preset_name = models.preset.name
        self.dtype_name = str(models.dtype).removeprefix("torch.")
        self.resolution = models.preset.resolution
        self.device = models.device
        self.fp8 = models.fp8
        self._denoiser: tuple[DenoiseOptions, torch.Tensor, ChunkDenoiser] | None = None
        self._compiled_frames: set[int] = set()  # chunk lengths the compiled models have seen

    def lazy_features(self, waveform: np.ndarray):
        return self.models.audio.lazy_features(waveform)

    def denoiser(self, mask: torch.Tensor, options: DenoiseOptions) -> ChunkDenoiser:
        """A denoiser for this mask and these options (the last one is kept and reused)."""
        cached = self._denoiser
        if cached is None or cached[0] != options or cached[1] is not mask:
            m = self.models
            cached = self._denoiser = (options, mask, ChunkDenoiser(m.unet, m.vae, mask, options))
        return cached[2]

    def denoise(self, faces, windows, mask, seed, chunk_index, options, reuse=None):
        """faces (k, 3, r, r) in [-1, 1]; windows (k, 50, 384); mask (r, r) -> (k, 3, r, r).
        ``reuse``: the faces' source frames and the run's store of their encodings.

        Compiled models never compile in the middle of a run for a chunk shorter than one
        already run (the last chunk of a video): it runs eagerly (a recompile takes longer than
        the chunk). With ``compile="auto"`` only what the precompiled artefact covers runs
        compiled; anything else runs eagerly (one warning per kind of plan)."""
        k = faces.shape[0]
        noise = chunk_noise(seed, k, self.resolution // 8, self.device, self.models.dtype)
        gen = chunk_generator(seed, chunk_index, self.device)
        denoiser = self.denoiser(mask, options)
        stance = self._stance(k, options)
        if stance is None:
            return denoiser(faces, windows, noise, gen, reuse=reuse)
        with torch.compiler.set_stance(stance):
            return denoiser(faces, windows, noise, gen, reuse=reuse)

    def _stance(self, k: int, options: DenoiseOptions) -> str | None:
        """How torch.compile treats this chunk: None (compile/run compiled), or a stance."""
        m = self.models
        if not m.compiled:
            return None
        art = m.precompiled
        if m.precompiled_only and art is not None:
            if k < art.key.frames:
                return "force_eager"  # a short last chunk: not worth any compiling
            needed = plan_items(options.plan(), options.cache_branch, k)
            missing = sorted(set(needed) - set(art.plans))
            if missing:
                note = (
                    f"the precompiled artefacts ({art.path.name}) do not cover "
                    f"{', '.join(missing)}: those chunks run eagerly (lipsync warmup --mode "
                    f"... builds them)"
                )
                if note not in m.notes:
                    m.notes.append(note)
                    log.warning(note)
                return "force_eager"
            return None
        if any(k < seen for seen in self._compiled_frames):
            return "eager_on_recompile"
        self._compiled_frames.add(k)
        return None
