"""The resumable optimisation loop shared by the U-Net and VAE trainers (and the demo recipe).

One step = ``grad_accumulation`` micro-batches on every process, gradients averaged over all of
them (DDP/FSDP average across processes; each micro-batch loss is divided by the count), clipped,
then one optimiser step. What makes a run reproducible and resumable:

* **Data order** is a function of (seed, epoch) (:class:`lipsync.train.batches.GlobalBatches`):
  global batch ``k`` of an epoch is fixed, and rank ``r`` takes its ``r``-th slice, so one
  process with batch ``2B`` and two with ``B`` see the same samples.
* **Randomness per sample** (timestep, noise, posterior draws) comes from a generator seeded by
  (seed, step, the sample's position in the global batch) (:func:`sample_generators`), so it does
  not depend on the process count, the micro-batch split, or on where a run was resumed.
* **Checkpoints** (:class:`lipsync.train.checkpointing.CheckpointDir`, atomic) hold the model,
  optimiser, EMA and loop state; after a SIGKILL the run resumes from the newest one at the next
  step, drops the metric lines written past it, and continues the same data order.
* SIGTERM / Ctrl-C finish the current step, write a checkpoint and stop (``stopped`` says why);
  ``max_minutes`` stops the same way when the wall-time budget would be exceeded.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from lipsync.train.checkpointing import CheckpointDir
from lipsync.train.config import UNetTrainConfig, VaeTrainConfig
from lipsync.train.distributed import DistContext
from lipsync.train.metrics import MetricsLog, plot_metrics
from lipsync.train.optim import lr_factor
from lipsync.train.progress import TrainProgress
from lipsync.train.signals import StopSignals

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def sample_seed(seed: int, *key: int) -> int:
    """A 63-bit seed from (seed, key…), stable across processes and Python versions."""
    digest = hashlib.sha256(repr((int(seed), *map(int, key))).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def sample_generators(
    seed: int, step: int, positions: torch.Tensor | list[int], device: torch.device
) -> list[torch.Generator]:
    """One generator per sample, seeded by (seed, step, position in the global batch)."""
    return [
        torch.Generator(device=device).manual_seed(sample_seed(seed, step, int(p)))
        for p in (positions.tolist() if isinstance(positions, torch.Tensor) else positions)
    ]


@dataclass
class MicroBatch:
    """One micro-batch: the data, and the positions of its samples in the step's global batch."""

    data: Any
    positions: torch.Tensor  # (b,) int64


class BatchSource(Protocol):
    """Per step, this process's micro-batches (``grad_accumulation`` of them)."""

    steps_per_epoch: int

    def epoch(self, epoch: int, start_batch: int) -> Iterator[list[MicroBatch]]: ...


