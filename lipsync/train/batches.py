"""Deterministic, resumable batch order, split across processes.

Epoch ``e`` visits the dataset in the order ``randperm(len, seed + e)``; global batch ``k`` of the
epoch is positions ``k·B … (k+1)·B - 1`` of that order (the last partial batch is dropped). With
``W`` processes, rank ``r`` takes the ``r``-th of ``W`` equal slices of each global batch, so the
averaged gradient of ``W`` processes equals one process's gradient over the whole batch, and a
run can resume at any step without replaying data: step ``s`` is epoch ``s // steps_per_epoch``,
batch ``s % steps_per_epoch``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from lipsync.errors import ConfigError


class GlobalBatches:
    def __init__(
        self,
        dataset_len: int,
        global_batch: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ):
        if global_batch % world_size:
            raise ConfigError(
                f"batch size {global_batch} is not divisible by the {world_size} processes"
            )
        if dataset_len < global_batch:
            raise ConfigError(
                f"the dataset has {dataset_len} items, fewer than one batch of {global_batch}"
            )
        self.dataset_len, self.global_batch = dataset_len, global_batch
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        self.local_batch = global_batch // world_size
        self.steps_per_epoch = dataset_len // global_batch

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, batch within the epoch) of global step ``step`` (0-based)."""
        return divmod(step, self.steps_per_epoch)

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.dataset_len)
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.dataset_len, generator=g)

    def epoch_batches(self, epoch: int, start_batch: int = 0) -> Iterator[list[int]]:
        """This rank's index lists for batches ``start_batch…`` of ``epoch``."""
        order = self.order(epoch)
        lo = self.rank * self.local_batch
        for k in range(start_batch, self.steps_per_epoch):
            batch = order[k * self.global_batch : (k + 1) * self.global_batch]
            yield batch[lo : lo + self.local_batch].tolist()


class EpochBatchSampler(torch.utils.data.Sampler):
    """A DataLoader ``batch_sampler`` over one epoch of :class:`GlobalBatches` from a batch on."""

    def __init__(self, batches: GlobalBatches, epoch: int, start_batch: int = 0):
        self.batches, self.epoch, self.start_batch = batches, epoch, start_batch

    def __iter__(self) -> Iterator[list[int]]:
        return self.batches.epoch_batches(self.epoch, self.start_batch)

    def __len__(self) -> int:
        return self.batches.steps_per_epoch - self.start_batch
