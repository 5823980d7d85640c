"""A small VAE for our own model bundles (``lipsync train vae CONFIG``).

The Stable-Diffusion VAE's weights are not available everywhere (and are 84 M parameters); the
demo bundle needs its own. This trains a diffusers ``AutoencoderKL`` with narrow channels but the
SD VAE's shape: 4 down blocks (8× downsampling) and 4 latent channels, so the U-Net's 13-channel
input layout and the whole inference pipeline stay unchanged.

Loss per image (x in [-1, 1], x̂ the decoded posterior sample):
``l1 · mean|x − x̂| · w + mse · mean (x − x̂)² · w + kl · KL / (3 R²) (+ lpips · LPIPS)``,
where ``w`` weighs the pixels the U-Net regenerates (mask 0) by ``mouth_weight``, and KL is the
posterior's KL divergence summed over the latent (the LDM autoencoders' ``kl_weight`` 1e-6
against a per-pixel reconstruction sum is this ``kl`` at 1e-6).

Validation: PSNR of the posterior-mean reconstruction, whole crop and mouth region; the export
(``OUT/vae.safetensors`` + ``vae_config.json``) records the latent scaling factor ``1 / std`` of
the posterior means (as SD's 0.18215 was chosen), which the U-Net trainer and bundles use.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from lipsync.face.mask import make_mask
from lipsync.models.vae import build_autoencoder
from lipsync.own_checkpoints import load_own_vae, save_weights, vae_file_metadata
from lipsync.train.building import (
    collate_windows,
    import_factory,
    make_dataset,
    make_optimizer,
    wrap_model,
)
from lipsync.train.config import VaeTrainConfig, to_dict
from lipsync.train.distributed import DistContext
from lipsync.train.loop import LoaderBatches, LoopSettings, TrainLoop, sample_generators
from lipsync.train.losses import LpipsVgg

CHART_PANELS = [("loss", ["loss"]), ("parts", ["l1", "mse", "kl", "lpips"]),
                ("val PSNR (dB)", ["psnr", "psnr_mouth"])]  # fmt: skip


def full_vae_config(autoencoder: dict[str, Any], resolution: int) -> dict[str, Any]:
    """The AutoencoderKL config: SD's block types and activations, our channel widths."""
    n = len(autoencoder.get("block_out_channels", [0] * 4))
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "act_fn": "silu",
        "latent_channels": 4,
        "sample_size": resolution,
        **autoencoder,
    }


def export_vae(out: Path, config: dict[str, Any], state: dict[str, torch.Tensor],
               scaling_factor: float, step: int, dtype: str = "fp32") -> Path:  # fmt: skip
    meta = vae_file_metadata(config, scaling_factor, step=str(step))
    save_weights(state, out, "vae", dtype, meta, max_shard_bytes=2**62)
    tmp = out / "vae_config.json.part"
    tmp.write_text(json.dumps({**config, "scaling_factor": scaling_factor}, indent=1) + "\n")
    os.replace(tmp, out / "vae_config.json")
    return out / "vae.safetensors"


def psnr(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor | None = None) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2), optionally over weighted pixels."""
    err = (a.float().clamp(-1, 1) - b.float().clamp(-1, 1)) ** 2
    if weight is not None:
        w = weight.expand_as(err)
        mse = float((err * w).sum() / w.sum().clamp(min=1))
    else:
        mse = float(err.mean())
    return 10.0 * math.log10(4.0 / max(mse, 1e-12))


class VaeObjective:
    """loss(windows, step, positions): every frame of the micro-batch's windows."""

    def __init__(self, model, cfg: VaeTrainConfig, weight_map: torch.Tensor,
                 lpips: LpipsVgg | None, device: torch.device):  # fmt: skip
        self.model, self.cfg, self.weight_map, self.lpips = model, cfg, weight_map, lpips
        self.device = device

    def __call__(self, batch: dict[str, Any], step: int, positions: torch.Tensor):
        frames = batch["frames"].to(self.device, torch.float32)  # (b, f, 3, R, R)
        b, f = frames.shape[:2]
        x = frames.reshape(b * f, *frames.shape[2:])
        gens = sample_generators(self.cfg.train.seed, step, positions, self.device)
        posterior = self.model.encode(x).latent_dist
        eps = torch.cat([
            torch.randn((f, *posterior.mean.shape[1:]), generator=g, device=self.device)
            for g in gens
        ])  # fmt: skip
        z = posterior.mean + posterior.std * eps
        recon = self.model.decode(z).sample.float()
        lw = self.cfg.losses
        w = self.weight_map
        parts: dict[str, torch.Tensor] = {}
        loss = torch.zeros((), device=self.device)
        if lw.l1:
            parts["l1"] = ((recon - x).abs() * w).mean()
            loss = loss + lw.l1 * parts["l1"]
        if lw.mse:
            parts["mse"] = (((recon - x) ** 2) * w).mean()
            loss = loss + lw.mse * parts["mse"]
        if lw.kl:
            parts["kl"] = posterior.kl().float().mean() / x[0].numel()
            loss = loss + lw.kl * parts["kl"]
        if lw.lpips:
            parts["lpips"] = self.lpips(recon, x).mean()
            loss = loss + lw.lpips * parts["lpips"]
        return loss, {k: v.detach() for k, v in parts.items()}