LossFn = Callable[[Any, int, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class LoopSettings:
    max_steps: int
    max_minutes: float | None = None
    grad_accumulation: int = 1
    precision: str = "fp32"
    max_grad_norm: float = 1.0
    log_every: int = 10
    checkpoint_every: int = 1000
    keep: int = 3
    val_every: int = 0
    val_at_start: bool = False
    lr: float = 1e-4
    schedule: str = "constant"
    warmup_steps: int = 0
    warmup_from: int = 0  # step the warm-up starts at (a resume without optimizer state)
    seed: int = 0
    save_optimizer: bool = True
    ema_decay: float | None = None  # None: no EMA
    chart_panels: list[tuple[str, list[str]]] = field(default_factory=list)

    @classmethod
    def from_config(
        cls,
        cfg: UNetTrainConfig | VaeTrainConfig,
        chart_panels: list[tuple[str, list[str]]],
        ema_decay: float | None = None,
    ) -> LoopSettings:
        """The loop settings of a trainer config's train, optimizer, checkpoint and validation
        sections."""
        return cls(
            max_steps=cfg.train.max_steps,
            max_minutes=cfg.train.max_minutes,
            grad_accumulation=cfg.train.grad_accumulation,
            precision=cfg.train.precision,
            max_grad_norm=cfg.optimizer.max_grad_norm,
            log_every=cfg.train.log_every,
            checkpoint_every=cfg.checkpoint.every,
            keep=cfg.checkpoint.keep,
            val_every=cfg.validation.every,
            val_at_start=cfg.validation.at_start,
            lr=cfg.optimizer.lr,
            schedule=cfg.optimizer.schedule,
            warmup_steps=cfg.optimizer.warmup_steps,
            seed=cfg.train.seed,
            save_optimizer=cfg.checkpoint.save_optimizer,
            ema_decay=ema_decay,
            chart_panels=chart_panels,
        )


class Ema:
    """Exponential moving average of the trainable parameters (fp32 copies)."""

    def __init__(self, named: list[tuple[str, nn.Parameter]], decay: float):
        self.decay = decay
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.shadow = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params, strict=True):
            s.lerp_(p.detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: _full(s).cpu() for n, s in zip(self.names, self.shadow, strict=True)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for i, n in enumerate(self.names):
            src = state[n].to(self.shadow[i].device)
            if hasattr(self.shadow[i], "device_mesh"):  # a DTensor shard (FSDP)
                from torch.distributed.tensor import distribute_tensor

                src = distribute_tensor(src, self.shadow[i].device_mesh, self.shadow[i].placements)
            self.shadow[i].copy_(src)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class TrainLoop:
    """Runs the steps; see the module docstring. The caller owns model, optimiser and data."""

    def __init__(
        self,
        *,
        name: str,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        settings: LoopSettings,
        dist: DistContext,
        out_dir: str | Path,
        loss_fn: LossFn,
        batches: BatchSource,
        trainable: list[tuple[str, nn.Parameter]],
        validate: Callable[[int], dict[str, float]] | None = None,
        export: Callable[[int, dict[str, Any]], None] | None = None,
        extra_state: dict[str, Any] | None = None,
        show_progress: bool = True,
        samples_per_step: int = 1,
    ):
        self.name = name
        self.model = model
        self.optimizer = optimizer
        self.s = settings
        self.dist = dist
        self.out = Path(out_dir)
        self.loss_fn = loss_fn
        self.batches = batches
        self.trainable = trainable
        self.params = [p for _, p in trainable]
        self.validate = validate
        self.export = export
        self.extra_state = dict(extra_state or {})
        self.show_progress = show_progress and dist.is_main
        self.samples_per_step = samples_per_step
        self.ckpt = CheckpointDir(self.out / "checkpoints", keep=max(1, settings.keep or 10**9))
        self.metrics = MetricsLog(self.out / "metrics.jsonl", enabled=dist.is_main)
        self.ema = Ema(trainable, settings.ema_decay) if settings.ema_decay else None
        self.scaler = (
            torch.amp.GradScaler(dist.device.type) if settings.precision == "fp16" else None
        )
        self.step = 0
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]

    # ---------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state, optim_state = get_state_dict(self.model, self.optimizer, options=opts)
        state = {
            "name": self.name,
            "model": model_state,
            "loop": {"step": self.step, "seed": self.s.seed},
            **self.extra_state,
        }
        if self.s.save_optimizer:
            state["optimizer"] = optim_state
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        opts = StateDictOptions(full_state_dict=True, strict=True)
        optim_state = state.get("optimizer")
        if optim_state is not None:
            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict=optim_state, options=opts)  # fmt: skip
        else:
            from torch.distributed.checkpoint.state_dict import set_model_state_dict

            set_model_state_dict(self.model, state["model"], options=opts)
        if self.ema is not None and "ema" in state:
            self.ema.load_state_dict(state["ema"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["loop"]["step"])

    def resume(self, from_dir: str | Path | None = None) -> bool:
        """Load the newest checkpoint of this run (or of ``from_dir``); False if none."""
        source = CheckpointDir(Path(from_dir), keep=1) if from_dir else self.ckpt
        if from_dir and not source.steps():  # a run folder: its checkpoints/ subfolder
            source = CheckpointDir(Path(from_dir) / "checkpoints", keep=1)
        path = source.latest()
        if path is None:
            return False
        self.load_state_dict(source.load(path))
        self.metrics.truncate_after(self.step)
        return True

    def save(self) -> Path | None:
        state = self.state_dict()  # collective under FSDP: every rank takes part
        path = None
        if self.dist.is_main:
            path = self.ckpt.save(self.step, state)
            if self.export is not None:
                self.export(self.step, state)
        self.dist.barrier()
        return path

    # ---------------------------------------------------------------- one step

    def _autocast(self):
        dtype = AUTOCAST.get(self.s.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.dist.device.type, dtype=dtype)

    def _set_lr(self) -> float:
        offset = self.s.warmup_from
        factor = lr_factor(
            self.step - offset, self.s.warmup_steps, self.s.max_steps - offset, self.s.schedule
        )
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor
        return self.base_lrs[0] * factor

    def train_step(self, micro: list[MicroBatch]) -> dict[str, float]:
        self.model.train()
        lr = self._set_lr()
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, torch.Tensor] = {}
        n = len(micro)
        for i, mb in enumerate(micro):
            sync = i == n - 1 or not hasattr(self.model, "no_sync")
            ctx = contextlib.nullcontext() if sync else self.model.no_sync()
            with ctx:
                with self._autocast():
                    loss, parts = self.loss_fn(mb.data, self.step, mb.positions)
                scaled = loss / n
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            for key, value in {"loss": loss.detach(), **parts}.items():
                sums[key] = sums.get(key, 0.0) + value.float() / n
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.s.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.ema is not None:
            self.ema.update()
        self.step += 1
        # the numbers of this step, averaged over all processes
        keys = sorted(sums)
        packed = torch.stack([sums[k].reshape(()).to(self.dist.device) for k in keys])
        self.dist.all_reduce_sum(packed)
        packed /= self.dist.world_size
        out = {k: float(v) for k, v in zip(keys, packed.tolist(), strict=True)}
        out["grad_norm"] = float(_full(grad_norm))
        out["lr"] = lr
        return out

    # ---------------------------------------------------------------- the run

    def run(self) -> dict[str, Any]:
        start = time.perf_counter()
        first_step = self.step
        stopped = "max_steps"
        step_times: list[float] = []
        budget = None if self.s.max_minutes is None else 60.0 * self.s.max_minutes
        last_saved = self.step
        if self.s.val_at_start and self.step == 0:
            self._validate()
        with (
            StopSignals() as signals,
            TrainProgress(self.s.max_steps, self.step, self.show_progress, self.name) as bar,
        ):
            while self.step < self.s.max_steps and stopped == "max_steps":
                epoch, batch = divmod(self.step, self.batches.steps_per_epoch)
                for micro in self.batches.epoch(epoch, batch):
                    t0 = time.perf_counter()
                    numbers = self.train_step(micro)
                    step_times.append(time.perf_counter() - t0)
                    if self.dist.is_main and (
                        self.step % self.s.log_every == 0 or self.step == first_step + 1
                    ):
                        recent = step_times[-self.s.log_every :]
                        rate = self.samples_per_step * len(recent) / max(sum(recent), 1e-9)
                        record = {"step": self.step, "epoch": epoch, "split": "train", **numbers,
                                  "samples_per_s": rate,
                                  "time_s": round(time.perf_counter() - start, 3),
                                  "unix_s": round(time.time(), 3)}  # fmt: skip
                        self.metrics.write(record)
                        bar.update(self.step, loss=numbers["loss"], lr=numbers["lr"])
                    elif self.dist.is_main:
                        bar.update(self.step, loss=numbers["loss"])
                    if not math.isfinite(numbers["loss"]):
                        stopped = "non-finite loss"
                        break
                    if self.s.val_every and self.step % self.s.val_every == 0:
                        self._validate()
                    if self.step % self.s.checkpoint_every == 0:
                        self.save()
                        last_saved = self.step
                    if self.step >= self.s.max_steps:
                        break
                    if self.dist.any(signals.received is not None):
                        stopped = f"signal {signal.Signals(signals.received or 15).name}"
                        break
                    if budget is not None:
                        elapsed = time.perf_counter() - start
                        mean = sum(step_times[-20:]) / len(step_times[-20:])
                        if self.dist.any(elapsed + 2 * mean >= budget):
                            stopped = "max_minutes"
                            break
            if self.s.val_every and self.step > first_step and self.step % self.s.val_every:
                self._validate()  # the final numbers, unless this step was just validated
            if self.step != last_saved or self.step == first_step:
                self.save()
        if self.dist.is_main and self.s.chart_panels:
            plot_metrics(self.metrics.records(), self.out / "loss.png", self.s.chart_panels,
                         title=self.name)  # fmt: skip
        return {
            "peak_memory_gib": self.dist.peak_memory_gib(),
            "name": self.name,
            "steps": self.step,
            "steps_this_run": self.step - first_step,
            "stopped": stopped,
            "signal": signals.received,
            "seconds": round(time.perf_counter() - start, 3),
            "mean_step_s": (sum(step_times) / len(step_times)) if step_times else None,
        }

    def _validate(self) -> None:
        if self.validate is None:
            return
        numbers = self.validate(self.step)
        if self.dist.is_main and numbers:
            self.metrics.write({"step": self.step, "split": "val", **numbers})
            if self.s.chart_panels:
                plot_metrics(self.metrics.records(), self.out / "loss.png", self.s.chart_panels,
                             title=self.name)  # fmt: skip
        self.dist.barrier()


