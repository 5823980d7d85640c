"""Denoise one chunk of aligned faces: the model part of the pipeline, nothing about media.

Per chunk of f frames (f ≤ 24; 16 by default), as in the reference ``LipsyncPipeline``:

1. masked faces = faces × mask (mask: 1 = keep, 0 = generate); VAE-encode masked faces and the
   unmasked reference faces → two (1, 4, f, h, w) latents; the mask resized to (h, w).
2. DDIM from the shared initial noise: U-Net input = [noisy latent, mask, masked, reference]
   (13 channels). With guidance > 1 the batch holds [all-zero audio, audio] and
   ``noise = uncond + g · (cond − uncond)``.
3. VAE-decode, then paste the kept (unmasked) pixels of the input faces back.

Fast modes (issue #5; approximate, off by default; ``DenoiseOptions``, presets in ``MODES``):

- ``cache_interval = n > 1``: DeepCache step-feature caching (``lipsync.models.unet.StepCache``):
  the full U-Net runs on steps 0, n, 2n, …, the other steps run only its shallow part on the
  deep features of the last full step (skip branch ``cache_branch``, 0 = the shallowest).
- ``guidance_steps = s < 1``: classifier-free guidance on the first ``ceil(s · steps)`` steps
  only, then the conditional half alone (half the U-Net batch). A cached feature from a guided
  step keeps its conditional rows for the unguided steps.
- ``scheduler = "dpm++"`` with fewer ``steps`` (DPM-Solver++ multistep, 2nd order).

``exact`` (the default) is the reference computation; ``fast`` = DeepCache every 3rd step on
branch 0 (the reference's own DeepCache setting) + guidance on the first half of the steps.

Looped dubs (:class:`FaceEncodings`): a short video dubbed with long audio shows each source
frame once per loop; the VAE encodings of its faces are kept for the run and reused when the
same face comes back in a chunk of the same length, bit-identical to encoding it again.
"""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from lipsync.constants import (
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    MAX_CHUNK_FRAMES,
    MODE_NAMES,
    SCHEDULERS,
    Mode,
    SchedulerName,
)
from lipsync.errors import ConfigError, check_choice
from lipsync.face.align import levels_to_unit_table
from lipsync.models.scheduler import make_scheduler
from lipsync.models.unet import StepCache, UNet3D
from lipsync.models.vae import Vae
from lipsync.transfer import device_constant, to_device

MAX_FRAMES = MAX_CHUNK_FRAMES  # the motion modules' position table has 24 entries


@dataclass(frozen=True)
class DenoiseOptions:
    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    scheduler: SchedulerName = "ddim"
    eta: float = 0.0
    # The reference samples the VAE posterior (with the run's generator); the mean is an option.
    sample_posterior: bool = True
    # Fast modes (module docstring). The defaults are the exact computation.
    cache_interval: int = 1  # DeepCache: full U-Net every n-th step (1: every step, exact)
    cache_branch: int = 0  # DeepCache skip branch (0: shallowest, the least U-Net on cached steps)
    guidance_steps: float = 1.0  # share of the steps, from the first, that use CFG (1: all)

    def validate(self) -> None:
        if not 1 <= self.steps <= 1000:
            raise ConfigError(f"steps must be between 1 and 1000, got {self.steps}")
        if not 0.0 <= self.guidance <= 20.0:
            raise ConfigError(f"guidance must be between 0 and 20, got {self.guidance}")
        check_choice("scheduler", self.scheduler, SCHEDULERS)
        if not 1 <= self.cache_interval <= 1000:
            raise ConfigError(
                f"cache_interval must be between 1 and 1000, got {self.cache_interval}"
            )
        if self.cache_branch < 0:
            raise ConfigError(f"cache_branch must be >= 0, got {self.cache_branch}")
        if not 0.0 <= self.guidance_steps <= 1.0:
            raise ConfigError(f"guidance_steps must be between 0 and 1, got {self.guidance_steps}")

    @classmethod
    def for_mode(cls, mode: Mode = "exact", **overrides) -> DenoiseOptions:
        """A named preset (``MODES``), then ``overrides`` (``None`` values: keep the preset's)."""
        check_choice("mode", mode, MODE_NAMES)
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ConfigError(f"unknown denoise option(s): {', '.join(unknown)}")
        values = {**MODES[mode], **{k: v for k, v in overrides.items() if v is not None}}
        return replace(cls(), **values)

    @property
    def exact(self) -> bool:
        """No approximation beyond the chosen scheduler and step count."""
        return self.cache_interval == 1 and self.guided_steps() == (
            self.steps if self.guidance > 1.0 else 0
        )

    def guided_steps(self) -> int:
        """How many steps (the first ones) use classifier-free guidance."""
        if self.guidance <= 1.0:
            return 0
        return min(self.steps, math.ceil(round(self.guidance_steps * self.steps, 6)))

    def plan(self) -> list[tuple[bool, bool]]:
        """Per step: (guided, full U-Net). Unguided steps run half the batch; non-full steps
        run only the shallow part of the U-Net on cached deep features."""
        guided = self.guided_steps()
        return [(i < guided, i % self.cache_interval == 0) for i in range(self.steps)]

    def as_dict(self) -> dict:
        return asdict(self)


