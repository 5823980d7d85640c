"""Frame metrics of the quality protocol on aligned face crops (docs/QUALITY.md).

* :func:`mouth_flicker`: the mean absolute *second* temporal difference, |x_{t+1} − 2 x_t +
  x_{t−1}|, over the pixels of the regenerated region, in 8-bit levels. Smooth motion (the lips
  opening at a steady pace) has a small second difference; a frame that jumps away and back (a
  flicker, a chunk seam) a large one. It needs no reference, so it scores dubbed outputs too;
  the ground truth's value on the same frames is the natural level of real speech.
* :func:`region_psnr`: PSNR over a pixel region, for the outside-mask check (the decoded output
  *before* paste-back against the input: after paste-back it is infinite by construction) and the
  mouth region of reconstructions.
"""

from __future__ import annotations

import torch

from lipsync.eval.image import psnr


def mouth_flicker(frames: torch.Tensor, region: torch.Tensor) -> float:
    """frames (T, 3, R, R) in [-1, 1], T >= 3; region (R, R) bool -> 8-bit levels."""
    if frames.shape[0] < 3:
        raise ValueError(f"flicker needs at least 3 frames, got {frames.shape[0]}")
    x = frames.double() * 127.5
    second = (x[2:] - 2 * x[1:-1] + x[:-2]).abs()  # (T-2, 3, R, R)
    return float(second[..., region.to(second.device).bool()].mean())


def region_psnr(a: torch.Tensor, b: torch.Tensor, region: torch.Tensor) -> float:
    """a, b (..., 3, R, R) in [-1, 1]; region (R, R) bool -> PSNR in dB (8-bit peak)."""
    return psnr((a.float() + 1) / 2, (b.float() + 1) / 2, region.bool().cpu(), data_range=1.0)
