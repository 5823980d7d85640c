"""Mouth-weighted TREPA: temporal representation alignment that counts the lips most.

LatentSync's TREPA is the MSE between the L2-normalised, mean-pooled VideoMAE features of the
generated and the target clip: one vector per clip, so a flickering lip corner moves it little
and every part of the face counts alike. Here the comparison is per cell of the encoder's
feature grid (any :class:`lipsync.train.video_encoder.VideoEncoder`), weighted by a map that is
``mouth_weight`` on the lips and 1 elsewhere (:func:`lipsync.train.mouth.lip_weight_map`):

    f, g = L2-normalised feature grids (C, T', H', W') of generated and target clip
    L = Σ w · ‖f − g‖² / Σ w  +  delta · Σ w · ‖(f_{t+1} − f_t) − (g_{t+1} − g_t)‖² / Σ w

The second term asks the generated clip's features to *change* between time steps as the
target's do: flicker (frame-to-frame changes the target does not have) is what it penalises.
``mouth_weight`` 1 and ``delta`` 0 is plain, uniform, per-cell TREPA. The target's features
need no gradient; the generated clip's flow back into the U-Net through the frozen encoder.
"""

from __future__ import annotations

import torch
from torch import nn

from lipsync.train.mouth import lip_weight_map


class MouthWeightedTrepa(nn.Module):
    """The loss above for one encoder and face resolution."""

    def __init__(
        self, encoder: nn.Module, resolution: int, mouth_weight: float = 4.0, delta: float = 1.0
    ):
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        self.mouth_weight, self.delta = float(mouth_weight), float(delta)
        grid = encoder.weight_grid(lip_weight_map(resolution, mouth_weight))  # (H', W')
        self.register_buffer("cell_weights", grid.float(), persistent=False)

    def forward(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        # fake, real: (b, f, 3, R, R) faces in [-1, 1] -> scalar
        f = nn.functional.normalize(self.encoder.features(fake).float(), dim=1)
        with torch.no_grad():
            g = nn.functional.normalize(self.encoder.features(real).float(), dim=1)
        w = self.cell_weights.to(f.device)  # (H', W')
        d = (f - g).pow(2).sum(dim=1)  # (b, T', H', W')
        loss = (d * w).sum() / (w.sum() * d.shape[0] * d.shape[1])
        if self.delta and f.shape[2] > 1:
            dd = ((f[:, :, 1:] - f[:, :, :-1]) - (g[:, :, 1:] - g[:, :, :-1])).pow(2).sum(dim=1)
            loss = loss + self.delta * (dd * w).sum() / (w.sum() * dd.shape[0] * dd.shape[1])
        return loss
