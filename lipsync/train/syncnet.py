"""SyncNet training (``lipsync train syncnet CONFIG``): LatentSync's recipe on our datasets.

Recipe (LatentSync ``train_syncnet.py``): 16-frame windows of the lower half of aligned faces and
their mel window; half the pairs in sync, half with audio from another time of the same segment;
loss = binary cross-entropy of the cosine similarity of the two L2-normalised embeddings against
the label. Validation: loss and accuracy (cosine > 0.5) on up to 2048 pairs of the validation
split. AdamW with warm-up, gradient clipping, bf16 autocast on CUDA.

Runs in one process or several under ``torchrun`` (DDP; NCCL on GPUs, gloo on CPUs; the global
batch is split evenly, :mod:`lipsync.train.batches`). A run folder ``OUT`` holds::

    config.json            the resolved config (a resume must match it)
    checkpoints/step-*.pt  model + optimiser + step, every ``checkpoint_every`` steps and at exit
    metrics.jsonl          train records (loss, acc, lr, samples/s) and val/test records
    metrics.png            loss and accuracy charts
    syncnet.safetensors    the final model (fp16, config and name inside: ``--syncnet`` input)
    summary.json           the final numbers

Starting again with the same ``OUT`` resumes from the newest checkpoint with the same data order
(deterministic per step) and RNG (seeded per step), so the loss curve continues as if the run had
never stopped; records a killed run wrote past that checkpoint are dropped from the JSONL.
Training stops at ``max_steps``, after ``max_minutes`` of wall time, or on SIGTERM / Ctrl-C (the
first one: finish the step, checkpoint, export; checked every ``log_every`` steps).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from lipsync.checkpoints import load_syncnet, save_syncnet
from lipsync.config import load_packaged_config
from lipsync.data.pair_sources import open_syncnet_pairs
from lipsync.errors import ConfigError
from lipsync.eval.syncnet_accuracy import PairMetrics, evaluate_pairs, fit_image
from lipsync.models.syncnet import StableSyncNet, SyncNetConfig, cosine_loss, cosine_similarity
from lipsync.train.batches import EpochBatchSampler, GlobalBatches
from lipsync.train.checkpointing import CheckpointDir, atomic_write_text
from lipsync.train.distributed import DistContext
from lipsync.train.metrics import MetricsLog, plot_metrics
from lipsync.train.optim import Schedule, adamw, lr_factor
from lipsync.train.progress import TrainProgress
from lipsync.train.signals import StopSignals

Precision = Literal["auto", "bf16", "fp32"]

# Settings that may change between a run and its resumption (they do not change the maths).
_RESUMABLE_CHANGES = {
    "max_steps", "max_minutes", "num_workers", "checkpoint_every", "keep_checkpoints",
    "val_every", "log_every", "gradient_checkpointing", "test_split", "val_pairs",
}  # fmt: skip


@dataclass(frozen=True)
class SyncNetTrainConfig:
    """Everything a SyncNet training run needs (``lipsync/configs/syncnet_*_train.json``)."""

    name: str  # how the exported SyncNet names itself in reports
    model: dict[str, Any]  # the model config (resolved)
    data: str  # a processed corpus folder, or "toy[:…]" (lipsync.data.pair_sources)
    init: str | None = None  # a SyncNet file (save_syncnet) to start from instead of the seed
    train_split: str = "train"
    val_split: str | None = "val"
    test_split: str | None = "test"
    num_workers: int = 4
    batch_size: int = 64  # global, over all processes
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100
    schedule: Schedule = "constant"
    grad_clip: float = 1.0
    max_steps: int = 10000
    max_minutes: float | None = None
    precision: Precision = "auto"
    gradient_checkpointing: bool = False
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    val_every: int = 500
    val_pairs: int = 2048
    val_batch_size: int = 64
    model_file: str = field(default="", compare=False)  # where the model config came from

    @classmethod
    def from_file(cls, path: str | os.PathLike, **overrides: Any) -> SyncNetTrainConfig:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raw = _packaged(str(path))
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read training config {path}: {e}") from e
        return cls.from_dict(raw, **overrides)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], **overrides: Any) -> SyncNetTrainConfig:
        unknown = sorted(set(raw) - {"name", "model", "data", "train"})
        if unknown:
            raise ConfigError(f"unknown training config sections: {', '.join(unknown)}")
        for key in ("name", "model", "data"):
            if key not in raw:
                raise ConfigError(f"training config lacks {key!r}")
        model, model_file = raw["model"], ""
        if isinstance(model, str):
            model_file, model = model, _model_config(model)
        data = dict(raw["data"]) if isinstance(raw["data"], dict) else {"root": raw["data"]}
        values: dict[str, Any] = {"name": raw["name"], "model": model, "model_file": model_file}
        values["data"] = data.pop("root", None)
        values.update(data)
        values.update(raw.get("train", {}))
        values.update({k: v for k, v in overrides.items() if v is not None})
        names = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(values) - names)
        if bad:
            raise ConfigError(f"unknown training settings: {', '.join(bad)}")
        if isinstance(values.get("betas"), list):
            values["betas"] = tuple(values["betas"])
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        if not self.data:
            raise ConfigError("training config lacks data.root (a processed corpus or 'toy')")
        SyncNetConfig.from_dict(self.model)
        positive = ("batch_size", "max_steps", "log_every", "checkpoint_every", "keep_checkpoints")
        for key in positive:
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1")
        if self.checkpoint_every % self.log_every:
            raise ConfigError("checkpoint_every must be a multiple of log_every")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.schedule not in ("constant", "cosine"):
            raise ConfigError(f"schedule must be constant or cosine, got {self.schedule!r}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ConfigError("max_minutes must be positive")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError("lr must be a positive number")

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out

    def identity(self) -> dict[str, Any]:
        """The settings a resumed run must share with the run it continues."""
        return {k: v for k, v in self.as_dict().items() if k not in _RESUMABLE_CHANGES | {
            "model_file"}}  # fmt: skip


def _packaged(name: str) -> dict[str, Any]:
    return load_packaged_config(Path(name).name)


def _model_config(ref: str) -> dict[str, Any]:
    path = Path(ref).expanduser()
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read model config {path}: {e}") from e
    return load_packaged_config(ref)


# ------------------------------------------------------------------------------------------


def _autocast_dtype(precision: Precision, device: torch.device) -> torch.dtype | None:
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


class SyncNetTrainer:
    def __init__(
        self,
        config: SyncNetTrainConfig,
        out: str | os.PathLike,
        ctx: DistContext,
        show_progress: bool = True,
    ):
        self.cfg, self.out, self.ctx = config, Path(out), ctx
        self.show_progress = show_progress and ctx.is_main
        self.ckpts = CheckpointDir(self.out / "checkpoints", keep=config.keep_checkpoints)
        self.log = MetricsLog(self.out / "metrics.jsonl", enabled=ctx.is_main)
        self.amp = _autocast_dtype(config.precision, ctx.device)

    # -- set-up --------------------------------------------------------------------------

    def _check_run_folder(self) -> None:
        saved = self.out / "config.json"
        if saved.exists():
            old = json.loads(saved.read_text())
            new = self.cfg.identity()
            diff = sorted(k for k in new if old.get(k) != new[k])
            if diff:
                raise ConfigError(
                    f"{self.out} holds a run with other settings ({', '.join(diff)}); "
                    "resume with the same config or choose another --out"
                )
        elif self.ctx.is_main:
            atomic_write_text(saved, json.dumps(self.cfg.as_dict(), indent=1) + "\n")

    def _build_model(self) -> StableSyncNet:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed)
            model = StableSyncNet.from_config(self.cfg.model)
        if self.cfg.init:  # a checkpoint of this run, when there is one, overrides it later
            start, _ = load_syncnet(self.cfg.init)
            if start.config.to_dict() != model.config.to_dict():
                raise ConfigError(
                    f"init {self.cfg.init} is a SyncNet of another architecture than the "
                    "training config's model"
                )
            model.load_state_dict(start.state_dict())
        model.set_gradient_checkpointing(self.cfg.gradient_checkpointing)
        return model.to(self.ctx.device).train()

    # -- steps ---------------------------------------------------------------------------

    def _train_step(self, model, ddp, opt, batch, step: int) -> torch.Tensor:
        dev = self.ctx.device
        # randomness (dropout) depends only on the step and rank: exact after a resume
        torch.manual_seed(self.cfg.seed * 1_000_003 + step * 131 + self.ctx.rank)
        for group in opt.param_groups:
            group["lr"] = self.cfg.lr * lr_factor(
                step, self.cfg.warmup_steps, self.cfg.max_steps, self.cfg.schedule
            )
        image = fit_image(batch["image"].to(dev, non_blocking=True), model)
        audio = batch["audio"].to(dev, non_blocking=True)
        y = batch["y"].to(dev, non_blocking=True).reshape(-1).float()
        amp = self.amp is not None
        with torch.autocast(dev.type, dtype=self.amp or torch.float32, enabled=amp):
            vision, sound = ddp(image, audio)
        loss = cosine_loss(vision, sound, y).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), self.cfg.grad_clip)
        opt.step()
        correct = ((cosine_similarity(vision, sound) > 0.5).float() == y).float().mean()
        return torch.stack([loss.detach(), correct.detach(), grad_norm.detach().float()])

    def _validate(self, model, dataset, split: str, step: int) -> PairMetrics:
        metrics = evaluate_pairs(
            model, dataset, max_pairs=self.cfg.val_pairs, batch_size=self.cfg.val_batch_size,
            device=self.ctx.device, autocast_dtype=self.amp, seed=self.cfg.seed,
            num_workers=self.cfg.num_workers,
            rank=self.ctx.rank, world_size=self.ctx.world_size,
            reduce_sum=self.ctx.all_reduce_sum,
        )  # fmt: skip
        m = metrics.as_dict()
        self.log.write({"step": step, "split": split, **{f"{split}_{k}": v for k, v in m.items()}})
        return metrics

    def _chart(self) -> None:
        if not self.ctx.is_main:
            return
        plot_metrics(
            self.log.records(),
            self.out / "metrics.png",
            [
                ("BCE loss", ["loss", "val_loss"]),
                ("accuracy (cos > 0.5)", ["acc", "val_accuracy", "test_accuracy"]),
                ("learning rate", ["lr"]),
            ],
            title=self.cfg.name,
        )

    def _save(self, model, opt, step: int, elapsed: float) -> None:
        if self.ctx.is_main:
            state = {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "elapsed_s": elapsed,
                "config": json.dumps(self.cfg.identity()),
            }
            self.ckpts.save(step, state)
        self.ctx.barrier()

    # -- the run -------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        cfg, ctx = self.cfg, self.ctx
        self.out.mkdir(parents=True, exist_ok=True)
        self._check_run_folder()
        ctx.barrier()
        nf = SyncNetConfig.from_dict(cfg.model).num_frames
        train = open_syncnet_pairs(cfg.data, cfg.train_split, nf, cfg.seed)
        val = open_syncnet_pairs(cfg.data, cfg.val_split, nf, cfg.seed) if cfg.val_split else None
        model = self._build_model()
        ddp = ctx.wrap(model)
        opt = adamw(model, cfg.lr, cfg.weight_decay, cfg.betas)

        step, elapsed_before = 0, 0.0
        state = self.ckpts.load_latest(map_location="cpu")
        if state is not None:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            step, elapsed_before = int(state["step"]), float(state.get("elapsed_s", 0.0))
            self.log.truncate_after(step)
        start_step, t0 = step, time.monotonic()
        batches = GlobalBatches(len(train), cfg.batch_size, cfg.seed, ctx.rank, ctx.world_size)
        deadline = t0 + cfg.max_minutes * 60 if cfg.max_minutes else None
        pin = ctx.device.type == "cuda"
        acc = torch.zeros(3, device=ctx.device)  # loss, accuracy, grad norm sums since last log
        n_acc, t_log, stopped = 0, time.monotonic(), "max_steps"
        last_saved = last_val = step if state is not None else -1
        val_metrics: PairMetrics | None = None

        with (
            StopSignals(second_interrupt=True) as signals,
            TrainProgress(cfg.max_steps, step, self.show_progress, what="syncnet") as bar,
        ):
            if state is not None:
                bar.log(f"resumed from step {step} ({self.ckpts.path(step)})")
            done = step >= cfg.max_steps
            while not done:
                epoch, first = batches.position(step)
                if hasattr(train, "set_epoch"):
                    train.set_epoch(epoch)
                loader = torch.utils.data.DataLoader(
                    train, batch_sampler=EpochBatchSampler(batches, epoch, first),
                    num_workers=cfg.num_workers, pin_memory=pin,
                    prefetch_factor=4 if cfg.num_workers else None,
                )  # fmt: skip
                for batch in loader:
                    acc += self._train_step(model, ddp, opt, batch, step)
                    step += 1
                    n_acc += 1
                    if step % cfg.log_every == 0 or step >= cfg.max_steps:
                        sums = ctx.all_reduce_sum(acc.clone()) / ctx.world_size / n_acc
                        loss, accuracy, gnorm = sums.tolist()
                        now = time.monotonic()
                        rate = n_acc * cfg.batch_size / max(now - t_log, 1e-9)
                        lr = opt.param_groups[0]["lr"]
                        self.log.write({
                            "step": step, "epoch": epoch, "loss": loss, "acc": accuracy,
                            "grad_norm": gnorm, "lr": lr, "samples_per_s": rate,
                            "elapsed_s": elapsed_before + now - t0,
                            "unix_s": round(time.time(), 3),
                        })  # fmt: skip
                        bar.update(step, loss=loss, acc=accuracy, samples_s=rate)
                        acc.zero_()
                        n_acc, t_log = 0, now
                        late = deadline is not None and now >= deadline
                        if ctx.any(late or signals.name is not None):
                            stopped = signals.name or "max_minutes"
                            if ctx.distributed and signals.name is None and not late:
                                stopped = "stopped by another process"
                            done = True
                    if step % cfg.checkpoint_every == 0:
                        self._save(model, opt, step, elapsed_before + time.monotonic() - t0)
                        last_saved = step
                    if val is not None and cfg.val_every and step % cfg.val_every == 0:
                        val_metrics = self._validate(model, val, "val", step)
                        last_val = step
                        bar.log(
                            f"step {step}: val loss {val_metrics.loss:.4f}, "
                            f"accuracy {val_metrics.accuracy:.3f} ({val_metrics.pairs} pairs)"
                        )
                        self._chart()
                    if done or step >= cfg.max_steps:
                        done = True
                        break

            elapsed = elapsed_before + time.monotonic() - t0
            if last_saved != step:
                self._save(model, opt, step, elapsed)
            if val is not None and last_val != step:
                val_metrics = self._validate(model, val, "val", step)
            test_metrics = None
            if cfg.test_split:
                test = open_syncnet_pairs(cfg.data, cfg.test_split, nf, cfg.seed)
                test_metrics = self._validate(model, test, "test", step)

        peak_memory = ctx.peak_memory_gib()  # collective: before the main-only part
        summary = {
            "name": cfg.name,
            "steps": step,
            "steps_this_run": step - start_step,
            "stopped": stopped,
            "elapsed_s": elapsed,
            "world_size": ctx.world_size,
            "device": str(ctx.device),
            "precision": "bf16" if self.amp else "fp32",
            "parameters": sum(p.numel() for p in model.parameters()),
            "val": val_metrics.as_dict() if val_metrics else None,
            "test": test_metrics.as_dict() if test_metrics else None,
            "checkpoint": str(self.ckpts.path(step)),
            "peak_memory_gib": peak_memory,
        }
        if ctx.is_main:
            meta = {
                "steps": str(step),
                "data": str(cfg.data),
                "val_accuracy": f"{val_metrics.accuracy:.4f}" if val_metrics else "",
                "test_accuracy": f"{test_metrics.accuracy:.4f}" if test_metrics else "",
            }
            export = save_syncnet(model, self.out / "syncnet.safetensors", cfg.name, meta)
            summary["export"] = str(export)
            atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=1) + "\n")
            self._chart()
        ctx.barrier()
        return summary


def train_syncnet(
    config: SyncNetTrainConfig,
    out: str | os.PathLike,
    device: str | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Train (or resume) a SyncNet into the run folder ``out``; returns the summary."""
    ctx = DistContext.from_env(device)
    try:
        return SyncNetTrainer(config, out, ctx, show_progress).run()
    finally:
        ctx.close()