class LoaderBatches:
    """:class:`BatchSource` over a map-style dataset through a DataLoader (workers, pinning).

    Global batch = ``micro · accumulation · world_size`` samples; this rank's slice is cut into
    ``accumulation`` micro-batches of ``micro``.
    """

    def __init__(
        self,
        dataset,
        micro: int,
        accumulation: int,
        dist: DistContext,
        seed: int,
        num_workers: int = 0,
        collate=None,
    ):
        from lipsync.train.batches import GlobalBatches

        self.dataset = dataset
        self.micro, self.accumulation = micro, accumulation
        self.dist = dist
        self.num_workers = num_workers
        self.collate = collate
        self.global_batches = GlobalBatches(
            len(dataset), micro * accumulation * dist.world_size, seed, dist.rank, dist.world_size
        )
        self.steps_per_epoch = self.global_batches.steps_per_epoch
        self.local = micro * accumulation

    def epoch(self, epoch: int, start_batch: int) -> Iterator[list[MicroBatch]]:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        sampler = _MicroSampler(self.global_batches, epoch, start_batch, self.micro)
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.dist.device.type == "cuda",
            collate_fn=self.collate,
            persistent_workers=False,
        )
        base = self.dist.rank * self.local
        positions = [
            torch.arange(base + m * self.micro, base + (m + 1) * self.micro)
            for m in range(self.accumulation)
        ]
        group: list[MicroBatch] = []
        for data in loader:
            group.append(MicroBatch(data, positions[len(group)]))
            if len(group) == self.accumulation:
                yield group
                group = []


class _MicroSampler(torch.utils.data.Sampler):
    def __init__(self, global_batches, epoch: int, start_batch: int, micro: int):
        self.global_batches, self.epoch, self.start, self.micro = (
            global_batches, epoch, start_batch, micro)  # fmt: skip

    def __iter__(self):
        for local in self.global_batches.epoch_batches(self.epoch, self.start):
            for i in range(0, len(local), self.micro):
                yield local[i : i + self.micro]

    def __len__(self) -> int:
        per = self.global_batches.local_batch // self.micro
        return (self.global_batches.steps_per_epoch - self.start) * per
