"""The mouth box of an aligned face crop, and the weight maps of the mouth-aware losses.

Faces are aligned the same way everywhere (LatentSync's three-point alignment), so the mouth sits
in a fixed box of the crop: rows 50–84 %, columns 20–80 % of the side (at 256 px rows 128–215,
columns 51–205). It holds the lips, teeth and chin of the synthetic corpus' faces under its
augmentations (zoom 0.88–1.12, shift ±5 %, rotation ±6°). The phone head, the lip reader and the
tiny video encoder all look at this box, resized to ``MOUTH_SIZE``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lipsync.face.mask import make_mask

MOUTH_BOX = (0.50, 0.84, 0.20, 0.80)  # top, bottom, left, right (fractions of the side)
MOUTH_SIZE = (48, 80)  # (h, w) the box is resized to


def mouth_box(resolution: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) pixel bounds (end-exclusive) of the mouth box."""
    t, b, left, right = MOUTH_BOX
    return (
        round(t * resolution),
        round(b * resolution),
        round(left * resolution),
        round(right * resolution),
    )


def mouth_crops(frames: torch.Tensor, size: tuple[int, int] = MOUTH_SIZE) -> torch.Tensor:
    """(..., 3, R, R) faces -> (..., 3, h, w) mouth boxes (bilinear, antialiased), same dtype."""
    r = frames.shape[-1]
    t, b, left, right = mouth_box(r)
    box = frames[..., t:b, left:right]
    lead = box.shape[:-3]
    flat = box.reshape(-1, *box.shape[-3:]).float()
    out = F.interpolate(flat, size=size, mode="bilinear", antialias=True, align_corners=False)
    return out.reshape(*lead, 3, *size).to(frames.dtype)


def generated_region(resolution: int, device=None) -> torch.Tensor:
    """(R, R) float: 1 where the U-Net regenerates the face (the inference mask's 0), else 0."""
    keep = torch.from_numpy(make_mask(resolution)).float()
    return (1.0 - keep).to(device)


LIPS_CENTRE = (0.64, 0.50)  # (row, column) of the lips' centre, fractions of the side
LIPS_SIGMA = (0.07, 0.14)  # (row, column) standard deviations of the lips' weight bump


def lip_weight_map(resolution: int, mouth_weight: float, device=None) -> torch.Tensor:
    """(R, R) weights ``1 + (mouth_weight − 1) · g``, g a Gaussian bump (peak 1) on the lips:
    ``mouth_weight`` at the lips' centre, falling to 1 over the cheeks and chin; 1 everywhere
    for ``mouth_weight`` 1. Smooth, so a few pixels of misalignment change little."""
    pos = (torch.arange(resolution, dtype=torch.float32, device=device) + 0.5) / resolution
    gy = torch.exp(-0.5 * ((pos - LIPS_CENTRE[0]) / LIPS_SIGMA[0]) ** 2)
    gx = torch.exp(-0.5 * ((pos - LIPS_CENTRE[1]) / LIPS_SIGMA[1]) ** 2)
    return 1.0 + (mouth_weight - 1.0) * gy[:, None] * gx[None, :]
