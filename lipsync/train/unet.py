"""LatentSync U-Net training (``lipsync train unet CONFIG``), the reference's two stages.

Per sample (a window of F frames of one segment), as ``scripts/train_unet.py`` does:

1. VAE-encode the target frames, the frames with the mouth masked out (``frames × mask``, mask
   1 = keep) and F reference frames from another, non-overlapping time of the same segment;
   latents are *sampled* from the posterior and scaled (× 0.18215 for the SD VAE).
2. Draw a timestep t ~ U{0..999} per window and noise (mixed: a per-window shared draw and
   per-frame draws), and noise the target latents: x_t.
3. U-Net input, 13 channels: [x_t (4), mask at latent size (1, nearest), masked latents (4),
   reference latents (4)]; audio: each frame's 50 × 384 Whisper window.
4. Losses (:mod:`lipsync.train.losses`): noise MSE; in stage 2 also SyncNet on the decoded lower
   half of the one-step x0 estimate, LPIPS (lower half) and TREPA when their weights are given.

Stage 1 (``use_motion_module: false``) trains every parameter; stage 2 adds the motion modules
(new layers: their output projections start at zero, so the block is the identity) and trains
only the parameters whose names contain one of ``train.trainable`` (``motion_modules.``,
``attentions.``: the reference's choice; ``attn2.`` in ``stage2_efficient``).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lipsync.audio import AudioEncoder, load_audio
from lipsync.checkpoints import (
    check_state_dict,
    load_syncnet,
    load_unet,
    load_vae,
    read_checkpoint,
    unwrap_state_dict,
)
from lipsync.config import load_packaged_config
from lipsync.diffusion import ChunkDenoiser, DenoiseOptions
from lipsync.errors import CheckpointError, ConfigError
from lipsync.models.scheduler import make_scheduler
from lipsync.models.transformer import MotionModule
from lipsync.models.unet import UNet3D, UNetConfig
from lipsync.models.vae import Vae, random_vae
from lipsync.own_checkpoints import (
    is_bundle,
    load_bundle,
    load_own_vae,
    read_manifest,
    save_weights,
    seeded_audio_encoder,
    unet_file_metadata,
)
from lipsync.train.building import (
    UNET_BLOCKS,
    collate_windows,
    make_dataset,
    make_optimizer,
    wrap_model,
)
from lipsync.train.config import UNetTrainConfig, to_dict
from lipsync.train.distributed import DistContext
from lipsync.train.loop import LoaderBatches, LoopSettings, TrainLoop, sample_generators
from lipsync.train.losses import (
    LossModels,
    LossWeights,
    LpipsVgg,
    TrepaLoss,
    add_noise,
    total_loss,
    training_noise,
)
from lipsync.train.quality import apply_to_unet_config, build_quality_losses

NUM_TRAIN_TIMESTEPS = 1000
CHART_PANELS = [
    ("loss", ["loss"]),
    ("parts", ["mse", "sync", "lpips", "trepa"]),
    ("lr", ["lr"]),
]


# --------------------------------------------------------------------------- the model


def resolve_unet_config(spec: str | dict[str, Any]) -> dict[str, Any]:
    """A U-Net config dict from a packaged name, a JSON path, or a dict (checked)."""
    if isinstance(spec, dict):
        config = dict(spec)
    else:
        path = Path(spec).expanduser()
        if path.is_file():
            try:
                config = json.loads(path.read_text())
            except ValueError as e:
                raise ConfigError(f"cannot read U-Net config {path}: {e}") from None
        else:
            config = dict(load_packaged_config(spec))
    UNetConfig.from_dict(config)  # ConfigError on anything we cannot build
    return config


def zero_motion_outputs(unet: nn.Module, only: set[str] | None = None) -> int:
    """Zero the output projection of every motion module (AnimateDiff's ``zero_initialize``):
    a new temporal block then starts as the identity. ``only``: restrict to these parameter
    names. Returns how many tensors were zeroed."""
    count = 0
    with torch.no_grad():
        for name, module in unet.named_modules():
            if not isinstance(module, MotionModule):
                continue
            proj = module.temporal_transformer.proj_out
            for pname, param in (("weight", proj.weight), ("bias", proj.bias)):
                full = f"{name}.temporal_transformer.proj_out.{pname}"
                if only is None or full in only:
                    param.zero_()
                    count += 1
    return count


def _matches(name: str, patterns: list[str]) -> bool:
    return any(p in name for p in patterns)


def read_unet_state(path: str | os.PathLike, source: str) -> dict[str, torch.Tensor]:
    """The U-Net tensors of an official file, one of our bundles / checkpoint folders, or one of
    our training checkpoints (``step-*.pt``)."""
    path = Path(path).expanduser()
    if source == "own" and path.is_dir():
        if is_bundle(path):
            manifest = read_manifest(path)
            return {
                k: v
                for f in manifest["unet"]["files"]
                for k, v in unwrap_state_dict(read_checkpoint(path / f), path / f).items()
            }
        files = sorted(path.glob("unet*.safetensors"))
        if not files:
            raise CheckpointError(f"{path} holds no unet*.safetensors")
        out: dict[str, torch.Tensor] = {}
        for f in files:
            out.update(unwrap_state_dict(read_checkpoint(f), f))
        return out
    raw = read_checkpoint(path)
    if source == "own" and isinstance(raw.get("model"), dict):  # a training checkpoint
        return {k: v for k, v in raw["model"].items() if isinstance(v, torch.Tensor)}
    return unwrap_state_dict(raw, path)


def build_unet(cfg: UNetTrainConfig) -> tuple[UNet3D, dict[str, Any]]:
    """The U-Net to train, initialised as ``cfg.init`` says, in fp32 on the CPU.

    Strict: every model key must come from the file and every file key must fit, except keys
    matching ``init.allow_missing`` (kept freshly initialised; motion modules zeroed to identity)
    and ``init.allow_unexpected`` (dropped). The report lists what was excepted.
    """
    init = cfg.init
    config = resolve_unet_config(cfg.model.unet_config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init.seed)
        model = UNet3D.from_config(config)
    report: dict[str, Any] = {"source": init.source, "path": init.path}
    if init.source == "scratch":
        if UNetConfig.from_dict(config).motion_module_kwargs.zero_initialize:
            zero_motion_outputs(model)
        report["parameters"] = sum(p.numel() for p in model.parameters())
        return model, report
    if init.source == "official" and not (init.allow_missing or init.allow_unexpected):
        loaded = load_unet(init.path, config)  # the inference loader, strict as it is
        model.load_state_dict(loaded.state_dict(), strict=True)
        report.update(missing_allowed=0, unexpected_dropped=0)
        return model, report
    state = read_unet_state(init.path, init.source)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    dropped = [k for k in state if k not in expected and _matches(k, init.allow_unexpected)]
    for k in dropped:
        state.pop(k)
    fresh = [k for k in expected if k not in state and _matches(k, init.allow_missing)]
    check_state_dict({k: v for k, v in expected.items() if k not in fresh}, state, "U-Net",
                     init.path)  # fmt: skip
    own = model.state_dict()
    own.update({k: v.to(own[k].dtype) for k, v in state.items()})
    model.load_state_dict(own, strict=True)
    zero_motion_outputs(model, only=set(fresh))
    report.update(
        missing_allowed=len(fresh),
        unexpected_dropped=len(dropped),
        missing_examples=fresh[:3],
        dropped_examples=dropped[:3],
    )
    return model, report


def select_trainable(model: nn.Module, patterns: list[str]) -> list[tuple[str, nn.Parameter]]:
    """Freeze everything but the parameters whose names contain one of ``patterns`` (all when
    empty). ConfigError when a pattern matches nothing (a typo would silently train nothing)."""
    named = list(model.named_parameters())
    if not patterns:
        model.requires_grad_(True)
        return named
    model.requires_grad_(False)
    chosen = []
    for name, p in named:
        if _matches(name, patterns):
            p.requires_grad_(True)
            chosen.append((name, p))
    unused = [pat for pat in patterns if not any(pat in n for n, _ in named)]
    if unused:
        raise ConfigError(f"train.trainable pattern(s) match no parameter: {', '.join(unused)}")
    return chosen


def enable_gradient_checkpointing(model: nn.Module) -> int:
    """Recompute the activations of every ResNet block, spatial transformer and motion module in
    the backward pass (non-reentrant ``torch.utils.checkpoint``; parameter names unchanged).
    Returns the number of wrapped modules."""
    count = 0
    for module in model.modules():
        if isinstance(module, UNET_BLOCKS) and not getattr(module, "_lipsync_ckpt", False):
            forward = module.forward

            def wrapped(*args, _forward=forward, **kwargs):
                if torch.is_grad_enabled():
                    return checkpoint(_forward, *args, use_reentrant=False, **kwargs)
                return _forward(*args, **kwargs)

            module.forward = wrapped
            module._lipsync_ckpt = True
            count += 1
    return count


# --------------------------------------------------------------------------- frozen models


def load_training_vae(cfg: UNetTrainConfig, device: torch.device) -> Vae:
    section = cfg.vae
    if section.kind == "tiny-random":
        vae = random_vae(section.config or None, seed=0, device=device)
    elif section.kind == "sd":
        vae = load_vae(section.path, device=device)
    else:
        path = Path(section.path).expanduser()
        if is_bundle(path):
            vae = load_bundle(path, device=device).vae
        else:
            vae = load_own_vae(path, device=device)
    if section.scaling_factor is not None:
        vae.scaling_factor = section.scaling_factor
    return vae.requires_grad_(False).eval()


def load_audio_encoder(cfg: UNetTrainConfig, device: torch.device) -> AudioEncoder:
    if cfg.audio.kind == "seeded":
        return seeded_audio_encoder(cfg.audio.seed, device=device)
    return AudioEncoder.from_checkpoint(cfg.audio.path, device=device)


def load_loss_models(cfg: UNetTrainConfig, vae: Vae, device: torch.device) -> LossModels:
    """The frozen models of the enabled losses; a missing or wrong file fails here, at start."""
    lw = cfg.losses
    models = LossModels(sync_lower_half=lw.sync_lower_half, pixel_space=lw.pixel_space)
    if (lw.pixel_space and (lw.sync or lw.lpips or lw.trepa)) or cfg.quality.needs_pixels:
        vae.autoencoder.enable_gradient_checkpointing()
        models.decode = vae.decode
    if lw.sync:
        syncnet_config = cfg.syncnet.config
        if isinstance(syncnet_config, str):
            syncnet_config = resolve_json(syncnet_config)
        models.syncnet, _ = load_syncnet(cfg.syncnet.path, syncnet_config, device=device)
    if lw.lpips:
        models.lpips = LpipsVgg.from_file(lw.lpips_weights).to(device)
    if lw.trepa:
        models.trepa = TrepaLoss.from_file(lw.trepa_weights, lw.trepa_config).to(device)
    return models


def resolve_json(spec: str) -> dict[str, Any]:
    path = Path(spec).expanduser()
    if path.is_file():
        return json.loads(path.read_text())
    return dict(load_packaged_config(spec))


# --------------------------------------------------------------------------- one micro-batch


def latent_moments(vae: Vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """images (n, 3, R, R) in [-1, 1] -> posterior mean and std (n, 4, R/8, R/8), unscaled."""
    dist = vae.autoencoder.encode(images.to(vae.dtype)).latent_dist
    return dist.mean, dist.std


def sample_latents(
    moments: tuple[torch.Tensor, torch.Tensor],
    generators: list[torch.Generator] | None,
    frames: int,
    scale: float,
    shift: float = 0.0,
) -> torch.Tensor:
    """Posterior draws (one generator per window) or means, scaled: moments of (b·f, 4, h, w)
    -> (b, 4, f, h, w)."""
    mean, std = moments
    n, c, h, w = mean.shape
    b = n // frames
    mean = mean.float().reshape(b, frames, c, h, w)
    if generators is not None:
        std = std.float().reshape(b, frames, c, h, w)
        eps = torch.stack(
            [torch.randn((frames, c, h, w), generator=g, device=mean.device) for g in generators]
        )
        mean = mean + std * eps
    return ((mean - shift) * scale).permute(0, 2, 1, 3, 4)


@dataclass
class UNetObjective:
    """loss(batch, step, positions) for the loop: encode (unless the batch carries latent
    moments), noise, U-Net, losses. ``model`` may be the DDP/FSDP wrapper."""

    model: nn.Module
    vae: Vae
    alphas_cumprod: torch.Tensor
    weights: LossWeights
    loss_models: LossModels
    mixed_noise: bool
    noise_alpha: float
    seed: int
    num_frames: int
    sample_posterior: bool = True
    quality: Any = None  # lipsync.train.quality.QualityLosses (issue 16's terms), or None

    def __call__(self, batch: dict[str, Any], step: int, positions: torch.Tensor):
        device = self.alphas_cumprod.device
        f = self.num_frames
        gens = sample_generators(self.seed, step, positions, device)
        b = len(gens)
        # timesteps first, then noise, then posterior draws: all from each window's generator
        t = torch.cat([torch.randint(0, NUM_TRAIN_TIMESTEPS, (1,), generator=g, device=device)
                       for g in gens])  # fmt: skip
        mask = batch["mask"].to(device, torch.float32)  # (b, 1, R, R) or (b, 1, h, w)
        if "moments" in batch:  # precomputed (the demo recipe)
            moments = {k: (m.to(device), s.to(device)) for k, (m, s) in batch["moments"].items()}
        else:
            frames = batch["frames"].to(device, torch.float32)  # (b, f, 3, R, R)
            ref = batch["reference"].to(device, torch.float32)
            flat = frames.reshape(b * f, *frames.shape[2:])
            masked = (frames * mask[:, None]).reshape(flat.shape)
            with torch.no_grad():
                moments = {
                    "gt": latent_moments(self.vae, flat),
                    "masked": latent_moments(self.vae, masked),
                    "ref": latent_moments(self.vae, ref.reshape(flat.shape)),
                }
        scale, shift = self.vae.scaling_factor, self.vae.shift_factor
        noise = training_noise(
            (b, 4, f, *moments["gt"][0].shape[-2:]), gens, device, self.mixed_noise,
            self.noise_alpha,
        )  # fmt: skip
        post = gens if self.sample_posterior else None
        gt = sample_latents(moments["gt"], post, f, scale, shift)
        masked_lat = sample_latents(moments["masked"], post, f, scale, shift)
        ref_lat = sample_latents(moments["ref"], post, f, scale, shift)
        h, w = gt.shape[-2:]
        mask_lat = F.interpolate(mask, size=(h, w), mode="nearest")  # (b, 1, h, w)
        mask_lat = mask_lat[:, :, None].expand(b, 1, f, h, w)
        x_t = add_noise(self.alphas_cumprod, gt, noise, t)
        sample = torch.cat([x_t, mask_lat, masked_lat, ref_lat], dim=1)  # (b, 13, f, h, w)
        audio = batch["audio_windows"].to(device)  # (b, f, 50, 384)
        pred = self.model(sample, t, audio)
        gt_pixels = batch.get("frames")
        mel = batch.get("mel")
        return total_loss(
            self.weights,
            self.loss_models,
            pred,
            noise,
            x_t,
            t,
            self.alphas_cumprod,
            gt_pixels.to(device) if gt_pixels is not None else None,
            mel.to(device) if mel is not None else None,
            quality=self.quality,
            phones=batch.get("phones"),
        )


# --------------------------------------------------------------------------- data


# --------------------------------------------------------------------------- validation


class UNetValidator:
    """Validation loss on fixed held-out windows (same timesteps and noise every time) and,
    every ``video_every`` steps, a few windows rendered by a real short inference to mp4."""

    def __init__(self, cfg: UNetTrainConfig, objective: UNetObjective, raw_model: UNet3D,
                 dataset, dist: DistContext, out_dir: Path):  # fmt: skip
        self.cfg = cfg
        self.objective = objective
        self.raw_model = raw_model
        self.dist = dist
        self.out = out_dir
        self.items = [dataset[i] for i in range(min(cfg.validation.windows, len(dataset)))]
        self.video_every = cfg.validation.video_every or cfg.validation.every

    @torch.no_grad()
    def __call__(self, step: int) -> dict[str, float]:
        if not self.items:
            return {}
        model = self.objective.model
        model.eval()
        sums: dict[str, float] = {}
        with torch.autocast(self.dist.device.type, dtype=torch.bfloat16,
                            enabled=self.cfg.train.precision == "bf16"):  # fmt: skip
            for i, item in enumerate(self.items):
                batch = collate_windows([item])
                loss, parts = self.objective(batch, -1, torch.tensor([i]))
                for key, value in {"loss": loss, **parts}.items():
                    sums[key] = sums.get(key, 0.0) + float(value) / len(self.items)
        if self.cfg.validation.videos and self.video_every and step % self.video_every == 0:
            self.render(step)
        return sums

    def render(self, step: int) -> list[Path]:
        from lipsync.media import write_video  # PyAV (absent on the GPU image): lazily

        written = []
        v = self.cfg.validation
        options = DenoiseOptions(steps=v.inference_steps, guidance=v.guidance)
        for k, item in enumerate(self.items[: v.videos]):
            mask = item["mask"][0]
            denoiser = ChunkDenoiser(self.raw_model, self.objective.vae, mask, options)
            gen = torch.Generator(device=self.dist.device).manual_seed(self.cfg.train.seed + k)
            h = self.cfg.model.resolution // 8
            noise = torch.randn((1, 4, 1, h, h), generator=gen, device=self.dist.device)
            frames = item["frames"]
            out = denoiser(frames, item["audio_windows"], noise.expand(1, 4, frames.shape[0], h, h),
                           gen)  # fmt: skip
            pair = torch.cat([frames.cpu(), out.float().cpu()], dim=-1)  # (f, 3, R, 2R)
            video = ((pair.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
            if self.dist.is_main:
                path = self.out / "val" / f"step-{step:08d}-{k}.mp4"
                path.parent.mkdir(parents=True, exist_ok=True)
                audio = window_audio(self.cfg.data.root, item, frames.shape[0])
                write_video(path, video, fps=25, audio=audio)
                written.append(path)
        return written


def window_audio(root: str | None, item: dict[str, Any], frames: int) -> np.ndarray | None:
    """The 16 kHz audio of a window of a processed corpus segment (None without a corpus)."""
    if not root or "segment" not in item:
        return None
    path = Path(root) / "final" / f"{item['segment']}.mp4"
    if not path.is_file():
        return None
    wav = load_audio(path)
    start = int(item.get("start", 0)) * 640
    return wav[start : start + frames * 640]


# --------------------------------------------------------------------------- optimizer


# --------------------------------------------------------------------------- the run


def export_unet(out: Path, config: dict[str, Any], state: dict[str, torch.Tensor], dtype: str,
                step: int, resolution: int | None = None) -> list[str]:  # fmt: skip
    """``OUT/unet.safetensors`` (self-describing metadata: config, step, training resolution)
    + ``unet_config.json``: what ``load_own_unet(OUT)`` and ``lipsync run --unet
    OUT/unet.safetensors`` read."""
    for old in out.glob("unet*.safetensors"):
        old.unlink()
    extra = {"step": str(step)} | ({"resolution": str(resolution)} if resolution else {})
    names = save_weights(state, out, "unet", dtype, unet_file_metadata(config, **extra),
                         max_shard_bytes=2**62)  # fmt: skip
    tmp = out / "unet_config.json.part"
    tmp.write_text(json.dumps(config, indent=1) + "\n")
    os.replace(tmp, out / "unet_config.json")
    return names


def train_unet(
    cfg: UNetTrainConfig,
    out: str | Path | None = None,
    device: str | None = None,
    show_progress: bool = True,
    resume: bool = True,
    resume_from: str | Path | None = None,
) -> dict[str, Any]:
    """Train as ``cfg`` says into ``out`` (default ``cfg.output_dir``); resumes the run found
    there (or ``resume_from``). Returns a summary (also written to ``OUT/summary.json``)."""
    out = Path(out or cfg.output_dir)
    dist = DistContext.from_env(device)
    try:
        return _train(cfg, out, dist, show_progress, resume, resume_from)
    finally:
        dist.close()


def _train(cfg, out, dist, show_progress, resume, resume_from):
    started = time.time()
    torch.manual_seed(cfg.train.seed + dist.rank)
    device = dist.device
    if cfg.quality.phone_ctc.weight and dist.world_size > 1:
        raise ConfigError(
            "quality.phone_ctc trains its head in each process separately: use one process"
        )
    apply_to_unet_config(cfg, resolve_unet_config(cfg.model.unet_config))
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=1) + "\n")
    vae = load_training_vae(cfg, device)
    loss_models = load_loss_models(cfg, vae, device)
    audio = load_audio_encoder(cfg, device) if cfg.data.factory is None else None
    model, init_report = build_unet(cfg)
    config = resolve_unet_config(cfg.model.unet_config)
    model.to(device)
    trainable = select_trainable(model, cfg.train.trainable)
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    wrapped = wrap_model(model, dist, cfg.distributed.strategy)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = make_optimizer([p for _, p in trainable], cfg, device, dist.world_size)
    alphas = make_scheduler("ddim").alphas_cumprod.to(device)
    objective = UNetObjective(
        model=wrapped,
        vae=vae,
        alphas_cumprod=alphas,
        weights=LossWeights(cfg.losses.recon, cfg.losses.sync, cfg.losses.lpips, cfg.losses.trepa),
        loss_models=loss_models,
        mixed_noise=cfg.noise.mixed,
        noise_alpha=cfg.noise.alpha,
        seed=cfg.train.seed,
        num_frames=cfg.model.num_frames,
        sample_posterior=cfg.vae.sample_posterior,
        quality=build_quality_losses(cfg.quality, cfg.model.resolution, device),
    )
    frames = cfg.model.num_frames
    train_set = make_dataset(cfg, cfg.data.train_split, cfg.train.seed, frames, audio)
    batches = LoaderBatches(train_set, cfg.data.batch_size, cfg.train.grad_accumulation, dist,
                            cfg.train.seed, cfg.data.num_workers, collate_windows)  # fmt: skip
    validator = None
    if cfg.validation.every:
        val_set = make_dataset(cfg, cfg.data.val_split, cfg.train.seed, frames, audio)
        validator = UNetValidator(cfg, objective, model, val_set, dist, out)
    ema_decay = cfg.ema.decay if cfg.ema.enabled else None
    settings = LoopSettings.from_config(cfg, CHART_PANELS, ema_decay)

    def export(step: int, state: dict[str, Any]) -> None:
        weights = dict(state["model"])  # full, on the CPU (gathered under FSDP)
        if "ema" in state and cfg.ema.export:
            weights.update(state["ema"])
        export_unet(out, config, weights, cfg.checkpoint.weights_dtype, step,
                    cfg.model.resolution)  # fmt: skip

    loop = TrainLoop(
        name=f"unet-stage{cfg.stage}",
        model=wrapped,
        optimizer=optimizer,
        settings=settings,
        dist=dist,
        out_dir=out,
        loss_fn=objective,
        batches=batches,
        trainable=trainable,
        validate=validator,
        export=export,
        show_progress=show_progress,
        samples_per_step=cfg.data.batch_size * cfg.train.grad_accumulation * dist.world_size,
    )
    resumed = False
    if resume or resume_from:
        resumed = loop.resume(resume_from)
    summary = loop.run()
    summary.update(
        stage=cfg.stage,
        resumed=resumed,
        init=init_report,
        trainable_parameters=sum(p.numel() for _, p in trainable),
        parameters=sum(p.numel() for p in model.parameters()),
        world_size=dist.world_size,
        export=str(out / "unet.safetensors"),
        wall_s=round(time.time() - started, 3),
    )
    if dist.is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return summary
