"""Train the self-trained demo bundle on one GPU, in wall-time-budgeted rounds.

    python -m lipsync.train.demo_recipe pack  --data CORPUS --out .pack --max-mb 30   # CPU, here
    python -m lipsync.train.demo_recipe train --pack .pack --stage vae,unet1 --max-minutes 3,6 \\
        --out $OUT                                                                     # GPU
    python -m lipsync.train.demo_recipe train --pack .pack --stage unet2 --max-minutes 8 \\
        --resume-from PREVIOUS_OUT --syncnet syncnet.safetensors --out $OUT

Stages (each trains until its share of ``--max-minutes`` is spent, then evaluates on the pack's
val split and writes its results):

* ``vae``: a small ``AutoencoderKL`` (8× down, 4 latent channels) on random frames; PSNR of the
  val frames (whole crop and mouth region) and the latent scaling factor.
* ``unet1``: the demo U-Net without motion modules from scratch (every parameter), noise MSE.
* ``unet2``: motion modules added (zero-initialised) to the stage-1 U-Net; noise MSE + SyncNet
  loss on the decoded lower half (``--syncnet``, e.g. the syncnet helper's small SyncNet trained
  on the same pack); every parameter trains by default (a from-scratch model this small has no
  converged stage 1 to protect; ``--set unet2.trainable=[motion_modules.,attentions.]`` for the
  reference's choice). ``--set unet2.quality.…`` turns on issue 16's options (typed:
  :class:`lipsync.train.config.QualitySection`; e.g. ``--set
  unet2.quality.dynamic_conditioning.enabled=true``, docs/QUALITY.md); all off by default.
* ``student``: a few-step student distilled from the ``unet2`` U-Net (``--resume-from`` its
  bundle; :mod:`lipsync.train.distill`): the bundle it writes denoises in 4 unguided DDIM steps
  and says so in its manifest (``training.student``).

The audio encoder is Whisper-tiny with frozen weights made from ``--audio-seed``
(:func:`lipsync.own_checkpoints.seeded_audio_encoder`): reproducible, no file.

Everything lives on the GPU (:class:`lipsync.train.pack_data.PackData`): frames decoded once,
audio features and mels computed once, VAE latents of every frame encoded once after the VAE
stage, so the U-Net stages never run the VAE encoder. bf16 autocast, fused AdamW.

``--out`` gets at most 8 files of at most 15 MiB (the GPU machine's limit): after a U-Net stage
a complete bundle (``manifest.json``, ``unet-*.safetensors`` fp16 shards, ``vae.safetensors``;
loadable with :func:`lipsync.own_checkpoints.load_bundle`), after the VAE stage alone
``vae.safetensors`` (fp32) and its optimizer state; always ``metrics.jsonl`` (every stage, with
a ``stage`` field), ``loss.png``, ``summary.json`` (per stage: steps, minutes, evaluation,
settings; provenance) and ``preview.png`` (val windows: target / generated / dubbed).
``--resume-from`` takes such a folder back: weights, step counts and (VAE) optimizer state; the
U-Net's AdamW state does not fit the file budget and restarts with a short warm-up.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import typer
from PIL import Image
from safetensors.torch import load_file, save_file

from lipsync.checkpoints import load_syncnet
from lipsync.diffusion import ChunkDenoiser, DenoiseOptions
from lipsync.errors import ConfigError, LipSyncError, run_reporting_errors
from lipsync.models.scheduler import make_scheduler
from lipsync.models.syncnet import cosine_similarity
from lipsync.models.unet import UNet3D
from lipsync.models.vae import Vae, build_autoencoder
from lipsync.own_checkpoints import (
    bundle_size_bytes,
    is_bundle,
    load_own_vae,
    read_manifest,
    save_weights,
    seeded_audio_encoder,
    seeded_audio_spec,
    write_bundle,
)
from lipsync.train.config import (
    InitSection,
    ModelSection,
    QualitySection,
    UNetTrainConfig,
    VaeLossSection,
    VaeTrainConfig,
    apply_overrides,
    from_dict,
)
from lipsync.train.distill import (
    STUDENT_FORMAT,
    DistillObjective,
    DistillPlan,
    trajectory_gap,
)
from lipsync.train.distributed import DistContext
from lipsync.train.loop import LoopSettings, MicroBatch, TrainLoop
from lipsync.train.losses import LossModels, LossWeights
from lipsync.train.metrics import MetricsLog, plot_metrics, read_jsonl
from lipsync.train.pack import read_pack, write_pack
from lipsync.train.pack_data import PackData, mouth_weight
from lipsync.train.quality import GATE_KEYS, build_quality_losses, with_dynamic_conditioning
from lipsync.train.unet import (
    UNetObjective,
    build_unet,
    enable_gradient_checkpointing,
    read_unet_state,
    resolve_unet_config,
)
from lipsync.train.vae import VaeObjective, export_vae, full_vae_config, psnr

RECIPE = "lipsync.demo_recipe/1"
STAGES = ("vae", "unet1", "unet2", "student")
UNET_CONFIG = "train/unet_demo_256_config.json"

# Settings per stage (``--set stage.key=value`` changes one).
DEFAULTS: dict[str, dict[str, Any]] = {
    "vae": {
        "batch": 96,
        "lr": 2e-4,
        "warmup": 100,
        "precision": "bf16",
        "l1": 1.0,
        "mse": 1.0,
        "kl": 1e-6,
        "mouth_weight": 3.0,
        "block_out_channels": [32, 64, 96, 96],
        "layers_per_block": 1,
        "norm_num_groups": 32,
        "eval_frames": 512,
        "eval_reserve_s": 20.0,
        "seed": 11,
    },
    "unet1": {
        "batch": 64,
        "lr": 1e-4,
        "warmup": 200,
        "precision": "bf16",
        "gradient_checkpointing": False,
        "mixed_noise": True,
        "noise_alpha": 1.0,
        "eval_windows": 16,
        "sample_windows": 8,
        "sample_steps": 20,
        "guidance": 1.5,
        "eval_reserve_s": 60.0,
        "seed": 12,
        "trainable": [],
        "weight_decay": 0.01,
    },
    "unet2": {
        "batch": 16,
        "lr": 5e-5,
        "warmup": 100,
        "precision": "bf16",
        "gradient_checkpointing": False,
        "mixed_noise": True,
        "noise_alpha": 1.0,
        "sync": 0.05,
        "eval_windows": 16,
        "sample_windows": 8,
        "sample_steps": 20,
        "guidance": 1.5,
        "eval_reserve_s": 60.0,
        "seed": 13,
        "trainable": [],
        "weight_decay": 0.01,
        "quality": {},  # lipsync.train.config.QualitySection (issue 16's options; off)
    },
    "student": {
        "batch": 8,
        "lr": 2e-5,
        "warmup": 50,
        "precision": "bf16",
        "teacher_steps": 20,
        "student_steps": 4,
        "guidance": 1.5,  # the teacher's; the student is unguided
        "weighting": "x0",
        "dub_share": 0.5,
        "eval_windows": 16,
        "sample_windows": 8,
        "eval_reserve_s": 60.0,
        "seed": 14,
        "weight_decay": 0.0,
    },
}


@dataclass
class Run:
    """One invocation: what is loaded, where results go."""

    pack_dir: Path
    out: Path
    work: Path
    device: torch.device
    settings: dict[str, dict[str, Any]]
    audio_seed: int
    unet_config: dict[str, Any]
    syncnet_path: str | None
    resume_from: Path | None
    lean: bool = False  # no loss.png / preview.png (leaves 2 of the 8 files to other outputs)
    started: float = field(default_factory=time.perf_counter)
    summary: dict[str, Any] = field(default_factory=dict)
    vae: Vae | None = None
    vae_config: dict[str, Any] | None = None
    vae_optimizer: dict[str, torch.Tensor] | None = None
    unet_state: dict[str, torch.Tensor] | None = None
    unet_stage: str | None = None
    student: dict[str, Any] | None = None  # the student's manifest entry (training.student)
    previews: dict[str, np.ndarray] = field(default_factory=dict)
    data: dict[str, PackData] = field(default_factory=dict)


# --------------------------------------------------------------------------- the stages


class PackBatches:
    """Endless batches made on the device from the step number (a BatchSource)."""

    steps_per_epoch = 10**9

    def __init__(self, make, batch: int):
        self.make, self.batch = make, batch

    def epoch(self, epoch: int, start_batch: int):
        step = epoch * self.steps_per_epoch + start_batch
        positions = torch.arange(self.batch)
        while True:
            yield [MicroBatch(self.make(step), positions)]
            step += 1


def _loop(
    run: Run,
    name: str,
    model,
    optimizer,
    objective,
    batches,
    trainable,
    s,
    budget_s,
    start_step: int,
    warmup_from: int,
) -> TrainLoop:
    settings = LoopSettings(
        max_steps=10**9,
        max_minutes=max(budget_s, 1.0) / 60.0,
        precision=s["precision"],
        max_grad_norm=1.0,
        log_every=10,
        checkpoint_every=10**9,
        keep=1,
        lr=s["lr"],
        warmup_steps=s["warmup"],
        warmup_from=warmup_from,
        seed=s["seed"],
        save_optimizer=True,
    )
    shutil.rmtree(run.work / name, ignore_errors=True)  # a fresh scratch folder per stage
    loop = TrainLoop(
        name=name,
        model=model,
        optimizer=optimizer,
        settings=settings,
        dist=DistContext(0, 1, 0, run.device),
        out_dir=run.work / name,
        loss_fn=objective,
        batches=batches,
        trainable=trainable,
        show_progress=os.environ.get("LIPSYNC_PROGRESS", "1") == "1",
        samples_per_step=s["batch"],
    )
    loop.step = start_step
    return loop


def _adamw(params, s, device) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        params,
        lr=s["lr"],
        weight_decay=s.get("weight_decay", 0.0),
        fused=device.type == "cuda" or None,
    )


def _stage_budget(run: Run, stage_start: float, minutes: float, reserve: float) -> float:
    return minutes * 60.0 - (time.perf_counter() - stage_start) - reserve


def _data(run: Run, split: str) -> PackData:
    if split not in run.data:
        pack = read_pack(run.pack_dir, (split,))
        run.data[split] = PackData(pack, split, run.device)
        run.summary.setdefault(
            "pack",
            {
                k: pack.meta[k]
                for k in ("format", "resolution", "splits", "video", "audio", "bytes")
            },
        )
    return run.data[split]


def stage_vae(run: Run, minutes: float) -> dict[str, Any]:
    t0 = time.perf_counter()
    s = run.settings["vae"]
    train, val = _data(run, "train"), _data(run, "val")
    config = full_vae_config(
        {
            "block_out_channels": list(s["block_out_channels"]),
            "layers_per_block": s["layers_per_block"],
            "norm_num_groups": s["norm_num_groups"],
            "latent_channels": 4,
        },
        train.resolution,
    )
    prior = run.summary.get("stages", {}).get("vae", {})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s["seed"])
        model = build_autoencoder(config)
    if run.vae is not None:  # resumed
        model.load_state_dict(run.vae.autoencoder.state_dict(), strict=True)
    model.to(run.device)
    optimizer = _adamw(model.parameters(), s, run.device)
    if run.vae_optimizer is not None:
        _load_optimizer(optimizer, model, run.vae_optimizer)
    trainable = list(model.named_parameters())
    weights = 1.0 + (s["mouth_weight"] - 1.0) * mouth_weight(train.resolution, run.device)
    vcfg = _vae_loss_cfg(s)
    objective = VaeObjective(model, vcfg, weights, None, run.device)
    batches = PackBatches(
        lambda step: {"frames": train.random_frames(s["seed"], step, s["batch"])}, s["batch"]
    )
    steps0 = int(prior.get("steps", 0))
    loop = _loop(
        run,
        "vae",
        model,
        optimizer,
        objective,
        batches,
        trainable,
        s,
        _stage_budget(run, t0, minutes, s["eval_reserve_s"]),
        steps0,
        steps0 if run.vae_optimizer is None and steps0 else 0,
    )
    result = loop.run()
    model.eval()
    evaluation = evaluate_vae_pack(model, val, s["eval_frames"])
    scale = 1.0 / max(evaluation["latent_std"], 1e-6)
    vae = Vae(model.requires_grad_(False))
    vae.scaling_factor = scale
    run.vae, run.vae_config = vae, config
    run.vae_optimizer = _optimizer_tensors(optimizer, model)
    run.previews["vae"] = vae_preview(vae, val)
    return _stage_record(result, t0, evaluation | {"scaling_factor": scale}, s, loop)


def _vae_loss_cfg(s: dict[str, Any]) -> VaeTrainConfig:
    cfg = VaeTrainConfig()
    cfg.losses = VaeLossSection(
        l1=s["l1"], mse=s["mse"], kl=s["kl"], lpips=0.0, mouth_weight=s["mouth_weight"]
    )
    cfg.train.seed = s["seed"]
    return cfg


def _unet_config(run: Run, motion: bool) -> dict[str, Any]:
    return dict(run.unet_config, use_motion_module=motion)


def _prepared(run: Run, stage: str) -> tuple[PackData, PackData]:
    if run.vae is None:
        raise ConfigError(f"stage {stage} needs a VAE: run the vae stage first or --resume-from")
    train, val = _data(run, "train"), _data(run, "val")
    encoder = seeded_audio_encoder(run.audio_seed, device=run.device)
    for data in (train, val):
        if data.features is None:
            data.prepare_audio(encoder)
        if data.moments is None:
            data.prepare_latents(run.vae)
    return train, val


def stage_unet(run: Run, stage: str, minutes: float) -> dict[str, Any]:
    t0 = time.perf_counter()
    s = run.settings[stage]
    train, val = _prepared(run, stage)
    prior = run.summary.get("stages", {}).get(stage, {})
    motion = stage == "unet2"
    quality = from_dict(QualitySection, dict(s.get("quality") or {}), f"{stage}.quality")
    if motion:
        run.unet_config = with_dynamic_conditioning(run.unet_config, quality)
    model = _build_stage_unet(run, stage, motion)
    model.to(run.device)
    if s["trainable"]:
        model.requires_grad_(False)
        for name, p in model.named_parameters():
            if any(pat in name for pat in s["trainable"]):
                p.requires_grad_(True)
    else:
        model.requires_grad_(True)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if s["gradient_checkpointing"]:
        enable_gradient_checkpointing(model)
    optimizer = _adamw([p for _, p in trainable], s, run.device)
    syncnet = None
    weights = LossWeights(recon=1.0)
    models = LossModels(pixel_space=True)
    if motion and s.get("sync", 0) > 0:
        syncnet = _syncnet(run)
        weights.sync = s["sync"]
        models.syncnet, models.decode = syncnet, run.vae.decode
    alphas = make_scheduler("ddim").alphas_cumprod.to(run.device)
    objective = UNetObjective(
        model=model,
        vae=run.vae,
        alphas_cumprod=alphas,
        weights=weights,
        loss_models=models,
        mixed_noise=s["mixed_noise"],
        noise_alpha=s["noise_alpha"],
        seed=s["seed"],
        num_frames=16,
        quality=build_quality_losses(quality, train.resolution, run.device) if motion else None,
    )
    pixels = motion and quality.needs_pixels
    if pixels:
        run.vae.autoencoder.enable_gradient_checkpointing()
        models.decode = run.vae.decode
    batches = PackBatches(
        lambda step: train.unet_batch(train.sample_windows(s["seed"], step, s["batch"]), pixels),
        s["batch"],
    )
    steps0 = int(prior.get("steps", 0))
    budget = _stage_budget(run, t0, minutes, s["eval_reserve_s"])
    # the U-Net's AdamW state is not carried between rounds: warm up again from steps0
    loop = _loop(run, stage, model, optimizer, objective, batches, trainable, s, budget, steps0,
                 steps0)  # fmt: skip
    result = loop.run()
    model.eval().requires_grad_(False)
    if syncnet is None and run.syncnet_path:
        syncnet = _syncnet(run)
    evaluation = evaluate_unet(run, stage, model, objective, val, syncnet, s)
    run.unet_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    run.unet_stage = stage
    return _stage_record(result, t0, evaluation, s, loop)


def _build_stage_unet(run: Run, stage: str, motion: bool) -> UNet3D:
    """Stage 1 from scratch (or its own resumed weights); stage 2 from the stage-1 or stage-2
    weights in hand, new motion modules zero-initialised."""
    config = _unet_config(run, motion)
    cfg = UNetTrainConfig()
    cfg.model = ModelSection(unet_config=config, resolution=256, num_frames=16)
    seed = run.settings[stage]["seed"]
    if run.unet_state is None:
        if stage == "unet2":
            raise ConfigError("stage unet2 starts from stage-1 weights: --resume-from a unet1 run")
        cfg.init = InitSection(source="scratch", seed=seed)
        return build_unet(cfg)[0]
    tmp = run.work / "init-unet"
    tmp.mkdir(parents=True, exist_ok=True)
    save_weights(run.unet_state, tmp, "unet", "fp32", max_shard_bytes=2**62)
    cfg.init = InitSection(
        source="own",
        path=str(tmp),
        seed=seed,
        allow_missing=["motion_modules.", GATE_KEYS] if motion else [],
        allow_unexpected=[] if motion else ["motion_modules."],
    )
    model = build_unet(cfg)[0]
    shutil.rmtree(tmp)
    return model


def stage_student(run: Run, minutes: float) -> dict[str, Any]:
    """Distil the unet2 U-Net in hand into a few-step student (module docstring)."""
    t0 = time.perf_counter()
    s = run.settings["student"]
    if run.unet_state is None or run.unet_stage != "unet2":
        raise ConfigError(
            "stage student distils a unet2 U-Net: --resume-from a unet2 bundle (a student is "
            "not continued from a student: distil again from its teacher)"
        )
    train, val = _prepared(run, "student")
    config = _unet_config(run, True)
    teacher_state = run.unet_state
    teacher = UNet3D.from_config(config)
    teacher.load_state_dict(teacher_state, strict=True)
    teacher.to(run.device).eval().requires_grad_(False)
    student = UNet3D.from_config(config)
    student.load_state_dict(run.unet_state, strict=True)
    student.to(run.device).requires_grad_(True)
    trainable = list(student.named_parameters())
    optimizer = _adamw([p for _, p in trainable], s, run.device)
    plan = DistillPlan(s["teacher_steps"], s["student_steps"], s["guidance"])
    objective = DistillObjective(student, teacher, plan, run.vae.scaling_factor, s["seed"],
                                 s["weighting"], s["dub_share"])  # fmt: skip
    batches = PackBatches(
        lambda step: train.unet_batch(train.sample_windows(s["seed"], step, s["batch"])),
        s["batch"],
    )
    prior = run.summary.get("stages", {}).get("student", {})
    steps0 = int(prior.get("steps", 0))
    budget = _stage_budget(run, t0, minutes, s["eval_reserve_s"])
    loop = _loop(run, "student", student, optimizer, objective, batches, trainable, s, budget,
                 steps0, steps0)  # fmt: skip
    result = loop.run()
    student.eval().requires_grad_(False)
    evaluation = trajectory_gap(student, teacher, val, plan, run.vae.scaling_factor,
                                min(8, s["eval_windows"]))  # fmt: skip
    syncnet = _syncnet(run) if run.syncnet_path else None
    sampling = dict(s, sample_steps=s["student_steps"], guidance=1.0)
    noise_mse = UNetObjective(
        model=student, vae=run.vae, alphas_cumprod=make_scheduler("ddim").alphas_cumprod.to(
            run.device), weights=LossWeights(recon=1.0), loss_models=LossModels(),
        mixed_noise=True, noise_alpha=1.0, seed=s["seed"], num_frames=16,
    )  # fmt: skip
    evaluation.update(evaluate_unet(run, "student", student, noise_mse, val, syncnet, sampling))
    run.unet_state = {k: v.detach().cpu() for k, v in student.state_dict().items()}
    run.unet_stage = "student"
    run.student = {
        "format": STUDENT_FORMAT,
        "steps": plan.student_steps,
        "guidance": 1.0,
        "scheduler": "ddim",
        "teacher": {"steps": plan.teacher_steps, "guidance": plan.guidance},
        "method": "trajectory distillation (lipsync.train.distill)",
    }
    return _stage_record(result, t0, evaluation, s, loop)


def _syncnet(run: Run):
    if not run.syncnet_path:
        raise ConfigError("stage unet2 needs --syncnet (a SyncNet trained on this corpus)")
    model, _ = load_syncnet(run.syncnet_path, device=run.device)
    return model


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_vae_pack(model, data: PackData, frames: int) -> dict[str, float]:
    idx = torch.linspace(0, data.num_frames_total - 1, min(frames, data.num_frames_total))
    idx = idx.round().long().to(data.device)
    mouth = mouth_weight(data.resolution, data.device)
    psnrs, psnrs_mouth, means = [], [], []
    for chunk in idx.split(64):
        x = data.pixels(chunk)
        post = model.encode(x).latent_dist
        recon = model.decode(post.mean).sample.float()
        psnrs.append(psnr(recon, x))
        psnrs_mouth.append(psnr(recon, x, mouth))
        means.append(post.mean.float().flatten())
    return {
        "psnr": float(np.mean(psnrs)),
        "psnr_mouth": float(np.mean(psnrs_mouth)),
        "latent_std": float(torch.cat(means).std()),
        "frames": len(idx),
    }


@torch.no_grad()
def evaluate_unet(
    run: Run, stage: str, model, objective: UNetObjective, val: PackData, syncnet, s: dict[str, Any]
) -> dict[str, Any]:
    """Val noise-MSE at fixed timesteps/noise; then full sampling (DDIM, CFG) of val windows
    with their own audio and with another window's audio (dubbing): mouth PSNR, and SyncNet
    cosine similarity of generated frames to the audio they were made from, to shuffled audio,
    and of the ground truth to its audio."""
    model.eval()
    out: dict[str, Any] = {}
    windows = val.fixed_windows(s["eval_windows"])
    sums: dict[str, float] = {}
    with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=s["precision"] == "bf16"):
        for i in range(len(windows["seg"])):
            one = {k: v[i : i + 1] for k, v in windows.items()}
            loss, parts = objective(val.unet_batch(one, pixels=True), -1, torch.tensor([i]))
            for key, value in {
                "val_loss": loss,
                **{f"val_{k}": v for k, v in parts.items()},
            }.items():
                sums[key] = sums.get(key, 0.0) + float(value) / len(windows["seg"])
    out.update(sums)
    # full sampling
    n = min(s["sample_windows"], len(windows["seg"]))
    pick = {k: v[:n] for k, v in windows.items()}
    batch = val.unet_batch(pick, pixels=True)
    frames = batch["frames"]  # (n, 16, 3, R, R)
    audio = batch["audio_windows"]
    mel = batch["mel"]
    dub = torch.roll(torch.arange(n), 1)  # window i is dubbed with window i-1's audio
    denoiser = ChunkDenoiser(
        model,
        run.vae,
        val.mask.cpu(),
        DenoiseOptions(steps=s["sample_steps"], guidance=s["guidance"]),
    )
    h = val.resolution // 8
    gen = torch.Generator(device=run.device).manual_seed(1234)
    noise = torch.randn((1, 4, 1, h, h), generator=gen, device=run.device).expand(n, 4, 16, h, h)
    gens = [torch.Generator(device=run.device).manual_seed(100 + i) for i in range(n)]
    same = denoiser(frames, audio, noise, gens)
    gens = [torch.Generator(device=run.device).manual_seed(100 + i) for i in range(n)]
    dubbed = denoiser(frames, audio[dub], noise, gens)
    mouth = mouth_weight(val.resolution, run.device)
    out["sample_psnr_mouth"] = float(np.mean([psnr(same[i], frames[i], mouth) for i in range(n)]))
    out["sample_windows"] = n
    if syncnet is not None:

        def cos(faces, m):
            image = faces.reshape(faces.shape[0], -1, *faces.shape[-2:])[
                ..., val.resolution // 2 :, :
            ]
            v, a = syncnet(image.float(), m.float())
            return float(cosine_similarity(v, a).mean())

        out["sync_cos_ground_truth"] = cos(frames, mel)
        out["sync_cos_generated"] = cos(same, mel)
        out["sync_cos_generated_shuffled_audio"] = cos(same, mel[dub])
        out["sync_cos_dubbed"] = cos(dubbed, mel[dub])
        out["sync_cos_dubbed_vs_original_audio"] = cos(dubbed, mel)
    run.previews[stage] = sample_preview(frames, same, dubbed)
    return out


def _grid(rows: list[torch.Tensor]) -> np.ndarray:
    """rows of (k, 3, R, R) in [-1, 1] -> (rows·R, k·R, 3) uint8."""
    strips = [torch.cat(list(r.float().cpu().clamp(-1, 1)), dim=-1) for r in rows]
    img = torch.cat(strips, dim=-2)
    return ((img + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


def sample_preview(frames, same, dubbed, windows: int = 3) -> np.ndarray:
    rows = []
    for i in range(min(windows, frames.shape[0])):
        pick = [0, 5, 10, 15]
        rows += [frames[i, pick], same[i, pick], dubbed[i, pick]]
    return _grid(rows)


@torch.no_grad()
def vae_preview(vae: Vae, data: PackData) -> np.ndarray:
    idx = torch.linspace(0, data.num_frames_total - 1, 6).round().long().to(data.device)
    x = data.pixels(idx)
    recon = vae.autoencoder.decode(vae.autoencoder.encode(x).latent_dist.mean).sample
    return _grid([x, recon])


# --------------------------------------------------------------------------- state in and out


def _optimizer_tensors(optimizer, model) -> dict[str, torch.Tensor]:
    """AdamW state as named bf16 tensors (``<param>.exp_avg`` …) plus the step counts."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for p, st in optimizer.state.items():
        n = names[id(p)]
        out[f"{n}.exp_avg"] = st["exp_avg"].detach().to("cpu", torch.bfloat16)
        out[f"{n}.exp_avg_sq"] = st["exp_avg_sq"].detach().to("cpu", torch.bfloat16)
        out[f"{n}.step"] = torch.as_tensor(float(st["step"])).reshape(1)
    return out