def make_vae_dataset(cfg: VaeTrainConfig, split: str, seed: int):
    if cfg.data.factory:
        return import_factory(cfg.data.factory)(cfg, split, seed)
    return make_dataset(cfg, split, seed, cfg.data.frames_per_window, None)


@torch.no_grad()
def evaluate_vae(vae_model, items: list[dict[str, Any]], mouth: torch.Tensor,
                 device: torch.device) -> dict[str, float]:  # fmt: skip
    """PSNR (whole crop, mouth region) of posterior-mean reconstructions, and the latent std."""
    vae_model.eval()
    errs, errs_mouth, means = [], [], []
    for item in items:
        x = item["frames"].to(device, torch.float32)
        post = vae_model.encode(x).latent_dist
        recon = vae_model.decode(post.mean).sample.float()
        errs.append(psnr(recon, x))
        errs_mouth.append(psnr(recon, x, mouth))
        means.append(post.mean.float().flatten())
    std = float(torch.cat(means).std())
    return {
        "psnr": sum(errs) / len(errs),
        "psnr_mouth": sum(errs_mouth) / len(errs_mouth),
        "latent_std": std,
    }


def train_vae(
    cfg: VaeTrainConfig,
    out: str | Path | None = None,
    device: str | None = None,
    show_progress: bool = True,
    resume: bool = True,
) -> dict[str, Any]:
    out = Path(out or cfg.output_dir)
    dist = DistContext.from_env(device)
    try:
        return _train(cfg, out, dist, show_progress, resume)
    finally:
        dist.close()


def _train(cfg: VaeTrainConfig, out: Path, dist: DistContext, show_progress: bool, resume: bool):
    started = time.time()
    device = dist.device
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=1) + "\n")
    config = full_vae_config(cfg.autoencoder, cfg.resolution)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        model = build_autoencoder(config)
    if cfg.init_path:
        model.load_state_dict(load_own_vae(cfg.init_path).autoencoder.state_dict(), strict=True)
    model.to(device)
    if cfg.train.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    wrapped = wrap_model(model, dist, "ddp")
    trainable = list(model.named_parameters())
    optimizer = make_optimizer([p for _, p in trainable], cfg, device, dist.world_size)
    keep = torch.from_numpy(make_mask(cfg.resolution)).to(device)  # 1 = keep
    mouth = (1.0 - keep)[None, None]
    weight_map = 1.0 + (cfg.losses.mouth_weight - 1.0) * mouth
    lpips = LpipsVgg.from_file(cfg.losses.lpips_weights).to(device) if cfg.losses.lpips else None
    objective = VaeObjective(wrapped, cfg, weight_map, lpips, device)
    train_set = make_vae_dataset(cfg, cfg.data.train_split, cfg.train.seed)
    val_set = make_vae_dataset(cfg, cfg.data.val_split, cfg.train.seed)
    val_items = [val_set[i] for i in range(min(cfg.validation.windows, len(val_set)))]
    batches = LoaderBatches(train_set, cfg.data.batch_size, cfg.train.grad_accumulation, dist,
                            cfg.train.seed, cfg.data.num_workers, collate_windows)  # fmt: skip
    last_val: dict[str, float] = {}

    def validate(step: int) -> dict[str, float]:
        last_val.clear()
        last_val.update(evaluate_vae(model, val_items, mouth, device))
        return dict(last_val)

    def export(step: int, state: dict[str, Any]) -> None:
        if not last_val:
            last_val.update(evaluate_vae(model, val_items, mouth, device))
        scale = 1.0 / max(last_val["latent_std"], 1e-6)
        export_vae(out, config, state["model"], scale, step, cfg.checkpoint.weights_dtype)

    settings = LoopSettings.from_config(cfg, CHART_PANELS)
    loop = TrainLoop(name="vae", model=wrapped, optimizer=optimizer, settings=settings,
                     dist=dist, out_dir=out, loss_fn=objective, batches=batches,
                     trainable=trainable, validate=validate, export=export,
                     show_progress=show_progress,
                     samples_per_step=cfg.data.batch_size * dist.world_size)  # fmt: skip
    resumed = loop.resume() if resume else False
    last_val.clear()
    summary = loop.run()
    final = evaluate_vae(model, val_items, mouth, device) if dist.is_main else {}
    summary.update(
        resumed=resumed,
        val=final,
        scaling_factor=1.0 / max(final.get("latent_std", 1.0), 1e-6),
        parameters=sum(p.numel() for p in model.parameters()),
        world_size=dist.world_size,
        export=str(out / "vae.safetensors"),
        wall_s=round(time.time() - started, 3),
    )
    if dist.is_main:
        export_vae(out, config, {k: v.detach().cpu() for k, v in model.state_dict().items()},
                   summary["scaling_factor"], loop.step, cfg.checkpoint.weights_dtype)  # fmt: skip
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return summary
