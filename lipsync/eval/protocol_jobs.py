"""The jobs of the quality protocol (:mod:`lipsync.eval.protocol`), each one process.

* ``prepare`` (the parent, before anything else): the pack's train subset and test split with
  the teacher's audio features and VAE latents, saved once for every job.
* judges, trained on ground truth only: ``lipreader`` (the viseme/phone classifier that scores
  the outputs, :mod:`lipsync.eval.lipread`), ``ctc_head`` (the phone head's starting point for
  the ``phone_ctc`` arm) and ``video`` (the tiny 3D-conv video encoder of ``mouth_trepa``).
* ``arm``: one arm and seed: fine-tune the teacher for the protocol's steps, then evaluate.
* ``reference``: the teacher itself and the ground truth, evaluated the same way.
* ``student``: distil the teacher into the few-step student for a wall-time budget, evaluate,
  write its bundle.
* ``benchmark``: alone on the GPU at the end: frames/s of the teacher (20 DDIM steps, guided),
  the student (4 unguided steps) and the teacher's fast modes, and the quality of the fast mode
  whose speed matches the student's.

Evaluation (:func:`evaluate`): the first ``eval_segments`` test segments, ``eval_frames`` frames
each, generated in consecutive 16-frame chunks with one fixed initial noise (as a run does) for
two tasks: ``recon`` (the segment's own audio) and ``dub`` (the next segment's audio; the
labels of *that* audio score the mouths). Per task: SyncNet confidence and offset (±15-frame
search; offset accuracy = share of segments within ±1 frame), viseme and phone accuracy of the
lip reader against the driving audio's labels, mouth flicker, outside-mask PSNR of the decoded
frames before paste-back; for ``recon`` also the mouth PSNR against the ground truth.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lipsync.checkpoints import load_syncnet
from lipsync.diffusion import ChunkDenoiser, DenoiseOptions
from lipsync.errors import ConfigError
from lipsync.eval.lipread import LipReader, accuracy, train_lipreader, viseme_ids
from lipsync.eval.mouth_metrics import mouth_flicker, region_psnr
from lipsync.eval.sync import SyncScorer
from lipsync.models.scheduler import make_scheduler
from lipsync.models.unet import UNet3D, random_unet
from lipsync.models.vae import TINY_VAE_CONFIG, random_vae
from lipsync.own_checkpoints import (
    load_bundle,
    load_own_unet,
    load_own_vae,
    read_manifest,
    seeded_audio_spec,
    write_bundle,
)
from lipsync.train.config import QualitySection
from lipsync.train.distill import (
    STUDENT_FORMAT,
    DistillObjective,
    DistillPlan,
    trajectory_gap,
)
from lipsync.train.losses import LossModels, LossWeights
from lipsync.train.pack import limit_split, read_pack
from lipsync.train.pack_data import PackData
from lipsync.train.phone_ctc import train_ctc_head
from lipsync.train.quality import GATE_KEYS, build_quality_losses, with_dynamic_conditioning
from lipsync.train.unet import UNetObjective, enable_gradient_checkpointing
from lipsync.train.video_encoder import TinyVideoConfig, train_video_autoencoder

FRAMES = 16
ARMS = ("baseline", "phone_ctc", "mouth_trepa", "trepa_uniform", "dyncond")


@dataclass
class Job:
    kind: str  # lipreader | ctc_head | video | arm | reference | student | benchmark
    name: str
    arm: str | None = None
    seed: int = 0
    deadline: float | None = None  # unix time: stop training (judges, student)


# --------------------------------------------------------------------------- files


def work_paths(work: Path) -> dict[str, Path]:
    return {
        "prep": work / "prep",
        "judges": work / "judges",
        "calib": work / "calib",
        "results": work / "results",
        "logs": work / "logs",
        "student": work / "student",
        "steps": work / "steps.json",
    }


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(data, indent=1, default=_jsonable) + "\n")
    os.replace(tmp, path)


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.generic | torch.Tensor):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON: {type(x).__name__}")


def device_of(cfg) -> torch.device:
    return torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))


@dataclass
class Teacher:
    """A bundle's U-Net and VAE (without its audio encoder, which only :func:`prepare` needs)."""

    unet: UNet3D
    vae: Any
    manifest: dict[str, Any]


