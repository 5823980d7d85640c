"""Dynamic conditioning weighting: per-frame (optionally per-position) weights that balance the
audio cross-attention against the identity path inside each spatial transformer block.

LatentSync has no identity cross-attention: the identity comes in through the reference latents
concatenated to the U-Net's input and spreads through the spatial self-attention. A transformer
block adds two residual branches to its stream ``x``: the self-attention (``attn1``: what the
frame and its reference look like) and the audio cross-attention (``attn2``: what the mouth
should do). The reference adds both with weight 1 everywhere. A :class:`ConditioningGate` makes
the two weights functions of the frame:

    x ← x + w_identity · attn1(norm1(x))
    x ← x + w_audio    · attn2(norm2(x), audio)

    (w_audio, w_identity) = 1 + max_delta · tanh(MLP([LN(mean_hw x), mean_50 a, std_50 a])
                                                 [+ Linear(LN(x_position))])

The audio summary (mean and standard deviation of the frame's 50 Whisper tokens: 10 time
positions × 5 layers) tells the gate how much the sound changes around the frame, so it can
raise the audio weight in highly articulated segments; the pooled stream tells it what the
frame already shows. ``per_region`` adds a per-position term (a linear read of each position's
features), so the weights can differ between the mouth and the rest of the face.

The last layers start at zero, so a new gate outputs exactly 1 and the block computes exactly
what it computed without it (bit for bit: ``x + 1.0 · h == x + h``). A U-Net without
``dynamic_conditioning.enabled`` builds no gate at all: the same modules, keys and arithmetic
as before this option existed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lipsync.errors import ConfigError


@dataclass(frozen=True)
class DynamicConditioningConfig:
    """``dynamic_conditioning`` of a U-Net config (absent = disabled)."""

    enabled: bool = False
    per_region: bool = False  # also a per-position term (weights vary over the face)
    hidden: int = 64  # width of the gate's MLP
    max_delta: float = 1.0  # weights stay in (1 - max_delta, 1 + max_delta)

    @classmethod
    def from_dict(cls, value: dict[str, Any] | None) -> DynamicConditioningConfig:
        if value is None:
            return cls()
        if not isinstance(value, dict):
            raise ConfigError(f"dynamic_conditioning must be a mapping, got {value!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise ConfigError(f"unknown dynamic_conditioning keys: {', '.join(unknown)}")
        config = cls(**value)
        if config.hidden < 1:
            raise ConfigError(f"dynamic_conditioning.hidden must be >= 1, got {config.hidden}")
        if not 0.0 < config.max_delta <= 1.0:
            raise ConfigError(
                f"dynamic_conditioning.max_delta must be in (0, 1], got {config.max_delta}"
            )
        return config


class ConditioningGate(nn.Module):
    """Audio and identity weights for one spatial transformer block (module docstring)."""

    def __init__(self, dim: int, context_dim: int, config: DynamicConditioningConfig):
        super().__init__()
        self.context_dim = context_dim
        self.max_delta = config.max_delta
        self.norm = nn.LayerNorm(dim)
        self.frame = nn.Sequential(
            nn.Linear(dim + 2 * context_dim, config.hidden), nn.SiLU(), nn.Linear(config.hidden, 2)
        )
        self.region = nn.Linear(dim, 2) if config.per_region else None
        self.reset_to_identity()

    def reset_to_identity(self) -> None:
        """Zero the output layers: both weights exactly 1."""
        with torch.no_grad():
            last = [self.frame[2]] + ([self.region] if self.region is not None else [])
            for layer in last:
                layer.weight.zero_()
                layer.bias.zero_()

    def forward(
        self, x: torch.Tensor, tokens: torch.Tensor | None, null_rows: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # x: (n, hw, dim) the block's input stream; tokens: (n - null_rows, 50, context_dim)
        # audio tokens of the rows that have audio (the first null_rows rows have none)
        # -> (w_audio, w_identity), each (n, 1, 1), or (n, hw, 1) with per_region
        n = x.shape[0]
        normed = self.norm(x)
        audio = x.new_zeros(n, 2 * self.context_dim)
        if tokens is not None and tokens.shape[0]:
            t = tokens.to(x.dtype)
            audio[null_rows:] = torch.cat([t.mean(dim=1), t.std(dim=1)], dim=-1)
        delta = self.frame(torch.cat([normed.mean(dim=1), audio], dim=-1))[:, None, :]  # (n,1,2)
        if self.region is not None:
            delta = delta + self.region(normed)  # (n, hw, 2)
        weights = 1.0 + self.max_delta * torch.tanh(delta)
        return weights[..., :1], weights[..., 1:]
