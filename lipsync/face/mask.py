"""The inpainting mask: which part of the aligned face crop the model regenerates.

Convention (the same as LatentSync's ``mask.png``): a float32 array of shape
``(resolution, resolution)`` with values in ``{0, 1}``; **1 = keep** the source pixels (white in a
PNG), **0 = generate** (black in a PNG). Multiply a crop by the mask to blank the mouth region.

The mask is not shipped as an image: :func:`make_mask` rasterises it from the parametric geometry
below, at any resolution. All coordinates are fractions of the crop size, ``x`` from the left
edge, ``y`` from the top edge; ``(0.5, 0.5)`` is the crop centre. The region to *generate* is:

1. **Cheek band** (``BAND_TOP <= y < NOTCH_BOTTOM``): the rectangle
   ``BAND_LEFT <= x < BAND_RIGHT``, with the **nose notch** ``NOTCH_LEFT <= x < NOTCH_RIGHT``
   cut out of it, so the nose and the skin just under it are kept.
2. **Lower face** (``NOTCH_BOTTOM <= y < CHIN_Y``): everything between a left and a right
   outline, which is, walking down either side,

   - a straight, slightly inward-leaning side from ``*_SIDE_TOP`` (at ``y = NOTCH_BOTTOM``) to
     ``*_ARC_START``;
   - a quarter of a superellipse (a Lamé curve ``|dx/a|^p + |dy/b|^p = 1`` with exponent
     ``p = *_ARC_EXPONENT``, a little pointier than an ellipse) from ``*_ARC_START``, where it
     runs vertically, to ``*_CHIN`` on the chin line, where it runs horizontally. Its centre is
     ``(*_CHIN.x, *_ARC_START.y)``, its semi-axes the x and y distances between the two points;
   - the flat chin line ``y = CHIN_Y`` between ``LEFT_CHIN`` and ``RIGHT_CHIN``.

The reference mask is hand drawn and not quite mirror symmetric (its lower part leans a few
pixels to the right), so the left and right outlines have their own constants. The band and
notch edges are the reference's pixel edges; the outline constants (11 numbers) were fitted once
by maximising the IoU with the reference and rounded to 4 decimals. At 256 px the rasterised
region matches the reference mask's black region with IoU 0.9966, at 512 px (reference enlarged
with nearest neighbour) 0.9956; the remaining error is the reference's stair-stepped outline.

A pixel belongs to the region when its centre ``((col + 0.5) / res, (row + 0.5) / res)`` lies
inside (left and top edges inclusive, right and bottom edges exclusive).

:func:`load_mask` reads a user-supplied mask image into the same format instead.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from lipsync.errors import ConfigError, MediaError

__all__ = ["load_mask", "make_mask", "mask_iou"]

# -- Cheek band with the nose notch (fractions of the crop size) ----------------------------------
BAND_TOP = 0.3711  # top edge of the generated region, just under the eyes
BAND_LEFT = 0.0352
BAND_RIGHT = 0.9648
NOTCH_LEFT = 0.3047  # nose notch: kept, cut out of the band
NOTCH_RIGHT = 0.6953
NOTCH_BOTTOM = 0.5  # bottom of the notch = bottom of the band = top of the lower face

# -- Lower face outline: points (x, y) ------------------------------------------------------------
CHIN_Y = 0.9491  # the flat bottom edge

LEFT_SIDE_TOP = (0.0345, NOTCH_BOTTOM)
LEFT_ARC_START = (0.0443, 0.6349)
LEFT_CHIN = (0.4747, CHIN_Y)
LEFT_ARC_EXPONENT = 1.64

RIGHT_SIDE_TOP = (0.9694, NOTCH_BOTTOM)
RIGHT_ARC_START = (0.9601, 0.6220)
RIGHT_CHIN = (0.5702, CHIN_Y)
RIGHT_ARC_EXPONENT = 1.61


def _outline_x(
    y: np.ndarray,
    side_top: tuple[float, float],
    arc_start: tuple[float, float],
    chin: tuple[float, float],
    exponent: float,
) -> np.ndarray:
    """x of one side of the lower-face outline at heights ``y`` (NOTCH_BOTTOM <= y <= CHIN_Y)."""
    (x0, y0), (x1, y1), (x2, y2) = side_top, arc_start, chin
    # Straight side from side_top to arc_start.
    line = x0 + (x1 - x0) * (y - y0) / (y1 - y0)
    # Quarter superellipse centred at (x2, y1) with semi-axes (x2 - x1, y2 - y1), signed so that
    # it works for either side: x = x2 - (x2 - x1) * (1 - t^p)^(1/p), t = (y - y1) / (y2 - y1).
    t = np.clip((y - y1) / (y2 - y1), 0.0, 1.0)
    arc = x2 - (x2 - x1) * (1.0 - t**exponent) ** (1.0 / exponent)
    return np.where(y < y1, line, arc)


def _check_resolution(resolution: int) -> int:
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)):
        raise ConfigError(f"mask resolution must be an integer, got {resolution!r}")
    if resolution < 8:
        raise ConfigError(f"mask resolution must be at least 8 pixels, got {resolution}")
    return int(resolution)


def make_mask(resolution: int) -> np.ndarray:
    """The LatentSync-style inpainting mask at ``resolution`` × ``resolution`` pixels.

    Returns float32 with 1 = keep, 0 = generate (see the module docstring for the geometry).
    """
    res = _check_resolution(resolution)
    c = (np.arange(res, dtype=np.float64) + 0.5) / res  # pixel centres
    x, y = c[None, :], c[:, None]

    band = (y >= BAND_TOP) & (y < NOTCH_BOTTOM) & (x >= BAND_LEFT) & (x < BAND_RIGHT)
    notch = (x >= NOTCH_LEFT) & (x < NOTCH_RIGHT)

    yl = np.clip(c, NOTCH_BOTTOM, CHIN_Y)[:, None]
    left = _outline_x(yl, LEFT_SIDE_TOP, LEFT_ARC_START, LEFT_CHIN, LEFT_ARC_EXPONENT)
    right = _outline_x(yl, RIGHT_SIDE_TOP, RIGHT_ARC_START, RIGHT_CHIN, RIGHT_ARC_EXPONENT)
    lower = (y >= NOTCH_BOTTOM) & (y < CHIN_Y) & (x >= left) & (x < right)

    generate = (band & ~notch) | lower
    return (~generate).astype(np.float32)


def _image_to_unit_float(img: Image.Image) -> np.ndarray:
    """Grey levels in [0, 1] for an 8-bit, 16-bit, float or palette image (alpha ignored)."""
    if img.mode == "F":
        return np.asarray(img, dtype=np.float32)
    if img.mode.startswith("I"):  # 16-bit PNGs open as "I;16" or "I"
        return np.asarray(img, dtype=np.float32) / 65535.0
    return np.asarray(img.convert("L"), dtype=np.float32) / 255.0


def load_mask(path: str | Path, resolution: int) -> np.ndarray:
    """Read a mask image (grayscale or RGB, any size) into :func:`make_mask`'s format.

    The image is converted to grey, resized to ``resolution`` × ``resolution`` (area averaging
    when shrinking, nearest neighbour when enlarging) and thresholded at 0.5: white-ish = keep (1),
    black-ish = generate (0). Raises :class:`~lipsync.errors.MediaError` when the file is missing
    or not an image, or when the mask keeps everything or generates everything.
    """
    res = _check_resolution(resolution)
    p = Path(path)
    if not p.exists():
        raise MediaError(f"mask file not found: {p}")
    if not p.is_file():
        raise MediaError(f"mask path is not a file: {p}")
    try:
        with Image.open(p) as img:
            img.load()
            grey = _image_to_unit_float(img)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise MediaError(f"cannot read mask image {p}: {type(e).__name__}: {e}") from None
    if grey.ndim != 2 or grey.size == 0:
        raise MediaError(f"cannot read mask image {p}: unexpected pixel layout {grey.shape}")

    h, w = grey.shape
    resample = Image.Resampling.BOX if (w >= res and h >= res) else Image.Resampling.NEAREST
    img_f = Image.fromarray(np.ascontiguousarray(grey, dtype=np.float32))  # mode "F"
    resized = np.asarray(img_f.resize((res, res), resample=resample))
    mask = (resized >= 0.5).astype(np.float32)

    if mask.min() == 1.0:
        raise MediaError(f"mask {p} is all white: it marks nothing to generate")
    if mask.max() == 0.0:
        raise MediaError(f"mask {p} is all black: it keeps nothing of the face")
    return mask


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of the *generate* regions (value < 0.5) of two masks of the same shape."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    ga, gb = a < 0.5, b < 0.5
    union = np.count_nonzero(ga | gb)
    if union == 0:
        return 1.0
    return float(np.count_nonzero(ga & gb) / union)
