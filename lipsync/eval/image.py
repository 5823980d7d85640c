"""PSNR and SSIM in torch, optionally restricted to a region (e.g. the mask's generated mouth).

Images are (..., C, H, W) float tensors with values in ``[0, data_range]`` (any leading dims:
frames, chunks). Both metrics are computed in float64.

- PSNR: ``10 · log10(data_range² / MSE)`` over the region's pixels (all channels and leading
  dims); ``inf`` for identical inputs.
- SSIM (Wang et al. 2004, as ``skimage.metrics.structural_similarity`` with
  ``gaussian_weights=True, sigma=1.5, use_sample_covariance=False``): an 11×11 Gaussian window
  (σ = 1.5), ``C1 = (0.01 L)²``, ``C2 = (0.03 L)²``, per channel; the map covers the positions
  where the whole window fits inside the image ("valid"), and the score is its mean over the
  positions whose window centre lies in the region.
"""

from __future__ import annotations

import math

import torch

WINDOW = 11
SIGMA = 1.5
K1, K2 = 0.01, 0.03


def _region(region: torch.Tensor | None, shape: torch.Size) -> torch.Tensor:
    """region (H, W) bool or None -> (H, W) bool on the images' device."""
    if region is None:
        return torch.ones(shape[-2:], dtype=torch.bool)
    region = torch.as_tensor(region).bool()
    if region.shape != shape[-2:]:
        raise ValueError(f"region {tuple(region.shape)} does not match images {tuple(shape)}")
    if not region.any():
        raise ValueError("the region is empty")
    return region


def psnr(
    a: torch.Tensor, b: torch.Tensor, region: torch.Tensor | None = None, data_range: float = 1.0
) -> float:
    """Peak signal-to-noise ratio in dB of a vs b (same shape) over ``region`` (H, W)."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    keep = _region(region, a.shape).to(a.device)
    d = (a.double() - b.double())[..., keep]
    mse = float((d * d).mean())
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def gaussian_taps(size: int = WINDOW, sigma: float = SIGMA) -> torch.Tensor:
    """(size,) float64 1-D Gaussian weights summing to 1."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x * x) / (2 * sigma * sigma))
    return g / g.sum()


def gaussian_window(size: int = WINDOW, sigma: float = SIGMA) -> torch.Tensor:
    """(size, size) float64 Gaussian weights summing to 1: the outer product of the taps."""
    g = gaussian_taps(size, sigma)
    return g[:, None] * g[None, :]


def _blur_valid(t: torch.Tensor) -> torch.Tensor:
    """(..., H, W) float64 -> (..., H - 10, W - 10): the 11x11 Gaussian window at every valid
    position. The window is separable, so this is 11 shifted adds along W, then 11 along H: the
    same sums as a 2-D convolution with :func:`gaussian_window` (to rounding), at 22 instead of
    121 multiply-adds per pixel and without float64 convolution kernels (slow on CPUs)."""
    taps = gaussian_taps().tolist()
    w = t.shape[-1] - WINDOW + 1
    rows = t[..., :w] * taps[0]
    for k in range(1, WINDOW):
        rows.add_(t[..., k : k + w], alpha=taps[k])
    h = t.shape[-2] - WINDOW + 1
    out = rows[..., :h, :] * taps[0]
    for k in range(1, WINDOW):
        out.add_(rows[..., k : k + h, :], alpha=taps[k])
    return out


def ssim_map(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """a, b (..., C, H, W) -> SSIM per valid window position (..., C, H - 10, W - 10)."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    *lead, c, h, w = a.shape
    if h < WINDOW or w < WINDOW:
        raise ValueError(f"images must be at least {WINDOW}x{WINDOW}, got {h}x{w}")
    x = a.double().reshape(-1, h, w)
    y = b.double().reshape(-1, h, w)
    mx, my, xx, yy, xy = _blur_valid(torch.stack([x, y, x * x, y * y, x * y])).unbind(0)
    vx = xx - mx * mx
    vy = yy - my * my
    cov = xy - mx * my
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.reshape(*lead, c, h - WINDOW + 1, w - WINDOW + 1)


def ssim(
    a: torch.Tensor, b: torch.Tensor, region: torch.Tensor | None = None, data_range: float = 1.0
) -> float:
    """Mean SSIM of a vs b over the window centres inside ``region`` (H, W)."""
    keep = _region(region, a.shape).to(a.device)
    r = WINDOW // 2
    inner = keep[r : keep.shape[0] - r, r : keep.shape[1] - r]
    if not inner.any():
        raise ValueError("no SSIM window centre lies inside the region")
    return float(ssim_map(a, b, data_range)[..., inner].mean())