def _load_optimizer(optimizer, model, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for n, p in params.items():
        if f"{n}.exp_avg" not in tensors:
            raise ConfigError(f"resumed optimizer state lacks {n}")
        optimizer.state[p] = {
            "step": torch.tensor(float(tensors[f"{n}.step"][0]), device=p.device),
            "exp_avg": tensors[f"{n}.exp_avg"].to(p.device, torch.float32),
            "exp_avg_sq": tensors[f"{n}.exp_avg_sq"].to(p.device, torch.float32),
        }


def load_resume(run: Run) -> None:
    """Weights, optimizer state and step counts from a previous ``--out`` folder."""
    src = run.resume_from
    if src is None:
        return
    if not src.is_dir():
        raise ConfigError(f"--resume-from {src} is not a folder")
    summary = src / "summary.json"
    if summary.is_file():
        prior = json.loads(summary.read_text())
        run.summary["stages"] = prior.get("stages", {})
        run.summary["history"] = prior.get("history", [])
    if is_bundle(src):
        manifest = read_manifest(src)
        run.vae = load_own_vae(src, device=run.device)
        run.vae_config = manifest["vae"]["config"]
        run.unet_state = {k: v.float() for k, v in read_unet_state(src, "own").items()}
        run.unet_stage = manifest["training"].get("last_stage")
        run.student = manifest["training"].get("student")
        extra = manifest["unet"]["config"].get("dynamic_conditioning")
        if extra and extra.get("enabled"):
            run.unet_config = dict(run.unet_config, dynamic_conditioning=extra)
    elif (src / "vae.safetensors").is_file():
        run.vae = load_own_vae(src / "vae.safetensors", device=run.device)
        run.vae_config = dict(run.vae.autoencoder.config)
        optim = src / "vae-optim.safetensors"
        if optim.is_file():
            run.vae_optimizer = load_file(str(optim))
    else:
        raise ConfigError(f"--resume-from {src} holds neither a bundle nor vae.safetensors")


def write_outputs(run: Run, stages_run: list[str]) -> list[str]:
    """The results of this invocation in ``--out`` (at most 8 files, each <= 15 MiB)."""
    out = run.out
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if run.unet_state is not None and run.vae is not None:
        motion = any(".motion_modules." in k for k in run.unet_state)
        write_bundle(
            out,
            unet_state=run.unet_state,
            unet_config=_unet_config(run, motion),
            vae_state=run.vae.autoencoder.state_dict(),
            vae_config=_plain_vae_config(run.vae_config),
            vae_scaling_factor=run.vae.scaling_factor,
            audio_spec=seeded_audio_spec(run.audio_seed),
            resolution=int(run.summary["pack"]["resolution"]),
            num_frames=16,
            name="demo",
            description="lipsync's self-trained demo model (synthetic corpus, docs/TRAINING.md)",
            training={
                "recipe": RECIPE,
                "last_stage": run.unet_stage,
                "stages": run.summary.get("stages", {}),
                **({"student": run.student} if run.student else {}),
            },
        )
        written += [p.name for p in out.iterdir() if p.name.startswith(("unet", "vae", "manifest"))]
        run.summary["bundle_bytes"] = bundle_size_bytes(out)
    elif run.vae is not None:
        export_vae(
            out,
            _plain_vae_config(run.vae_config),
            run.vae.autoencoder.state_dict(),
            run.vae.scaling_factor,
            run.summary["stages"]["vae"]["steps"],
        )
        (out / "vae_config.json").unlink(missing_ok=True)  # the metadata carries it
        written.append("vae.safetensors")
        if run.vae_optimizer is not None:
            size = sum(t.numel() * t.element_size() for t in run.vae_optimizer.values())
            if size <= 15 * 2**20:
                save_file(run.vae_optimizer, str(out / "vae-optim.safetensors"))
                written.append("vae-optim.safetensors")
    # metrics: the previous rounds' lines, then this round's, each tagged with its stage
    lines = read_jsonl(run.resume_from / "metrics.jsonl") if run.resume_from else []
    for stage in stages_run:
        for rec in read_jsonl(run.work / stage / "metrics.jsonl"):
            lines.append({"stage": stage, **rec})
    log = MetricsLog(out / "metrics.jsonl")
    (out / "metrics.jsonl").unlink(missing_ok=True)
    for rec in lines:
        log.write(rec)
    steps = {k: v["steps"] for k, v in run.summary["stages"].items()}
    panels = [
        ("loss", [f"loss_{s}" for s in STAGES]),
        ("VAE parts", ["l1_vae", "mse_vae", "kl_vae"]),
        ("U-Net parts", ["mse_unet1", "mse_unet2", "sync_unet2", "ctc_unet2", "mtrepa_unet2"]),
        ("student", [f"x0_mse_step{k}_student" for k in range(4)]),
    ]
    written.append("metrics.jsonl")
    if not run.lean:
        plot_metrics(_with_global_x(lines, steps), out / "loss.png", panels, title="demo recipe")
        written.append("loss.png")
    if run.previews and not run.lean:
        img = np.concatenate(
            [
                _pad_width(p, max(x.shape[1] for x in run.previews.values()))
                for p in run.previews.values()
            ],
            axis=0,
        )
        Image.fromarray(img).save(out / "preview.png")
        written.append("preview.png")
    (out / "summary.json").write_text(json.dumps(run.summary, indent=1, default=str) + "\n")
    written.append("summary.json")
    files = [p for p in out.iterdir() if p.is_file()]
    too_big = [p.name for p in files if p.stat().st_size > 15 * 2**20]
    if too_big or len(files) > 8:
        raise LipSyncError(
            f"{out} holds {len(files)} files ({', '.join(too_big) or 'none'} over 15 MiB): the "
            "GPU machine returns at most 8 files of at most 16 MiB"
        )
    return sorted(set(written))


def _plain_vae_config(config: dict[str, Any]) -> dict[str, Any]:
    keep = (
        "in_channels",
        "out_channels",
        "down_block_types",
        "up_block_types",
        "block_out_channels",
        "layers_per_block",
        "act_fn",
        "latent_channels",
        "norm_num_groups",
        "sample_size",
    )
    return {
        k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(config).items() if k in keep
    }


def _with_global_x(lines: list[dict[str, Any]], steps: dict[str, int]) -> list[dict[str, Any]]:
    """Train records on one x axis (the stages' steps end to end, in ``steps``' order), every
    number also under ``<name>_<stage>`` so each stage gets its own curves."""
    base, offset = {}, 0
    for stage, n in steps.items():
        base[stage] = offset
        offset += n
    out = []
    for rec in lines:
        stage = rec.get("stage", "")
        if rec.get("split") != "train" or stage not in base:
            continue
        numbers = {
            f"{k}_{stage}": v
            for k, v in rec.items()
            if k in ("loss", "mse", "sync", "l1", "kl", "ctc", "mtrepa") or k.startswith("x0_mse")
        }
        out.append({**rec, **numbers, "step": base[stage] + rec["step"]})
    return out


def _pad_width(img: np.ndarray, width: int) -> np.ndarray:
    return np.pad(img, ((0, 0), (0, width - img.shape[1]), (0, 0)))


def _stage_record(result, t0, evaluation, s, loop) -> dict[str, Any]:
    return {
        "steps": loop.step,
        "steps_this_round": result["steps_this_run"],
        "stopped": result["stopped"],
        "minutes": round((time.perf_counter() - t0) / 60.0, 2),
        "mean_step_s": result["mean_step_s"],
        "samples_per_s": (s["batch"] / result["mean_step_s"]) if result["mean_step_s"] else None,
        "eval": evaluation,
        "settings": s,
    }


# --------------------------------------------------------------------------- entry points


def train(
    pack: Path,
    stages: list[str],
    minutes: list[float],
    out: Path,
    resume_from: Path | None = None,
    syncnet: str | None = None,
    overrides: list[str] = (),
    audio_seed: int = 0,
    device: str | None = None,
    work: Path | None = None,
    unet_config: str | dict[str, Any] = UNET_CONFIG,
    lean: bool = False,
) -> dict[str, Any]:
    """Run ``stages`` with their wall-time shares ``minutes``; results in ``out``."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}")
    if len(minutes) != len(stages):
        raise ConfigError(f"{len(stages)} stages but {len(minutes)} --max-minutes values")
    settings = apply_overrides(copy.deepcopy(DEFAULTS), list(overrides))
    for stage, values in settings.items():
        unknown = sorted(set(values) - set(DEFAULTS.get(stage, {})))
        if stage not in DEFAULTS or unknown:
            raise ConfigError(f"unknown recipe setting {stage}.{unknown[0] if unknown else ''}")
    from_dict(QualitySection, dict(settings["unet2"]["quality"]), "unet2.quality").validate()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":  # TF32 for the fp32 parts (latent encoding, evaluation), tuned convs
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    config = resolve_unet_config(unet_config)
    run = Run(
        pack_dir=Path(pack),
        out=Path(out),
        work=Path(work or out.parent / ".recipe-work"),
        device=dev,
        settings=settings,
        audio_seed=audio_seed,
        unet_config=dict(config),
        syncnet_path=syncnet,
        resume_from=Path(resume_from) if resume_from else None,
        lean=lean,
    )
    run.work.mkdir(parents=True, exist_ok=True)
    load_resume(run)
    run.summary.setdefault("stages", {})
    for stage, mins in zip(stages, minutes, strict=True):
        if stage == "vae":
            record = stage_vae(run, mins)
        elif stage == "student":
            record = stage_student(run, mins)
        else:
            record = stage_unet(run, stage, mins)
        run.summary["stages"][stage] = record
    run.summary.update(
        recipe=RECIPE,
        audio_encoder={"kind": "whisper-seeded", "seed": audio_seed},
        device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor(),
        torch=torch.__version__,
        date=time.strftime("%Y-%m-%d %H:%M:%S"),
        round_minutes=round((time.perf_counter() - run.started) / 60.0, 2),
    )
    run.summary.setdefault("history", []).append(
        {
            "stages": stages,
            "minutes": minutes,
            "date": run.summary["date"],
            "round_minutes": run.summary["round_minutes"],
        }
    )
    run.summary["files"] = write_outputs(run, stages)
    return run.summary


app = typer.Typer(no_args_is_help=True, help="Train the demo bundle (see the module docstring).")


@app.command("pack")
def pack_command(
    data: Path = typer.Option(..., help="A processed corpus (lipsync data process output)."),
    out: Path = typer.Option(..., help="Pack folder to write."),
    max_mb: float = typer.Option(30.0, help="Size budget of the whole pack (MiB)."),
    audio: str = typer.Option("opus", help="opus (needs soundfile to read) or pcm."),
    audio_kbps: int = typer.Option(32, help="Opus bit rate."),
    crf: float | None = typer.Option(None, help="x264 CRF (default: the best that fits)."),
    max_minutes: list[str] = typer.Option([], help="split=minutes: keep at most this much."),
) -> None:
    """Pack a processed corpus for the GPU machine (CPU; needs PyAV)."""
    if audio not in ("opus", "pcm"):
        raise ConfigError(f"--audio must be opus or pcm, got {audio!r}")
    limits = {}
    for item in max_minutes:
        split, _, value = item.partition("=")
        limits[split] = float(value)
    write_pack(
        data,
        out,
        max_mb=max_mb,
        audio=audio,
        audio_kbps=audio_kbps,
        crf=crf,
        max_minutes=limits or None,
    )


@app.command("train")
def train_command(
    pack: Path = typer.Option(..., help="A training pack (the pack command's output)."),
    stage: str = typer.Option(..., help="Stages to run in order: vae, unet1, unet2 (comma list)."),
    max_minutes: str = typer.Option(..., help="Wall-time per stage, minutes (comma list)."),
    out: Path = typer.Option(..., help="Results folder (<= 8 files of <= 15 MiB)."),
    resume_from: Path | None = typer.Option(None, help="A previous --out folder."),
    syncnet: str | None = typer.Option(None, help="SyncNet file (unet2 loss, evaluation)."),
    overrides: list[str] = typer.Option([], "--set", help="stage.key=value, e.g. unet1.batch=48"),
    audio_seed: int = typer.Option(0, help="Seed of the frozen Whisper-tiny weights."),
    device: str | None = typer.Option(None, help="cuda or cpu (default: cuda if present)."),
    work: Path | None = typer.Option(None, help="Scratch folder (default: beside --out)."),
    unet_config: str = typer.Option(UNET_CONFIG, help="U-Net config: packaged name or JSON."),
    lean: bool = typer.Option(False, help="No loss.png / preview.png (frees 2 of the 8 files)."),
) -> None:
    """Run stages of the recipe on the GPU (or CPU, for a smoke test)."""
    stages = [s.strip() for s in stage.split(",") if s.strip()]
    minutes = [float(m) for m in max_minutes.split(",") if m.strip()]
    summary = train(
        pack,
        stages,
        minutes,
        out,
        resume_from,
        syncnet,
        overrides,
        audio_seed,
        device,
        work,
        unet_config,
        lean,
    )
    typer.echo(
        json.dumps(
            {k: summary[k] for k in ("stages", "files", "round_minutes")}, indent=1, default=str
        )
    )


def main() -> None:
    run_reporting_errors(app)


if __name__ == "__main__":
    main()
