"""Step 7: visual quality of a segment's face crops, and the keep/drop decision.

Two scorers share :class:`QualityScorer` (0-100, higher is better, segment kept at or above the
threshold):

:class:`HyperIQAScorer` (``--hyperiqa koniq_pretrained.pkl``)
    hyperIQA (:mod:`lipsync.data.process.hyperiqa`) on the sampled crops, each resized to
    224 x 224 (bilinear, antialiased) and ImageNet-normalised; the segment's score is the mean.
    Default threshold 40.

:class:`HeuristicScorer` (no weights needed; the default)
    The worst of four sub-scores, each mapped to 0-100 (so the reason names what is wrong):

    * ``sharpness``: variance of the Laplacian of the grey crop's face area (rows R/4..R,
      columns R/8..7R/8) over the variance of the grey levels there, x 1000 (so exposure and
      contrast do not count), averaged over the sampled frames; 100 at >= 12, 0 at <= 3, linear
      in the logarithm between (50 at 6). Measured on 256 px crops of the demo clip (a 197 px
      face): 17-19; the same crops blurred (Gaussian sigma 0.7 / 1.0): 6.7 / 4.1; downscaled 2x
      and back: 4.7. At 512 px the crops are area-downscaled to 256 first.
    * ``exposure``: mean grey level of the same area (100 inside 60..200, falling linearly to 0
      at 15 and 240) times the share of unclipped pixels (levels 6..249; 0 when a quarter or
      more are clipped).
    * ``face_size``: the tracked face's median short side in source pixels over ``0.6 R``
      (capped at 100): below that the crop is an upscale and carries no detail the model could
      learn from.
    * ``blockiness``: compression blocking of the *source* face region (grey, on the 8-pixel
      grid of the 25 fps video): mean absolute step across block edges over the mean step
      inside blocks; 100 at <= 1.15, 0 at >= 1.6.

    Default threshold 50.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from lipsync.data.process.hyperiqa import IMAGENET_MEAN, IMAGENET_STD, INPUT_SIZE, load_hyperiqa

__all__ = [
    "HeuristicScorer",
    "HyperIQAScorer",
    "QualityInput",
    "QualityScorer",
    "blockiness",
    "sharpness",
]


@dataclass
class QualityInput:
    crops: np.ndarray  # (k, R, R, 3) uint8 sampled face crops
    face_size: float | None  # median face box short side, source pixels
    patches: list[np.ndarray]  # grey (h, w) uint8 source face regions, sampled


class QualityScorer(Protocol):
    name: str
    default_threshold: float

    def score(self, data: QualityInput) -> tuple[float, dict]:
        """(score 0-100, details) for one segment."""
        ...


def _ramp(x: float, lo: float, hi: float) -> float:
    """0 at ``lo``, 100 at ``hi`` (either order), linear, clamped."""
    if hi == lo:
        return 100.0 if x >= hi else 0.0
    return float(np.clip((x - lo) / (hi - lo), 0.0, 1.0) * 100.0)


def _face_area(grey: np.ndarray) -> np.ndarray:
    r = grey.shape[-1]
    return grey[..., r // 4 :, r // 8 : r - r // 8]


def _grey(crops: np.ndarray) -> np.ndarray:
    return crops.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def sharpness(crops: np.ndarray) -> float:
    """Relative Laplacian variance (x 1000) of the face area of (k, R, R, 3) crops, at 256 px
    scale (larger crops are area-downscaled first); see the module docstring."""
    g = torch.from_numpy(_grey(crops))[:, None]  # (k, 1, R, R)
    if g.shape[-1] > 256:
        g = F.interpolate(g, size=(256, 256), mode="area")
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
    lap = _face_area(F.conv2d(g, kernel[None, None])[:, 0])  # (k, h, w)
    grey = _face_area(g[:, 0, 1:-1, 1:-1])
    k = lap.shape[0]
    ratio = lap.reshape(k, -1).var(dim=1) / grey.reshape(k, -1).var(dim=1).clamp(min=1.0)
    return float(ratio.mean()) * 1000.0


def blockiness(grey: np.ndarray, block: int = 8) -> float | None:
    """Mean |step| across ``block``-pixel grid lines over the mean |step| elsewhere (1 = no
    blocking); None for a region too small to measure."""
    g = grey.astype(np.float32)
    if min(g.shape) < 4 * block:
        return None
    dx = np.abs(np.diff(g, axis=1))  # dx[:, j] is the step between columns j and j + 1
    dy = np.abs(np.diff(g, axis=0))
    edge_x = (np.arange(dx.shape[1]) % block) == block - 1
    edge_y = (np.arange(dy.shape[0]) % block) == block - 1
    n_edges = edge_x.sum() * dx.shape[0] + edge_y.sum() * dy.shape[1]
    n_inside = (~edge_x).sum() * dx.shape[0] + (~edge_y).sum() * dy.shape[1]
    at_edges = (dx[:, edge_x].sum() + dy[edge_y].sum()) / n_edges
    inside = (dx[:, ~edge_x].sum() + dy[~edge_y].sum()) / n_inside
    return float(at_edges / max(inside, 1e-3))


class HeuristicScorer:
    """Weight-free quality score (see the module docstring)."""

    name = "heuristic"
    default_threshold = 50.0

    def __init__(self, resolution: int):
        self.resolution = resolution

    def score(self, data: QualityInput) -> tuple[float, dict]:
        crops = data.crops
        sharp = sharpness(crops)
        area = _face_area(_grey(crops))
        mean = float(area.mean())
        clipped = float(((area < 6) | (area > 249)).mean())
        if mean < 60:
            level = _ramp(mean, 15, 60)
        elif mean > 200:
            level = _ramp(mean, 240, 200)
        else:
            level = 100.0
        exposure = level * max(0.0, 1.0 - 4.0 * clipped)
        size = 100.0
        if data.face_size is not None:
            size = min(100.0, 100.0 * data.face_size / (0.6 * self.resolution))
        blocks = [b for b in (blockiness(p) for p in data.patches) if b is not None]
        block = float(np.mean(blocks)) if blocks else None
        parts = {
            "sharpness": _ramp(math.log(max(sharp, 1e-6)), math.log(3.0), math.log(12.0)),
            "exposure": exposure,
            "face_size": size,
            "blockiness": 100.0 if block is None else _ramp(block, 1.6, 1.15),
        }
        worst = min(parts, key=lambda k: parts[k])
        details = {
            "scorer": self.name,
            "limiting": worst,
            "parts": {k: round(v, 1) for k, v in parts.items()},
            "relative_laplacian": round(sharp, 2),
            "mean_level": round(mean, 1),
            "clipped": round(clipped, 4),
            "blockiness": None if block is None else round(block, 3),
        }
        return parts[worst], details


class HyperIQAScorer:
    """hyperIQA with the given weights (see the module docstring)."""

    name = "hyperiqa"
    default_threshold = 40.0

    def __init__(self, weights: str | os.PathLike, device: str = "cpu"):
        self.model = load_hyperiqa(weights, device)
        self.device = torch.device(device)
        self.mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def score(self, data: QualityInput) -> tuple[float, dict]:
        x = torch.from_numpy(data.crops).permute(0, 3, 1, 2).float() / 255.0
        x = F.interpolate(
            x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False,
            antialias=True,
        )  # fmt: skip
        x = ((x - self.mean) / self.std).to(self.device)
        with torch.inference_mode():
            scores = self.model(x).float().cpu().numpy()
        return float(scores.mean()), {
            "scorer": self.name,
            "frames": [round(float(s), 2) for s in scores],
        }
