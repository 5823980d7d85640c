"""``lipsync warmup``: build the precompiled artefacts of a preset on this machine
(:mod:`lipsync.accel.precompiled`).

It loads the preset like ``lipsync run --compile MODE`` does, denoises one synthetic chunk per
denoising mode asked for (so every shape that mode compiles is compiled: guided and unguided
U-Net calls, full and DeepCache steps, the VAE at the chunk length), and saves the compile
caches with a manifest. A later process that loads the same preset, dtype and compile mode on
the same kind of device (``run``, ``app``, the workers' engine runner, the Triton server)
hot-loads them before its first chunk.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from lipsync.accel import precompiled
from lipsync.config import LoadOptions
from lipsync.constants import AUDIO_CHANNELS, AUDIO_TOKENS, Mode
from lipsync.diffusion import DenoiseOptions
from lipsync.engine import LocalEngine
from lipsync.errors import ConfigError
from lipsync.face.mask import make_mask
from lipsync.loading import dtype_name, load_models

# Steps each mode is warmed with: enough for every kind of U-Net call its plan makes (fast:
# guided full, guided cached, unguided full, unguided cached); the scheduler is not compiled.
WARM_STEPS: dict[str, int] = {"exact": 1, "fast": 6}


def warmup(load: LoadOptions, modes: list[Mode], out: str | Path | None = None) -> dict:
    """Compile ``load``'s preset for ``modes`` and save the artefacts into ``out`` (default:
    ``$LIPSYNC_HOME/compiled``). Returns what was built (a dict for ``--json``)."""
    if load.compile in ("none", "auto"):
        raise ConfigError("lipsync warmup needs a compile mode: --compile regional (or full)")
    if not modes:
        raise ConfigError("lipsync warmup needs at least one --mode")
    start = time.perf_counter()
    models = load_models(load)
    load_s = time.perf_counter() - start
    engine = LocalEngine(models)
    frames, res = models.preset.num_frames, models.preset.resolution
    g = torch.Generator().manual_seed(0)
    # 8-bit levels mapped like crops_to_model_input: what the pipeline feeds the engine
    levels = torch.randint(0, 256, (frames, 3, res, res), generator=g).float()
    faces = ((levels / 255.0 - 0.5) / 0.5).to(models.device)
    windows = torch.randn(frames, AUDIO_TOKENS, AUDIO_CHANNELS, generator=g).to(models.device)
    mask = torch.from_numpy(make_mask(res)).to(models.device)
    plans, seconds = [], {}
    for mode in modes:
        options = DenoiseOptions.for_mode(mode, steps=WARM_STEPS[mode], scheduler="ddim")
        t0 = time.perf_counter()
        engine.denoise(faces, windows, mask, 0, 0, options)
        if models.device.type == "cuda":
            torch.cuda.synchronize(models.device)
        seconds[mode] = round(time.perf_counter() - t0, 2)
        plans += precompiled.plan_items(options.plan(), options.cache_branch, frames)
    key = precompiled.artefact_key(
        models.preset.name, models.device, dtype_name(models.dtype), models.compile_mode,
        models.fp8, frames, models.fingerprint,
    )  # fmt: skip
    folder = Path(out).expanduser() if out else precompiled.compiled_dirs()[-1]
    extra = {
        "modes": list(modes),
        "compile_seconds": seconds,
        "load_seconds": round(load_s, 2),
        "reused_artefact": models.precompiled.path.name if models.precompiled else None,
        "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    art = precompiled.save(folder, key, plans, extra)
    return {
        "artefact": str(art.path),
        "manifest": str(art.path.with_suffix(".json")),
        **art.manifest,
    }