def load_teacher(path: str | os.PathLike, device: torch.device,
                 dtype: torch.dtype = torch.float32) -> Teacher:  # fmt: skip
    return Teacher(load_own_unet(path, device, dtype), load_own_vae(path, device, dtype),
                   read_manifest(path))  # fmt: skip


# --------------------------------------------------------------------------- preparation


def prepare(cfg, log=print) -> dict[str, Any]:
    """Decode the pack once, compute features and latents with the teacher's encoders, and save
    the train subset and the test split for the jobs (``work/prep/{train,test}.pt``)."""
    paths = work_paths(Path(cfg.work))
    device = device_of(cfg)
    t0 = time.perf_counter()
    pack = read_pack(cfg.pack, ("train", "test"))
    pack = limit_split(pack, "train", cfg.train_minutes)
    bundle = load_bundle(cfg.teacher, device=device)
    info: dict[str, Any] = {"teacher": bundle.manifest.get("name"), "resolution": pack.resolution}
    for split in ("train", "test"):
        data = PackData(pack, split, device)
        data.prepare_audio(bundle.audio)
        data.prepare_latents(bundle.vae)
        paths["prep"].mkdir(parents=True, exist_ok=True)
        torch.save(data.state(), paths["prep"] / f"{split}.pt")
        info[split] = {
            "frames": data.num_frames_total,
            "segments": len(data.segment_ids),
            "windows": len(data),
        }
        del data
    info["seconds"] = round(time.perf_counter() - t0, 1)
    del bundle
    if device.type == "cuda":
        torch.cuda.empty_cache()
    write_json(paths["prep"] / "info.json", info)
    log(f"prepared train {info['train']} and test {info['test']} in {info['seconds']} s")
    return info


def load_split(cfg, split: str, device: torch.device) -> PackData:
    state = torch.load(
        work_paths(Path(cfg.work))["prep"] / f"{split}.pt", mmap=True, weights_only=True
    )
    return PackData.from_state(state, device)


# --------------------------------------------------------------------------- evaluation


