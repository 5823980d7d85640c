"""One process or several under ``torchrun``: rank, device, process group, reductions.

``torchrun --nproc_per_node N -m lipsync.cli train …`` sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; :meth:`DistContext.from_env` then joins the process group (NCCL on CUDA, gloo on
the CPU) and picks ``cuda:LOCAL_RANK``. Without those variables it is a single process and every
collective is a no-op, so training code calls the same methods either way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from lipsync.errors import ConfigError


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @classmethod
    def from_env(cls, device: str | None = None, timeout_s: float = 1800) -> DistContext:
        """Join the ``torchrun`` process group if there is one; ``device`` 'cpu'/'cuda'/None
        (None: CUDA when available)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if kind.startswith("cuda"):
            if not torch.cuda.is_available():
                raise ConfigError("--device cuda requested but CUDA is not available")
            dev = torch.device("cuda", local if world > 1 else torch.device(kind).index or 0)
            torch.cuda.set_device(dev)
        elif kind == "cpu":
            dev = torch.device("cpu")
        else:
            raise ConfigError(f"unknown device {device!r} (cpu or cuda)")
        if world > 1 and not dist.is_initialized():
            backend = "nccl" if dev.type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        return cls(rank, world, local, dev)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over processes, in place (and returned)."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def gather_float(self, value: float) -> list[float]:
        """``value`` of every process, in rank order (collective: every rank must call it)."""
        t = torch.zeros(self.world_size, dtype=torch.float64, device=self.device)
        t[self.rank] = value
        return self.all_reduce_sum(t).tolist()

    def peak_memory_gib(self) -> list[float] | None:
        """Each process's peak CUDA memory allocated by PyTorch (GiB, rank order); None on the
        CPU. Collective."""
        if self.device.type != "cuda":
            return None
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30
        return [round(v, 3) for v in self.gather_float(peak)]

    def any(self, flag: bool) -> bool:
        """True on every process if ``flag`` is true on any (keeps ranks in lockstep)."""
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return bool(self.all_reduce_max(t).item() > 0)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """``DistributedDataParallel`` around ``model`` when distributed, else ``model``."""
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