# Named presets of the approximation fields (the rest of DenoiseOptions is left as given).
MODES: dict[Mode, dict] = {
    "exact": {"cache_interval": 1, "cache_branch": 0, "guidance_steps": 1.0},
    "fast": {"cache_interval": 3, "cache_branch": 0, "guidance_steps": 0.5},
}


def initial_noise(
    num_frames: int,
    latent_size: int,
    generator: torch.Generator,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """One (1, 4, 1, h, w) draw repeated over all frames, as the reference does -> (1,4,F,h,w)."""
    draw = torch.randn(
        (1, 4, 1, latent_size, latent_size), generator=generator, device=device, dtype=dtype
    )
    return draw.expand(1, 4, num_frames, latent_size, latent_size)


FACE_ENCODINGS_BYTES = 1 * 2**30  # device memory a run's FaceEncodings may hold
FACE_VARIANTS = 4  # encodings kept per (source frame, chunk length): crops a level apart


@dataclass
class FaceProbe:
    """One chunk's faces as :class:`FaceEncodings` looks them up: their 8-bit levels and a
    fingerprint of each face (one host read-back per chunk)."""

    keys: list[int]
    levels: torch.Tensor  # (f, 3, r, r) uint8
    prints: list[int]


class FaceEncodings:
    """VAE encodings (posterior parameters) of the aligned faces of one run, kept so a looped
    dub encodes each source frame once per chunk length instead of once per loop.

    Entries are keyed by ``(source frame, frames in the chunk)``: a convolution's result for one
    image does not depend on the other images of its batch or its place there, but it can depend
    on the batch's size (measured with PyTorch's CPU kernels: a 10-image batch differs from a
    16-image one in the last bits), so chunks of different lengths share nothing. An entry is
    used only if the face is bit-identical to the one it was computed from: ``warp_faces`` cuts
    all crops of a chunk from windows of one size, so the same frame can come out a level apart
    in a different chunk; up to :data:`FACE_VARIANTS` such variants are kept per key. A chunk
    is taken from the store only when all its faces are there; the result is then exactly what
    encoding it again gives. Faces are compared as their 8-bit levels (what
    ``crops_to_model_input`` makes; other faces are never stored). At most ``max_bytes`` are
    held; past that nothing more is stored.
    """

    def __init__(self, max_bytes: int = FACE_ENCODINGS_BYTES):
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self.hits = 0  # chunks whose encodings came from the store
        self.misses = 0  # chunks encoded (and stored, within the budget)
        # (source frame, chunk length) -> [(fingerprint, levels, masked, reference), ...]
        self._entries: dict[tuple[int, int], list[tuple]] = {}

    def probe(self, keys: list[int], faces: torch.Tensor) -> FaceProbe | None:
        """faces (f, 3, r, r) float in [-1, 1] of source frames ``keys`` -> their probe, or None
        when they are not exactly 8-bit levels mapped as ``crops_to_model_input`` maps them."""
        levels = ((faces * 0.5 + 0.5) * 255.0).round_().clamp_(0, 255).to(torch.uint8)
        table = device_constant(("u8_to_unit",), faces.device, levels_to_unit_table)
        if not torch.equal(table[levels.long()], faces):
            return None
        flat = levels.reshape(len(keys), -1)
        weights = device_constant(
            ("face_print", flat.shape[1]), faces.device, _print_weights(flat.shape[1])
        )
        prints = (flat.to(torch.int64) * weights).sum(1).tolist()
        return FaceProbe(list(keys), levels, prints)

    def lookup(self, probe: FaceProbe) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The (masked, reference) parameters (f, 8, h, w) of the probed chunk, or None unless
        every face is stored."""
        f = len(probe.keys)
        found = []
        for k, fp in zip(probe.keys, probe.prints, strict=True):
            entry = next((e for e in self._entries.get((k, f), ()) if e[0] == fp), None)
            if entry is None:
                return None
            found.append(entry)
        if not torch.equal(torch.stack([e[1] for e in found]), probe.levels):
            return None  # a fingerprint collision: encode
        self.hits += 1
        return torch.stack([e[2] for e in found]), torch.stack([e[3] for e in found])

    def store(self, probe: FaceProbe, masked: torch.Tensor, reference: torch.Tensor) -> None:
        """Keep the parameters (f, 8, h, w) of a chunk just encoded (within the budget)."""
        self.misses += 1
        f = len(probe.keys)
        for i, (k, fp) in enumerate(zip(probe.keys, probe.prints, strict=True)):
            variants = self._entries.setdefault((k, f), [])
            if len(variants) >= FACE_VARIANTS or any(e[0] == fp for e in variants):
                continue
            entry = (fp, probe.levels[i].clone(), masked[i].clone(), reference[i].clone())
            size = sum(t.numel() * t.element_size() for t in entry[1:])
            if self.bytes + size > self.max_bytes:
                return
            variants.append(entry)
            self.bytes += size


def _print_weights(n: int):
    """A maker of fixed pseudo-random int64 weights (n,) for face fingerprints."""

    def make() -> torch.Tensor:
        g = torch.Generator().manual_seed(12345)
        return torch.randint(1, 2**31 - 1, (n,), generator=g, dtype=torch.int64)

    return make


@dataclass
class FaceReuse:
    """What a chunk's faces are (their source frames) and the run's store for their encodings."""

    store: FaceEncodings
    keys: list[int]  # the source frame of each face of the chunk


class ChunkDenoiser:
    """Turns aligned faces + audio windows into faces with a regenerated mouth.

    ``unet`` and ``vae``: our modules, or anything answering the same calls (``device``,
    ``dtype``, ``cache_point``, ``__call__``; ``encode``, ``decode``), such as the exported
    graphs of :mod:`lipsync.export.ort_engine`.
    """

    def __init__(
        self,
        unet: UNet3D,
        vae: Vae,
        mask: torch.Tensor,
        options: DenoiseOptions | None = None,
    ):
        self.unet = unet
        self.vae = vae
        self.options = options or DenoiseOptions()
        self.options.validate()
        if self.options.cache_interval > 1:
            unet.cache_point(self.options.cache_branch)  # ConfigError if this U-Net has none
        self.device = unet.device
        self.dtype = unet.dtype
        # mask: (r, r), 1 = keep, 0 = generate
        self.mask = torch.as_tensor(mask, dtype=torch.float32).to(self.device)
        self.resolution = self.mask.shape[-1]
        # Set to a dict to accumulate seconds per part (vae_encode, unet, vae_decode); this
        # synchronises the device at each boundary, so leave it None outside benchmarks.
        self.stage_seconds: dict[str, float] | None = None

    def _mark(self, name: str | None, start: float) -> float:
        """Close the part ``name`` that began at ``start`` (None: just synchronise)."""
        if self.stage_seconds is None:
            return start
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        if name is not None:
            self.stage_seconds[name] = self.stage_seconds.get(name, 0.0) + now - start
        return now

    def _encode(
        self,
        faces: torch.Tensor,
        masked: torch.Tensor,
        generators: list[torch.Generator | None],
        reuse: list[FaceReuse | None],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """faces and masked faces (B, f, 3, r, r) -> their latents, each (B, 4, f, r/8, r/8).

        One posterior draw per chunk from that chunk's generator (masked faces first), so a
        chunk's result does not depend on its batch-mates; a chunk whose faces are in its
        :class:`FaceReuse` store skips the encoder, not the draws."""
        params = []  # per chunk: (masked, reference) posterior parameters
        for i in range(len(generators)):
            r = reuse[i]
            probe = r.store.probe(r.keys, faces[i]) if r is not None else None
            found = r.store.lookup(probe) if probe is not None else None
            if found is None:
                found = self.vae.moments(masked[i]), self.vae.moments(faces[i])
                if probe is not None:
                    r.store.store(probe, *found)
            params.append(found)
        sample = self.options.sample_posterior
        # all masked draws, then all reference draws: the order encoding drew them in
        latents = [
            [
                self.vae.latents(p[part], generator=g, sample=sample)
                for p, g in zip(params, generators, strict=True)
            ]
            for part in (0, 1)
        ]
        masked_z, ref_z = (torch.stack(z).permute(0, 2, 1, 3, 4).to(self.dtype) for z in latents)
        return masked_z, ref_z

    @torch.inference_mode()
    def __call__(
        self,
        faces: torch.Tensor,
        audio: torch.Tensor,
        noise: torch.Tensor,
        generator: torch.Generator | list[torch.Generator | None] | None = None,
        on_step=None,
        reuse: FaceReuse | list[FaceReuse | None] | None = None,
        *,
        paste: bool = True,
    ) -> torch.Tensor:
        """One chunk or a batch of B chunks of equal length f.

        faces (f, 3, r, r) or (B, f, 3, r, r) in [-1, 1]; audio (f, 50, 384) or (B, f, 50, 384);
        noise (1 or B, 4, f, r/8, r/8); generator: one, or a list of B (VAE posterior draws)
        -> faces shaped like the input, in [-1, 1], with the masked region regenerated
        (``paste=False``: the whole decoded frames, before the kept pixels are pasted back).
        Batching chunks changes nothing but speed: each chunk's math is its own.
        ``reuse``: per chunk, where its faces' encodings may be kept and found (looped dubs;
        :class:`FaceEncodings`); changes nothing but speed either.
        """
        single = faces.ndim == 4
        if single:
            faces, audio = faces[None], audio[None]
        b, f = faces.shape[:2]
        if not 1 <= f <= MAX_FRAMES:
            raise ValueError(f"a chunk holds 1..{MAX_FRAMES} frames, got {f}")
        if audio.shape[:2] != (b, f) or noise.shape[2] != f or noise.shape[0] not in (1, b):
            raise ValueError(
                f"faces {tuple(faces.shape[:2])}, audio {tuple(audio.shape[:2])} and noise "
                f"{tuple(noise.shape)} chunk/frame counts differ"
            )
        generators = generator if isinstance(generator, list) else [generator] * b
        if len(generators) != b:
            raise ValueError(f"{len(generators)} generators for {b} chunks")
        reuses = reuse if isinstance(reuse, list) else [reuse] * b
        if len(reuses) != b or any(r is not None and len(r.keys) != f for r in reuses):
            raise ValueError(f"reuse must give {f} source frames for each of {b} chunks")
        opts = self.options
        faces = faces.to(self.device, torch.float32)
        keep = self.mask[None, None]  # (1, 1, r, r)
        masked = faces * keep
        clock = self._mark(None, time.perf_counter())
        with record_function("lipsync.vae_encode"):
            masked_latents, ref_latents = self._encode(faces, masked, generators, reuses)
        clock = self._mark("vae_encode", clock)
        h = masked_latents.shape[-1]
        mask_latent = F.interpolate(keep, size=(h, h))  # nearest, like the reference
        mask_latent = mask_latent[:, :, None].expand(b, 1, f, h, h).to(self.dtype)

        cfg = opts.guidance > 1.0
        guided = opts.guided_steps()
        audio = to_device(audio, self.device, self.dtype).reshape(b * f, *audio.shape[2:])
        # With CFG the batch is [B unconditional, B conditional]; the unconditional clips'
        # all-zero audio is not materialised (the U-Net adds the cross-attention bias instead).
        # Steps past ``guided`` (fast modes) run the B conditional clips alone.
        cond = torch.cat([mask_latent, masked_latents, ref_latents], dim=1)
        cond_cfg = torch.cat([cond, cond]) if cfg else None
        cache = StepCache(opts.cache_branch) if opts.cache_interval > 1 else None

        scheduler = make_scheduler(opts.scheduler)
        # The schedule lives on the host: stepping it never reads a GPU value back (a read-back
        # would make the host wait for every queued U-Net call); the U-Net gets device copies.
        scheduler.set_timesteps(opts.steps, device="cpu")
        unet_timesteps = to_device(scheduler.timesteps, self.device)
        step_kwargs = {}
        step_params = inspect.signature(scheduler.step).parameters
        if "eta" in step_params:
            step_kwargs["eta"] = opts.eta
        if "generator" in step_params:
            step_kwargs["generator"] = generator

        noise = noise.to(self.device, self.dtype).expand(b, *noise.shape[1:])
        latents = (noise * scheduler.init_noise_sigma).contiguous()
        for i, t in enumerate(scheduler.timesteps):
            with record_function(f"lipsync.unet_step{'_guided' if i < guided else ''}"):
                guide = i < guided
                if cache is not None:
                    cache.refresh = i % opts.cache_interval == 0
                    stale = cache.feature is not None and cache.feature.shape[0] == 2 * b
                    if not guide and not cache.refresh and stale:
                        cache.keep_rows(b, 2 * b)  # the conditional half of the last guided step
                model_in = torch.cat([latents, latents]) if guide else latents
                model_in = scheduler.scale_model_input(model_in, t)
                unet_in = torch.cat([model_in, cond_cfg if guide else cond], dim=1)
                pred = self.unet(unet_in, unet_timesteps[i], audio, b if guide else 0, cache=cache)
                if guide:
                    uncond, cond_pred = pred.chunk(2)
                    pred = uncond + opts.guidance * (cond_pred - uncond)
                latents = scheduler.step(pred, t, latents, **step_kwargs).prev_sample
            if on_step is not None:
                on_step(i + 1, len(scheduler.timesteps))

        clock = self._mark("unet", clock)
        flat = latents.permute(0, 2, 1, 3, 4).reshape(b * f, 4, h, h)  # (B·f, 4, h, h)
        with record_function("lipsync.vae_decode"):
            decoded = self.vae.decode(flat).float().reshape(faces.shape)  # (B, f, 3, r, r)
        out = decoded * (1 - keep) + faces * keep if paste else decoded
        self._mark("vae_decode", clock)
        return out[0] if single else out
