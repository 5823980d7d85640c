"""SyncNet pair accuracy: loss and accuracy on in-sync / off-sync pairs (the reference's rule).

A pair is predicted "in sync" when the cosine similarity of its embeddings is above 0.5; the
accuracy is the share of pairs predicted right, over up to 2048 pairs (a fixed, seeded choice of
the split's pairs, the same in every evaluation). With several processes each takes every
``world``-th pair and the sums are reduced, so the numbers do not depend on the process count.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from lipsync.models.syncnet import StableSyncNet, cosine_loss, cosine_similarity

THRESHOLD = 0.5
DEFAULT_PAIRS = 2048


@dataclass(frozen=True)
class PairMetrics:
    loss: float  # mean BCE of the cosine
    accuracy: float  # share of pairs with (cosine > 0.5) == label
    pairs: int
    positives: int
    cos_in_sync: float  # mean cosine of the in-sync pairs
    cos_off_sync: float  # mean cosine of the off-sync pairs

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def fit_image(image: torch.Tensor, model: StableSyncNet) -> torch.Tensor:
    """(b, 3F, h, w) images as the model eats them: 8-bit ones (packs) mapped to [-1, 1] in
    float32, then resized to the model's (R/2, R) if the data has another resolution."""
    if image.dtype == torch.uint8:
        image = image.float() / 127.5 - 1.0
    size = model.config.image_size
    if tuple(image.shape[-2:]) == size:
        return image
    return F.interpolate(image, size=size, mode="bilinear", antialias=True, align_corners=False)


def pair_indices(n: int, max_pairs: int, seed: int = 0) -> list[int]:
    """The evaluated items: the first ``max_pairs`` of a seeded permutation of ``range(n)``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:max_pairs].tolist()


def evaluate_pairs(
    model: StableSyncNet,
    dataset: torch.utils.data.Dataset,
    *,
    max_pairs: int = DEFAULT_PAIRS,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    num_workers: int = 0,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> PairMetrics:
    """Loss and accuracy of ``model`` on up to ``max_pairs`` pairs of ``dataset``."""
    device = torch.device(device)
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(0)
    chosen = pair_indices(len(dataset), max_pairs, seed)[rank::world_size]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, chosen),
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    # sums: loss, correct, count, positives, cos of positives, cos of negatives
    sums = torch.zeros(6, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in loader:
            image = fit_image(batch["image"].to(device, non_blocking=True), model)
            audio = batch["audio"].to(device, non_blocking=True)
            y = batch["y"].to(device).reshape(-1).float()
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                enabled=autocast_dtype is not None):  # fmt: skip
                vision, sound = model(image, audio)
            cos = cosine_similarity(vision, sound)
            loss = cosine_loss(vision, sound, y)
            pred = (cos > THRESHOLD).float()
            sums += torch.stack([
                loss.sum(), (pred == y).float().sum(), torch.tensor(float(len(y)), device=device),
                y.sum(), (cos * y).sum(), (cos * (1 - y)).sum(),
            ]).double()  # fmt: skip
            if on_batch is not None:
                on_batch(len(y))
    model.train(was_training)
    if reduce_sum is not None:
        sums = reduce_sum(sums)
    loss, correct, count, pos, cos_pos, cos_neg = sums.tolist()
    count_i, pos_i = int(round(count)), int(round(pos))
    if count_i == 0:
        raise ValueError("no pairs to evaluate")
    return PairMetrics(
        loss=loss / count,
        accuracy=correct / count,
        pairs=count_i,
        positives=pos_i,
        cos_in_sync=cos_pos / pos if pos else float("nan"),
        cos_off_sync=cos_neg / (count - pos) if count > pos else float("nan"),
    )