def eval_segments(test: PackData, cfg) -> tuple[list[int], int]:
    """The test segments evaluated and their common length (a multiple of 16 frames)."""
    frames = (cfg.eval_frames // FRAMES) * FRAMES
    segs = [i for i in range(len(test.segment_ids)) if int(test.seg_len[i]) >= frames]
    segs = segs[: cfg.eval_segments]
    if len(segs) < 2 or frames < 48:
        raise ConfigError(
            f"the quality evaluation needs at least 2 test segments of {max(frames, 48)} frames "
            f"(eval_frames >= 48 for the ±15-frame offset search); the pack has {len(segs)}"
        )
    return segs, frames


@dataclass
class EvalContext:
    test: PackData
    segs: list[int]
    frames: int
    lipreader: LipReader
    scorer: SyncScorer
    keep: torch.Tensor  # (R, R) bool: kept pixels
    generated: torch.Tensor  # (R, R) bool: regenerated pixels
    seed: int = 1234
    batch_chunks: int = 24

    @classmethod
    def build(cls, cfg, test: PackData, device: torch.device) -> EvalContext:
        segs, frames = eval_segments(test, cfg)
        judges = work_paths(Path(cfg.work))["judges"]
        lipreader = LipReader.from_file(judges / "lipreader.safetensors").to(device)
        model, info = load_syncnet(cfg.syncnet, device=device)
        scorer = SyncScorer(model, info["name"], device)
        keep = test.mask.cpu() > 0.5
        return cls(
            test, segs, frames, lipreader, scorer, keep, ~keep, batch_chunks=cfg.eval_batch_chunks
        )

    def faces(self, i: int) -> torch.Tensor:
        start = int(self.test.seg_start[i])
        return self.test.pixels(torch.arange(start, start + self.frames, device=self.test.device))

    def wav(self, i: int) -> np.ndarray:
        start = int(self.test.seg_start[i]) * 640
        return np.ascontiguousarray(self.test.audio[start : start + self.frames * 640])

    def phones(self, i: int) -> torch.Tensor:
        start = int(self.test.seg_start[i])
        return self.test.phones[start : start + self.frames]

    def audio_windows(self, i: int) -> torch.Tensor:
        chunks = self.frames // FRAMES
        seg = torch.full((chunks,), i, dtype=torch.int64, device=self.test.device)
        start = torch.arange(chunks, device=self.test.device) * FRAMES
        return self.test.audio_windows(seg, start)  # (chunks, 16, 50, 384)

    def pairs(self, task: str) -> list[tuple[int, int]]:
        """(face segment, audio segment) per evaluated clip."""
        if task == "recon":
            return [(i, i) for i in self.segs]
        return [(i, self.segs[(k + 1) % len(self.segs)]) for k, i in enumerate(self.segs)]


@torch.no_grad()
def generate(
    unet: nn.Module, vae, ctx: EvalContext, options: DenoiseOptions, pairs: list[tuple[int, int]]
) -> torch.Tensor:
    """Decoded frames (before paste-back) for every (faces, audio) pair: (n, T, 3, R, R)."""
    device = ctx.test.device
    denoiser = ChunkDenoiser(unet, vae, ctx.test.mask.cpu(), options)
    chunks = ctx.frames // FRAMES
    faces = torch.cat(
        [ctx.faces(i).reshape(chunks, FRAMES, *ctx.faces(i).shape[1:]) for i, _ in pairs]
    )
    audio = torch.cat([ctx.audio_windows(j) for _, j in pairs])
    h = ctx.test.resolution // 8
    g = torch.Generator(device=device).manual_seed(ctx.seed)
    noise = torch.randn((1, 4, 1, h, h), generator=g, device=device).expand(1, 4, FRAMES, h, h)
    out = []
    for b in range(0, len(faces), ctx.batch_chunks):
        n = min(ctx.batch_chunks, len(faces) - b)
        gens = [torch.Generator(device=device).manual_seed(ctx.seed + 1 + b + k) for k in range(n)]
        out.append(denoiser(faces[b : b + n], audio[b : b + n], noise, gens, paste=False).float())
    return torch.cat(out).reshape(len(pairs), ctx.frames, *faces.shape[2:])


def score(
    ctx: EvalContext, task: str, pairs, outputs: torch.Tensor, decoded: torch.Tensor | None
) -> dict[str, float]:
    """Metrics of one task: outputs (n, T, 3, R, R) pasted frames; decoded: before paste-back
    (None for ground truth)."""
    r = ctx.test.resolution
    conf, offset_ok, flicker, outside, mouth = [], [], [], [], []
    vis_hits = vis_n = ph_hits = ph_n = 0
    for k, (i, j) in enumerate(pairs):
        out = outputs[k]
        result = ctx.scorer.score(out[:, :, r // 2 :, :], ctx.wav(j))
        conf.append(result.confidence)
        offset_ok.append(abs(result.offset) <= 1)
        labels = ctx.phones(j)
        vis, ph = ctx.lipreader.predict(out)
        acc, n = accuracy(vis, viseme_ids(labels))
        vis_hits, vis_n = vis_hits + (acc * n if n else 0), vis_n + n
        acc, n = accuracy(ph, labels)
        ph_hits, ph_n = ph_hits + (acc * n if n else 0), ph_n + n
        flicker.append(mouth_flicker(out, ctx.generated))
        if decoded is not None:
            outside.append(region_psnr(decoded[k], ctx.faces(i), ctx.keep))
        if task == "recon" and decoded is not None:
            mouth.append(region_psnr(out, ctx.faces(i), ctx.generated))
    m = {
        f"{task}.sync_confidence": float(np.mean(conf)),
        f"{task}.sync_offset_acc": float(np.mean(offset_ok)),
        f"{task}.viseme_acc": vis_hits / vis_n if vis_n else float("nan"),
        f"{task}.phone_acc": ph_hits / ph_n if ph_n else float("nan"),
        f"{task}.flicker": float(np.mean(flicker)),
    }
    if outside:
        m[f"{task}.outside_psnr"] = float(np.mean(outside))
    if mouth:
        m[f"{task}.mouth_psnr"] = float(np.mean(mouth))
    return m


def evaluate(unet: nn.Module, vae, ctx: EvalContext, options: DenoiseOptions) -> dict[str, float]:
    """Both tasks for one model and sampler (module docstring)."""
    unet.eval()
    metrics: dict[str, float] = {}
    keep = ctx.keep.to(ctx.test.device).float()
    for task in ("recon", "dub"):
        pairs = ctx.pairs(task)
        decoded = generate(unet, vae, ctx, options, pairs)
        faces = torch.stack([ctx.faces(i) for i, _ in pairs])
        pasted = decoded * (1 - keep) + faces * keep
        metrics.update(score(ctx, task, pairs, pasted, decoded))
    return metrics


def evaluate_ground_truth(ctx: EvalContext) -> dict[str, dict[str, float]]:
    """The ground truth with its own audio (the ceiling) and with the next segment's audio (the
    floor: real mouths, wrong audio); each row's numbers under both tasks' keys, so the tables
    line up."""
    rows = {}
    for name, task in (("ground_truth", "recon"), ("ground_truth_dubbed", "dub")):
        pairs = ctx.pairs(task)
        faces = torch.stack([ctx.faces(i) for i, _ in pairs])
        plain = {k.split(".", 1)[1]: v for k, v in score(ctx, task, pairs, faces, None).items()}
        rows[name] = {f"{t}.{k}": v for t in ("recon", "dub") for k, v in plain.items()}
    return rows


# --------------------------------------------------------------------------- judges


def _window_sampler(data: PackData, batch: int, seed: int, pixels: bool = True):
    def sample(step: int):
        w = data.sample_windows(seed, step, batch)
        b = data.unet_batch(w, pixels=True)
        return b["frames"], b["phones"]

    return sample


def job_judge(cfg, job: Job) -> dict[str, Any]:
    device = device_of(cfg)
    train = load_split(cfg, "train", device)
    test = load_split(cfg, "test", device)
    judges = work_paths(Path(cfg.work))["judges"]
    judges.mkdir(parents=True, exist_ok=True)

    def stop() -> bool:
        return job.deadline is not None and time.time() >= job.deadline

    t0 = time.perf_counter()
    sample = _window_sampler(train, cfg.judge_batch, seed=job.seed + 101)
    fit = {"lr": 1e-3, "device": device, "deadline": stop}  # every judge: until the deadline
    extra: dict[str, Any] = {}
    if job.kind == "lipreader":
        model, losses = train_lipreader(sample, 10**9, seed=job.seed + 7, **fit)
        # accuracy on the held-out ground truth: the ceiling of the generated mouths' scores
        segs, frames = eval_segments(test, cfg)
        hits = n_all = 0
        for i in segs:
            start = int(test.seg_start[i])
            idx = torch.arange(start, start + frames, device=device)
            vis, _ = model.predict(test.pixels(idx))
            acc, n = accuracy(vis, viseme_ids(test.phones[idx]))
            hits, n_all = hits + acc * n, n_all + n
        extra = {"test_viseme_acc": hits / max(n_all, 1)}
    elif job.kind == "ctc_head":
        model, losses = train_ctc_head(
            sample, 10**9, units=cfg.ctc_units, seed=job.seed + 11, **fit
        )
    elif job.kind == "video":

        def clips(step: int) -> torch.Tensor:
            return sample(step)[0]

        model, losses = train_video_autoencoder(
            clips, 10**9, TinyVideoConfig(), seed=job.seed + 13, **fit
        )
    else:
        raise ConfigError(f"unknown judge {job.kind!r}")
    model.save(judges / f"{job.kind}.safetensors")  # lipreader, ctc_head, video
    return {
        "kind": "judge",
        "name": job.kind,
        "steps": len(losses),
        "loss_first": losses[0] if losses else None,
        "loss_last": float(np.mean(losses[-20:])) if losses else None,
        "seconds": round(time.perf_counter() - t0, 1),
        **extra,
    }


# --------------------------------------------------------------------------- arms


def arm_quality(arm: str, cfg) -> QualitySection:
    """The quality options of ``arm`` (the baseline: none): the only thing arms differ in."""
    q = QualitySection()
    judges = work_paths(Path(cfg.work))["judges"]
    if arm == "phone_ctc":
        q.phone_ctc.weight = cfg.ctc_weight
        q.phone_ctc.units = cfg.ctc_units
        q.phone_ctc.head_init = str(judges / "ctc_head.safetensors")
    elif arm in ("mouth_trepa", "trepa_uniform"):
        q.mouth_trepa.weight = cfg.trepa_weight
        q.mouth_trepa.encoder = "tiny3d"
        q.mouth_trepa.encoder_path = str(judges / "video.safetensors")
        q.mouth_trepa.mouth_weight = cfg.mouth_weight if arm == "mouth_trepa" else 1.0
        q.mouth_trepa.delta = cfg.trepa_delta if arm == "mouth_trepa" else 0.0
    elif arm == "dyncond":
        q.dynamic_conditioning.enabled = True
        q.dynamic_conditioning.per_region = cfg.dyncond_per_region
    elif arm != "baseline":
        raise ConfigError(f"unknown arm {arm!r}; choose from {', '.join(ARMS)}")
    return q


def teacher_unet(bundle: Teacher, quality: QualitySection | None = None) -> UNet3D:
    """A trainable fp32 copy of the teacher's U-Net (with the arm's new layers, if any)."""
    config = dict(bundle.manifest["unet"]["config"])
    if quality is not None:
        config = with_dynamic_conditioning(config, quality)
    model = UNet3D.from_config(config)
    own = model.state_dict()
    teacher = bundle.unet.state_dict()
    missing = [k for k in own if k not in teacher]
    if [k for k in missing if GATE_KEYS not in f".{k}"] or [k for k in teacher if k not in own]:
        raise ConfigError("the teacher's U-Net does not fit the arm's architecture")
    own.update({k: v.float() for k, v in teacher.items()})
    model.load_state_dict(own, strict=True)
    return model


def train_steps(
    model,
    objective,
    sample,
    optimizer,
    start: int,
    stop: int,
    cfg,
    seed: int,
    device: torch.device,
    log: list,
) -> None:
    """Steps ``start`` … ``stop − 1``: linear warm-up, bf16 autocast on CUDA, clipping at 1."""
    params = [p for p in model.parameters() if p.requires_grad]
    positions = torch.arange(cfg.batch)
    for step in range(start, stop):
        lr = cfg.lr * min(1.0, (step + 1) / max(cfg.warmup, 1))
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            loss, parts = objective(sample(step), step, positions)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % 5 == 0 or step == stop - 1:
            log.append(
                {
                    "step": step + 1,
                    "loss": float(loss.detach()),
                    "grad_norm": float(norm),
                    **{k: float(v) for k, v in parts.items()},
                }
            )


def _adamw(model, lr: float, device: torch.device, weight_decay: float = 0.01):
    return torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=lr,
        weight_decay=weight_decay,
        fused=device.type == "cuda" or None,
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wait_for_steps(cfg, deadline: float) -> int:
    path = work_paths(Path(cfg.work))["steps"]
    while time.time() < deadline:
        if path.is_file():
            return int(json.loads(path.read_text())["steps"])
        time.sleep(0.2)
    raise TimeoutError("no step budget from the protocol runner")


def job_arm(cfg, job: Job) -> dict[str, Any]:
    device = device_of(cfg)
    paths = work_paths(Path(cfg.work))
    train = load_split(cfg, "train", device)
    test = load_split(cfg, "test", device)
    bundle = load_teacher(cfg.teacher, device)
    vae = bundle.vae
    quality = arm_quality(job.arm, cfg)
    model = teacher_unet(bundle, quality).to(device).requires_grad_(True)
    del bundle.unet
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
        vae.autoencoder.enable_gradient_checkpointing()
    syncnet, _ = load_syncnet(cfg.syncnet, device=device)
    objective = UNetObjective(
        model=model,
        vae=vae,
        alphas_cumprod=make_scheduler("ddim").alphas_cumprod.to(device),
        weights=LossWeights(recon=1.0, sync=cfg.sync_weight),
        loss_models=LossModels(decode=vae.decode, syncnet=syncnet, pixel_space=True),
        mixed_noise=True,
        noise_alpha=1.0,
        seed=job.seed,
        num_frames=FRAMES,
        quality=build_quality_losses(quality, train.resolution, device),
    )
    pixels = quality.needs_pixels

    def sample(step: int) -> dict:
        return train.unet_batch(train.sample_windows(job.seed, step, cfg.batch), pixels)

    optimizer = _adamw(model, cfg.lr, device)
    log: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    if cfg.steps:
        steps = cfg.steps
        calib_s = None
    else:  # calibrate: 1 warm-up step, then timed steps, with every arm running
        train_steps(model, objective, sample, optimizer, 0, 1, cfg, job.seed, device, log)
        _sync(device)
        tc = time.perf_counter()
        train_steps(
            model, objective, sample, optimizer, 1, 1 + cfg.calib_steps, cfg, job.seed, device, log
        )
        _sync(device)
        calib_s = (time.perf_counter() - tc) / cfg.calib_steps
        write_json(
            paths["calib"] / f"{job.name}.json", {"step_s": calib_s, "done": 1 + cfg.calib_steps}
        )
        steps = wait_for_steps(cfg, time.time() + cfg.calib_wait_seconds)
    done = log[-1]["step"] if log else 0
    train_steps(model, objective, sample, optimizer, done, steps, cfg, job.seed, device, log)
    _sync(device)
    train_s = time.perf_counter() - t0
    model.eval().requires_grad_(False)
    ctx = EvalContext.build(cfg, test, device)
    te = time.perf_counter()
    metrics = evaluate(
        model, vae, ctx, DenoiseOptions(steps=cfg.eval_steps, guidance=cfg.eval_guidance)
    )
    return {
        "kind": "arm",
        "arm": job.arm,
        "seed": job.seed,
        "name": job.name,
        "steps": steps,
        "batch": cfg.batch,
        "calib_step_s": calib_s,
        "train_seconds": round(train_s, 1),
        "eval_seconds": round(time.perf_counter() - te, 1),
        "log": log[-8:],
        "quality": asdict(quality),
        "metrics": metrics,
    }


def job_reference(cfg, job: Job) -> list[dict[str, Any]]:
    device = device_of(cfg)
    test = load_split(cfg, "test", device)
    bundle = load_teacher(cfg.teacher, device)
    ctx = EvalContext.build(cfg, test, device)
    t0 = time.perf_counter()
    teacher = evaluate(
        bundle.unet,
        bundle.vae,
        ctx,
        DenoiseOptions(steps=cfg.eval_steps, guidance=cfg.eval_guidance),
    )
    rows = [
        {
            "kind": "reference",
            "name": "teacher",
            "metrics": teacher,
            "sampler": {
                "scheduler": "ddim",
                "steps": cfg.eval_steps,
                "guidance": cfg.eval_guidance,
            },
            "seconds": round(time.perf_counter() - t0, 1),
        }
    ]
    for name, metrics in evaluate_ground_truth(ctx).items():
        rows.append({"kind": "reference", "name": name, "metrics": metrics})
    return rows


# --------------------------------------------------------------------------- student


def job_student(cfg, job: Job) -> dict[str, Any]:
    device = device_of(cfg)
    paths = work_paths(Path(cfg.work))
    test = load_split(cfg, "test", device)
    if cfg.student_from:  # distilled before (demo_recipe --stage student): evaluate only
        given = load_teacher(cfg.student_from, device)
        steps = given.manifest["training"]["student"]["steps"]
        ctx = EvalContext.build(cfg, test, device)
        metrics = evaluate(given.unet, given.vae, ctx, DenoiseOptions(steps=steps, guidance=1.0))
        return {"kind": "student", "name": "student", "from": cfg.student_from,
                "training": given.manifest["training"]["student"], "metrics": metrics,
                "sampler": {"scheduler": "ddim", "steps": steps, "guidance": 1.0}}  # fmt: skip
    train = load_split(cfg, "train", device)
    bundle = load_teacher(cfg.teacher, device)
    teacher = bundle.unet.eval().requires_grad_(False)
    student = teacher_unet(bundle).to(device).requires_grad_(True)
    plan = DistillPlan(cfg.eval_steps, cfg.student_steps, cfg.eval_guidance)
    objective = DistillObjective(
        student,
        teacher,
        plan,
        bundle.vae.scaling_factor,
        job.seed,
        cfg.student_weighting,
        cfg.student_dub_share,
    )

    def sample(step: int) -> dict:
        return train.unet_batch(train.sample_windows(job.seed + 77, step, cfg.student_batch))

    optimizer = _adamw(student, cfg.student_lr, device, weight_decay=0.0)
    log: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    step = 0
    settings = _StudentSettings(cfg)
    while True:
        train_steps(
            student, objective, sample, optimizer, step, step + 1, settings, job.seed, device, log
        )
        step += 1
        if (job.deadline is not None and time.time() >= job.deadline) or (
            cfg.student_max_steps and step >= cfg.student_max_steps
        ):
            break
    _sync(device)
    train_s = time.perf_counter() - t0
    student.eval().requires_grad_(False)
    gap = trajectory_gap(student, teacher, test, plan, bundle.vae.scaling_factor, windows=8)
    ctx = EvalContext.build(cfg, test, device)
    metrics = evaluate(
        student, bundle.vae, ctx, DenoiseOptions(steps=cfg.student_steps, guidance=1.0)
    )
    manifest = bundle.manifest
    training = {
        "recipe": "lipsync.quality_protocol/1",
        "last_stage": "student",
        "student": {
            "format": STUDENT_FORMAT,
            "steps": cfg.student_steps,
            "guidance": 1.0,
            "scheduler": "ddim",
            "teacher": {"steps": plan.teacher_steps, "guidance": plan.guidance},
            "method": "trajectory distillation (lipsync.train.distill)",
            "train_steps": step,
            "batch": cfg.student_batch,
        },
        "teacher_training": manifest.get("training", {}),
    }
    write_bundle(
        paths["student"],
        unet_state={k: v.detach().cpu() for k, v in student.state_dict().items()},
        unet_config=manifest["unet"]["config"],
        vae_state=bundle.vae.autoencoder.state_dict(),
        vae_config=manifest["vae"]["config"],
        vae_scaling_factor=bundle.vae.scaling_factor,
        audio_spec=manifest["audio"],
        resolution=int(manifest["resolution"]),
        num_frames=int(manifest["num_frames"]),
        name=f"{manifest.get('name', 'teacher')}-student{cfg.student_steps}",
        description=f"{cfg.student_steps}-step student of {manifest.get('name', 'the teacher')}",
        training=training,
    )
    return {
        "kind": "student",
        "name": "student",
        "steps": step,
        "batch": cfg.student_batch,
        "train_seconds": round(train_s, 1),
        "trajectory": gap,
        "log": log[-8:],
        "sampler": {"scheduler": "ddim", "steps": cfg.student_steps, "guidance": 1.0},
        "metrics": metrics,
    }


class _StudentSettings:
    """What :func:`train_steps` reads, with the student's batch and learning rate."""

    def __init__(self, cfg):
        self.batch, self.lr, self.warmup = cfg.student_batch, cfg.student_lr, cfg.warmup


# --------------------------------------------------------------------------- benchmark


def fast_candidates(cfg) -> list[tuple[str, DenoiseOptions]]:
    """The teacher's approximate modes to match the student's speed with."""
    out = []
    for steps in cfg.fast_steps:
        out.append(
            (
                f"fast dpm++ {steps}",
                DenoiseOptions.for_mode(
                    "fast", scheduler="dpm++", steps=steps, guidance=cfg.eval_guidance
                ),
            )
        )
    return out


@torch.no_grad()
def frames_per_second(unet, vae, ctx: EvalContext, options: DenoiseOptions, reps: int) -> float:
    """Frames/s of the whole chunk denoiser (VAE encode, U-Net loop, decode) on batches of
    ``ctx.batch_chunks`` chunks, after one warm-up call."""
    device = ctx.test.device
    pairs = ctx.pairs("recon")
    chunks = ctx.frames // FRAMES
    faces = torch.cat(
        [ctx.faces(i).reshape(chunks, FRAMES, *ctx.faces(i).shape[1:]) for i, _ in pairs]
    )[: ctx.batch_chunks]
    audio = torch.cat([ctx.audio_windows(i) for i, _ in pairs])[: ctx.batch_chunks]
    denoiser = ChunkDenoiser(unet, vae, ctx.test.mask.cpu(), options)
    h = ctx.test.resolution // 8
    noise = torch.zeros((1, 4, FRAMES, h, h), device=device)
    denoiser(faces, audio, noise, None)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        denoiser(faces, audio, noise, None)
    _sync(device)
    return reps * faces.shape[0] * FRAMES / (time.perf_counter() - t0)


def job_benchmark(cfg, job: Job) -> list[dict[str, Any]]:
    device = device_of(cfg)
    paths = work_paths(Path(cfg.work))
    test = load_split(cfg, "test", device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    teacher = load_teacher(cfg.teacher, device, dtype)
    ctx = EvalContext.build(cfg, test, device)
    rows = []
    settings = [
        (
            "teacher",
            f"teacher, DDIM {cfg.eval_steps} steps, guidance {cfg.eval_guidance}",
            teacher,
            DenoiseOptions(steps=cfg.eval_steps, guidance=cfg.eval_guidance),
        )
    ]
    student_dir = Path(cfg.student_from) if cfg.student_from else paths["student"]
    if (student_dir / "manifest.json").is_file():
        student = load_teacher(student_dir, device, dtype)
        steps = student.manifest["training"]["student"]["steps"]
        settings.append(
            (
                "student",
                f"student, DDIM {steps} steps, unguided",
                student,
                DenoiseOptions(steps=steps, guidance=1.0),
            )
        )
    for label, options in fast_candidates(cfg):
        settings.append(
            (
                label,
                f"teacher, --mode fast --scheduler dpm++ --steps {options.steps}",
                teacher,
                options,
            )
        )
    for name, label, bundle, options in settings:
        fps = frames_per_second(bundle.unet, bundle.vae, ctx, options, cfg.bench_reps)
        calls = sum(2 if guided else 1 for guided, _ in options.plan())
        rows.append(
            {
                "name": name,
                "label": label,
                "fps": fps,
                "calls": calls,
                "options": options.as_dict(),
                "dtype": str(dtype),
            }
        )
    out: list[dict[str, Any]] = [
        {
            "kind": "benchmark",
            "name": "benchmark",
            "rows": rows,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "batch_chunks": ctx.batch_chunks,
        }
    ]
    target = next((r["fps"] for r in rows if r["name"] == "student"), None)
    fast = [r for r in rows if r["name"].startswith("fast")]
    if target and fast:
        match = min(fast, key=lambda r: abs(np.log(r["fps"] / target)))
        match["matched"] = True
        options = DenoiseOptions(**match["options"])
        metrics = evaluate(teacher.unet, teacher.vae, ctx, options)
        out.append(
            {
                "kind": "fast",
                "name": match["name"],
                "metrics": metrics,
                "sampler": match["options"],
                "fps": match["fps"],
            }
        )
    return out


# --------------------------------------------------------------------------- smoke tests

# A two-level U-Net with motion modules: the smallest that exercises every part (smoke tests);
# attention (audio and temporal) only at the lower level, so a CPU runs it at 256 px.
TINY_TEACHER_UNET: dict[str, Any] = {
    "in_channels": 13, "out_channels": 4, "block_out_channels": [32, 64],
    "down_block_types": ["DownBlock3D", "CrossAttnDownBlock3D"],
    "up_block_types": ["CrossAttnUpBlock3D", "UpBlock3D"], "layers_per_block": 1,
    "attention_head_dim": 8, "cross_attention_dim": 384, "norm_num_groups": 32,
    "use_motion_module": True, "motion_module_resolutions": [2],
    "motion_module_kwargs": {"num_attention_heads": 8, "temporal_position_encoding_max_len": 24},
}  # fmt: skip


def write_random_teacher(out: str | os.PathLike, resolution: int, seed: int = 0) -> Path:
    """A bundle with seeded random weights (tiny U-Net and VAE, seeded Whisper) at
    ``resolution``: the stand-in teacher of CPU smoke runs. Its outputs mean nothing."""
    unet = random_unet(TINY_TEACHER_UNET, seed=seed)
    vae_config = {**TINY_VAE_CONFIG, "sample_size": resolution, "mid_block_add_attention": False}
    vae = random_vae(vae_config, seed=seed)
    keep = ("in_channels", "out_channels", "down_block_types", "up_block_types",
            "block_out_channels", "layers_per_block", "act_fn", "latent_channels",
            "norm_num_groups", "sample_size", "mid_block_add_attention")  # fmt: skip
    return write_bundle(
        out,
        unet_state=unet.state_dict(),
        unet_config=TINY_TEACHER_UNET,
        vae_state=vae.autoencoder.state_dict(),
        vae_config={
            k: (list(v) if isinstance(v, tuple) else v) for k, v in vae_config.items() if k in keep
        },  # fmt: skip
        vae_scaling_factor=1.0,
        audio_spec=seeded_audio_spec(0),
        resolution=resolution,
        num_frames=FRAMES,
        name="random-tiny-teacher",
        description="seeded random weights: a stand-in teacher for smoke tests",
        training={"last_stage": "unet2", "random_weights": True},
        dtype="fp32",
    )


def run_job(cfg, job: Job) -> Any:
    torch.manual_seed(job.seed)
    if device_of(cfg).type == "cuda":  # as the demo recipe: TF32 for fp32 parts, tuned convs
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    if job.kind in ("lipreader", "ctc_head", "video"):
        return job_judge(cfg, job)
    if job.kind == "arm":
        return job_arm(cfg, job)
    if job.kind == "reference":
        return job_reference(cfg, job)
    if job.kind == "student":
        return job_student(cfg, job)
    if job.kind == "benchmark":
        return job_benchmark(cfg, job)
    raise ConfigError(f"unknown job kind {job.kind!r}")
