"""Optimiser and learning-rate schedule shared by the trainers."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch

Schedule = Literal["constant", "cosine"]


def lr_factor(step: int, warmup_steps: int, max_steps: int, schedule: Schedule) -> float:
    """Multiplier of the base rate at ``step``: linear warm-up from 1/warmup, then constant or a
    cosine decay to 0 at ``max_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def adamw(
    model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]
) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases and norm weights (1-D parameters)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]
    fused = all(p.is_cuda for p in model.parameters())
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


def optimise(
    loss_of: Callable[[int], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    steps: int,
    deadline: Callable[[], bool] | None = None,
) -> list[float]:
    """Plain optimiser steps on ``loss_of(step)`` (a scalar) for the small judge models: after
    ``steps`` steps, or the first step after which ``deadline()`` is true. Returns the loss of
    every step taken."""
    losses = []
    for step in range(steps):
        loss = loss_of(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if deadline is not None and deadline():
            break
    return losses
