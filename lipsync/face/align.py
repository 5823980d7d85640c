"""3-point similarity alignment: face crops for the model, and pasting generated faces back.

LatentSync aligns every frame with three landmarks (left eyebrow centre, right eyebrow centre,
nose centre, in frame pixels, rounded) onto a fixed template, crops a ``h x w`` face (portrait
3:4, e.g. 280 x 210 for the 256 px model and 560 x 420 for 512 px), resizes it to the model
resolution, and afterwards warps the generated face back into the frame through the inverse
transform, blended with an eroded and blurred mask. This module reimplements those steps batched
in torch, on whatever device the frames are on, with parity to the reference
(``latentsync/utils/affine_transform.py`` ``AlignRestore`` and ``image_processor.py``).

Conventions
-----------
* A *matrix* is a ``(2, 3)`` affine map from frame pixel coordinates to crop pixel coordinates,
  ``[u, v] = M @ [x, y, 1]``, with pixel centres at integer coordinates (OpenCV's and kornia's
  ``align_corners=True`` convention). Batches are ``(N, 2, 3)``.
* Frames are ``(N, H, W, 3)`` uint8 RGB, numpy or torch. Functions return the kind they were given
  (numpy in -> numpy out; torch in -> torch out on the same device).
* Faces handed to :func:`restore` are ``(N, 3, h, w)`` float in ``[-1, 1]`` (the VAE's range).

Pipeline
--------
``points3 -> estimate_transforms -> warp_faces -> crops_to_model_input -> (model) -> restore``.

Reference details reproduced on purpose (they change numbers):

* The similarity fit (Umeyama/Procrustes on 3 points) runs in float32 in the reference; we do the
  same, in the same order, so the matrices are bit-identical on the same CPU (float64 would
  differ by ~5e-4 px in the translation at 1080p, more on larger frames: the reference's own
  float32 rounding). Other CPUs / torch builds may differ by a few float32 ulps (~2e-4 px).
* Its "temporal smoothing" is not a filter of the transforms: it adds to the translation an
  exponential moving average (weights 0.8 new / 0.2 old) of the nose offset between the
  *normalised* template and the *normalised* landmarks (dimensionless numbers, about 0.5, added
  as pixels). It is kept because the official models saw crops made this way.
* Warps are bilinear; crop pixels outside the frame blend towards grey 127; float -> uint8
  conversions truncate (``.astype(np.uint8)``, ``.to(torch.uint8)``), they do not round (so a
  warp -> restore round trip is on average about one grey level darker, as in the reference).
* The crop -> model-resolution resize is OpenCV's ``INTER_LANCZOS4`` in 8-bit fixed point,
  reproduced bit-exactly on every device (:func:`crops_to_model_input`); the model-resolution
  -> crop resize in :func:`restore` is torchvision's default (bilinear, antialiased).
* The paste mask: coverage of the warped crop, eroded 2 x 2, eroded again by ``2 e`` and blurred
  by a ``2 e + 1`` Gaussian with ``e = isqrt(mask area) // 20`` (:func:`_soft_mask`).

Only the frame windows a crop touches are converted to float and processed, so the cost does not
grow with the frame size; everything outside the paste mask is returned bit-identical.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from lipsync.transfer import device_constant, to_device

__all__ = [
    "FILL_VALUE",
    "SmoothingState",
    "crop_size",
    "crops_to_model_input",
    "estimate_transforms",
    "face_template",
    "invert_transforms",
    "levels_to_unit_table",
    "restore",
    "warp_faces",
]

# Template in units of the 256 px model's crop divided by 2.8: (left brow, right brow, nose).
_TEMPLATE = ((19.0 - 2.0, 30.0 - 10.0), (56.0 + 2.0, 30.0 - 10.0), (37.5, 45.0 - 5.0))
_CROP_UNITS = (75, 100)  # crop (width, height) in the same units
_BASE_RATIO = 2.8  # template/crop scale for the 256 px model; proportional to the resolution
_SMOOTH_NEW = 0.8  # EMA weight of the current frame's nose bias (0.2 for the previous one)
FILL_VALUE = 127.0  # grey that crop pixels outside the frame blend towards
# Resampled values are truncated to uint8, as in the reference; values within this of the next
# integer count as that integer, so float32 rounding noise (~1e-5 at 255: a flat area sampled
# with weights summing to 1 - 1e-7) cannot flip pixels down a level depending on the device or
# the summation order. Against the fixture this halves the (1-level) crop differences. Not used
# for the final blend, where values just under an integer are the mask's real faint tail.
_TRUNC_EPS = 1e-4


# ---------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------


def _ratio(resolution: int) -> float:
    if int(resolution) != resolution or resolution <= 0:
        raise ValueError(f"resolution must be a positive integer, got {resolution!r}")
    return resolution / 256 * _BASE_RATIO


def crop_size(resolution: int) -> tuple[int, int]:
    """``(height, width)`` of the aligned crop before the resize to the model resolution.

    (280, 210) at 256 and (560, 420) at 512; ``int()`` truncation as in the reference.
    """
    ratio = _ratio(resolution)
    return int(_CROP_UNITS[1] * ratio), int(_CROP_UNITS[0] * ratio)


def face_template(resolution: int) -> np.ndarray:
    """``(3, 2)`` float64 crop coordinates the three landmarks are mapped onto."""
    return np.asarray(_TEMPLATE, dtype=np.float64) * _ratio(resolution)


@dataclass
class SmoothingState:
    """Carry-over of the translation smoothing between calls (one per face track / video).

    Pass the same object to successive :func:`estimate_transforms` calls on consecutive chunks;
    it holds the last frame's smoothed bias, shape ``(2,)`` float32, or ``None`` before the first.
    """

    bias: np.ndarray | None = None


def estimate_transforms(
    points3: np.ndarray,
    resolution: int,
    smooth: bool = True,
    *,
    state: SmoothingState | None = None,
) -> np.ndarray:
    """Similarity transforms mapping each frame's three landmarks onto the template.

    points3: ``(N, 3, 2)`` frame pixels, rows = left eyebrow centre, right eyebrow centre, nose
        centre (the reference rounds them to integers before this call).
    resolution: model resolution (256 or 512; any positive integer works).
    smooth: add the reference's temporal translation bias (see the module docstring). The bias
        of frame ``i`` is ``0.8 * own + 0.2 * (smoothed bias of frame i-1)``.
    state: optional carry-over for streaming; updated in place. Without it each call starts
        fresh, like a new reference ``AlignRestore`` object.
    returns: ``(N, 2, 3)`` float32 matrices, frame pixels -> crop pixels.

    Runs in float32 on the CPU (a few dozen flops per frame), matching the reference bit for bit.
    """
    if isinstance(points3, torch.Tensor):
        points3 = points3.detach().cpu().numpy()
    pts = np.ascontiguousarray(points3)
    if pts.ndim != 3 or pts.shape[1:] != (3, 2):
        raise ValueError(f"points3 must have shape (N, 3, 2), got {pts.shape}")
    n = pts.shape[0]
    template = face_template(resolution)
    if n == 0:
        return np.zeros((0, 2, 3), dtype=np.float32)
    if not np.isfinite(pts).all():
        raise ValueError("points3 contains NaN or infinite coordinates")

    # Same operations and order as the reference's float32 torch code, batched over N.
    p1 = torch.as_tensor(pts, dtype=torch.float32).cpu()
    p2 = torch.as_tensor(template, dtype=torch.float32).expand(n, 3, 2)
    c1, c2 = p1.mean(dim=1), p2.mean(dim=1)  # (N, 2)
    a, b = p1 - c1[:, None], p2 - c2[:, None]  # centred, (N, 3, 2)
    s1 = a.reshape(n, 6).std(dim=1)  # unbiased std over all six numbers, (N,)
    s2 = b.reshape(n, 6).std(dim=1)
    if bool((s1 <= 0).any()):
        raise ValueError("degenerate landmarks: all three points coincide in some frame")
    a = a / s1[:, None, None]
    b = b / s2[:, None, None]
    U, _, Vh = torch.linalg.svd(a.transpose(1, 2) @ b)  # (N, 2, 2) each
    V = Vh.transpose(1, 2)
    R = V @ U.transpose(1, 2)
    flip = torch.linalg.det(R) < 0  # reflection -> flip the last singular direction
    if bool(flip.any()):
        V = V.clone()
        V[flip, :, -1] = -V[flip, :, -1]
        R = V @ U.transpose(1, 2)
    scale = (s2 / s1)[:, None, None]
    T = c2[:, :, None] - scale * (R @ c1[:, :, None])  # (N, 2, 1)
    M = torch.cat((scale * R, T), dim=2)  # (N, 2, 3)

    if smooth:
        own = b[:, 2] - a[:, 2]  # normalised nose offset, (N, 2)
        prev = None
        if state is not None and state.bias is not None:
            prev = torch.as_tensor(state.bias, dtype=torch.float32)
        biases = []
        for i in range(n):  # a first-order recursion: sequential by nature, 2 numbers per step
            bias = own[i] if prev is None else prev * (1 - _SMOOTH_NEW) + own[i] * _SMOOTH_NEW
            biases.append(bias)
            prev = bias
        M[:, :, 2] = M[:, :, 2] + torch.stack(biases)
        if state is not None:
            state.bias = prev.numpy().copy()
    return M.numpy()


def invert_transforms(matrices: np.ndarray) -> np.ndarray:
    """``(N, 2, 3)`` -> ``(N, 2, 3)`` float64 inverse affine maps (crop pixels -> frame pixels)."""
    m = np.asarray(matrices, dtype=np.float64)
    A, t = m[..., :2], m[..., 2:]
    A_inv = np.linalg.inv(A)
    return np.concatenate([A_inv, -A_inv @ t], axis=-1)


def _apply(matrices: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """(N, 2, 3) affine maps applied to (K, 2) points -> (N, K, 2)."""
    return pts @ np.swapaxes(matrices[..., :2], -1, -2) + matrices[:, None, :, 2]


def _norm(hw: tuple[int, int]) -> np.ndarray:
    """3x3 map from pixel coordinates of an ``(h, w)`` image to grid_sample's ``[-1, 1]``
    (align_corners=True: pixel centres 0 and size - 1 map to -1 and 1)."""
    sx, sy = 2.0 / max(hw[1] - 1, 1), 2.0 / max(hw[0] - 1, 1)
    return np.array([[sx, 0.0, -1.0], [0.0, sy, -1.0], [0.0, 0.0, 1.0]])


def _to3(m: np.ndarray) -> np.ndarray:
    out = np.zeros(m.shape[:-2] + (3, 3))
    out[..., :2, :] = m
    out[..., 2, 2] = 1.0
    return out


def _windows(
    lo: np.ndarray, hi: np.ndarray, size: tuple[int, int], margin: int
) -> tuple[np.ndarray, tuple[int, int]]:
    """Per-frame windows of one common size that contain each frame's region of interest.

    lo, hi: ``(N, 2)`` float (x, y) extremes of the region each frame touches (frame pixels).
    size: frame ``(H, W)``.
    returns: ``origins`` ``(N, 2)`` int (x0, y0) and the window ``(height, width)``; every window
    lies inside the frame, and where a region reaches past the frame edge its window ends there.
    """
    H, W = size
    limit = np.array([W, H])
    start = np.clip(np.floor(lo).astype(np.int64) - margin, 0, limit)
    stop = np.clip(np.ceil(hi).astype(np.int64) + margin + 1, 0, limit)
    extent = np.minimum(np.maximum((stop - start).max(axis=0), 2), limit)
    origins = np.clip(start, 0, limit - extent)
    return origins, (int(extent[1]), int(extent[0]))


def _truncate_u8(x: torch.Tensor) -> torch.Tensor:
    """Float in [0, 255] -> uint8 by truncation (the reference's ``.astype(np.uint8)``)."""
    return (x + _TRUNC_EPS).clamp_(0, 255).to(torch.uint8)


def _as_frames(frames) -> tuple[torch.Tensor, bool]:
    """(N, H, W, 3) uint8 numpy/torch -> (torch uint8 tensor, was_numpy)."""
    is_numpy = isinstance(frames, np.ndarray)
    t = torch.from_numpy(np.ascontiguousarray(frames)) if is_numpy else frames
    if not isinstance(t, torch.Tensor) or t.ndim != 4 or t.shape[-1] != 3:
        raise ValueError(f"frames must be (N, H, W, 3), got {tuple(getattr(frames, 'shape', ()))}")
    if t.dtype != torch.uint8:
        raise ValueError(f"frames must be uint8, got {t.dtype}")
    return t, is_numpy


def _as_matrices(matrices, n: int) -> np.ndarray:
    m = matrices.detach().cpu().numpy() if isinstance(matrices, torch.Tensor) else matrices
    m = np.asarray(m, dtype=np.float64)
    if m.shape != (n, 2, 3):
        raise ValueError(f"matrices must have shape ({n}, 2, 3), got {m.shape}")
    if not np.isfinite(m).all() or (np.abs(np.linalg.det(m[:, :, :2])) < 1e-12).any():
        raise ValueError("matrices must be finite and invertible")
    return m


def _gather_windows(frames: torch.Tensor, origins: np.ndarray, hw: tuple[int, int]):
    """(N, H, W, 3) uint8 -> (N, 3, h, w) float32 windows on the frames' device."""
    h, w = hw
    win = torch.stack(
        [frames[i, y : y + h, x : x + w] for i, (x, y) in enumerate(origins.tolist())]
    )
    return win.permute(0, 3, 1, 2).float()


def _grid(theta: np.ndarray, out_hw: tuple[int, int], device) -> torch.Tensor:
    """Sampling grid (N, h, w, 2) of normalised (N, 2, 3) output->input maps, on ``device``."""
    theta_t = to_device(theta, device, torch.float32)
    return F.affine_grid(theta_t, [len(theta), 1, *out_hw], align_corners=True)


def _sample_grid(src: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Bilinear, zero padded: (N, C, h, w) sampled at a :func:`_grid`."""
    return F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def _sample(src: torch.Tensor, theta: np.ndarray, out_hw: tuple[int, int]) -> torch.Tensor:
    """Bilinear, zero padded: (N, C, h, w) and normalised (N, 2, 3) output->input maps."""
    return _sample_grid(src, _grid(theta, out_hw, src.device))


# ---------------------------------------------------------------------------------------------
# Align and crop
# ---------------------------------------------------------------------------------------------


def warp_faces(frames, matrices, resolution: int):
    """Aligned face crops, before the resize to the model resolution.

    frames: ``(N, H, W, 3)`` uint8 RGB, numpy or torch (any device; the work runs there).
    matrices: ``(N, 2, 3)`` from :func:`estimate_transforms`.
    resolution: model resolution; fixes the crop size (:func:`crop_size`).
    returns: ``(N, h, w, 3)`` uint8 crops, numpy if ``frames`` was numpy, else a torch tensor on
    the frames' device. Crop pixels outside the frame blend towards grey 127; values are
    truncated to integers, as in the reference.
    """
    src, is_numpy = _as_frames(frames)
    n, H, W, _ = src.shape
    m = _as_matrices(matrices, n)
    h, w = crop_size(resolution)
    if n == 0:
        empty = torch.zeros((0, h, w, 3), dtype=torch.uint8, device=src.device)
        return empty.numpy() if is_numpy else empty

    # Read only the part of each frame the crop samples from (plus the bilinear neighbours).
    inv = invert_transforms(m)  # crop -> frame
    corners = np.array([[0, 0], [w - 1, 0], [0, h - 1], [w - 1, h - 1]], dtype=np.float64)
    touched = _apply(inv, corners)  # (N, 4, 2)
    origins, (wh, ww) = _windows(touched.min(1), touched.max(1), (H, W), margin=1)
    win = _gather_windows(src, origins, (wh, ww))
    win = torch.cat([win, torch.ones_like(win[:, :1])], dim=1)  # + coverage channel

    # crop-normalised -> crop px -> frame px -> window px -> window-normalised.
    shift = np.eye(3)[None].repeat(n, 0)
    shift[:, :2, 2] = -origins
    theta = _norm((wh, ww)) @ shift @ _to3(inv) @ np.linalg.inv(_norm((h, w)))
    out = _sample(win, theta[:, :2], (h, w))  # (N, 4, h, w)
    crops = out[:, :3] + (1.0 - out[:, 3:]) * FILL_VALUE
    crops = _truncate_u8(crops).permute(0, 2, 3, 1).contiguous()
    return crops.cpu().numpy() if is_numpy else crops


def _lanczos4_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV ``INTER_LANCZOS4`` 8-bit resize taps: indices (out, 8) and fixed-point weights.

    Reproduces ``cv::resize``: source position ``(i + 0.5) * in/out - 0.5`` in float32, taps
    ``floor - 3 .. floor + 4`` clamped to the edge, windowed-sinc weights normalised in float32
    and rounded to 11 fractional bits.
    """
    scale = 1.0 / (out_size / in_size)
    pos = ((np.arange(out_size) + 0.5) * scale - 0.5).astype(np.float32)
    start = np.floor(pos).astype(np.int64)
    frac = (pos - start.astype(np.float32)).astype(np.float32)

    k = np.arange(8)
    x3 = (frac + np.float32(3)).astype(np.float32)[:, None]  # float arithmetic, as in OpenCV
    t = (x3 - k.astype(np.float32)).astype(np.float32)  # distance to each tap, (out, 8)
    on_tap = np.abs(t) < 1e-6  # 0 / 0: OpenCV puts 1e30 there, i.e. copies that pixel
    y = -np.where(on_tap, 1.0, t).astype(np.float64) * (np.pi / 4)
    y0 = -x3.astype(np.float64) * (np.pi / 4)
    s45 = math.sqrt(0.5)
    cs = np.array(
        [[1, 0], [-s45, -s45], [0, 1], [s45, -s45], [-1, 0], [s45, s45], [0, -1], [-s45, s45]]
    )
    # sin(y_k) * sin(y_k / 4) / (y_k^2 / 4) up to a common factor, via OpenCV's rotation table.
    coef = ((cs[:, 0] * np.sin(y0) + cs[:, 1] * np.cos(y0)) / (y * y)).astype(np.float32)
    coef[on_tap] = np.float32(1e30)
    total = np.zeros(out_size, dtype=np.float32)
    for j in range(8):  # float32 running sum, as in OpenCV
        total = (total + coef[:, j]).astype(np.float32)
    coef = (coef * (np.float32(1.0) / total)[:, None]).astype(np.float32)
    weights = np.rint(coef * np.float32(2048.0)).astype(np.int64)
    index = np.clip(start[:, None] - 3 + k, 0, in_size - 1)
    return index, weights


def _banded_operator(index: np.ndarray, weights: np.ndarray, in_size: int, block: int = 32):
    """Block form of a banded resampling matrix, for cheap batched matmuls.

    index, weights: ``(out, taps)`` source indices and weights of each output sample.
    returns: ``(starts, mats)``: output block ``g`` (rows ``g * block ..``) reads the inputs
    ``starts[g] : starts[g] + L`` through ``mats[g]``, ``(block, L)`` float64 (zero padded).
    """
    out = index.shape[0]
    dense = np.zeros((out, in_size))
    np.add.at(dense, (np.arange(out)[:, None].repeat(index.shape[1], 1), index), weights)
    groups = -(-out // block)
    lo = [index[g * block : (g + 1) * block].min() for g in range(groups)]
    hi = [index[g * block : (g + 1) * block].max() + 1 for g in range(groups)]
    span = min(max(h - lo_ for lo_, h in zip(lo, hi, strict=True)), in_size)
    starts = np.clip(np.array(lo), 0, in_size - span)
    mats = np.zeros((groups, block, span))
    for g in range(groups):
        rows = dense[g * block : (g + 1) * block, starts[g] : starts[g] + span]
        mats[g, : rows.shape[0]] = rows
    return starts, mats


@functools.lru_cache(maxsize=16)
def _lanczos4_operator(in_size: int, out_size: int):
    """Cached :func:`_banded_operator` of :func:`_lanczos4_taps` (read-only arrays)."""
    starts, mats = _banded_operator(*_lanczos4_taps(in_size, out_size), in_size)
    starts.flags.writeable = False
    mats.flags.writeable = False
    return starts, mats


def _apply_banded(x: torch.Tensor, op, out_size: int, key: tuple) -> torch.Tensor:
    """Resample float64 ``x`` ``(P, n, W)`` along dim 1 with a :func:`_banded_operator`;
    returns ``(P, out_size, W)``. One broadcast batched matmul over the blocks, no transposes."""
    starts, mats = op
    groups, block, span = mats.shape
    # key names the operator: its tables are uploaded once per device
    idx = device_constant((*key, "idx"), x.device, lambda: starts[:, None] + np.arange(span))
    xs = x.index_select(1, idx.reshape(-1)).unflatten(1, (groups, span))  # (P, G, L, W)
    y = torch.matmul(device_constant((*key, "mats"), x.device, lambda: mats), xs)  # (P, G, B, W)
    return y.flatten(1, 2)[:, :out_size]


def _resize_lanczos4_u8(images: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """(N, h, w, C) uint8 -> (N, C, H, W) float64 holding the uint8 values of
    ``cv2.resize(.., INTER_LANCZOS4)``, bit-exact.

    OpenCV computes this in integers (11-bit weights per pass, 22 fractional bits in the end);
    float64 holds every intermediate sum exactly (whatever the summation order), so the same
    numbers come out on any device. Both passes are banded matmuls (8 taps per output).
    """
    n, h, w, c = images.shape
    horizontal = _lanczos4_operator(w, out_hw[1])
    vertical = _lanczos4_operator(h, out_hw[0])
    x = torch.empty((n, c, w, h), dtype=torch.float64, device=images.device)
    x.copy_(images.permute(0, 3, 2, 1))  # (N, C, w, h): the horizontal pass runs on dim 1
    x = _apply_banded(x.flatten(0, 1), horizontal, out_hw[1], ("lanczos4", w, out_hw[1]))
    x = _apply_banded(x.transpose(1, 2), vertical, out_hw[0], ("lanczos4", h, out_hw[0]))
    # x: (N*C, H, W)
    # Round off the 22 fractional bits (exact: a power-of-two scale) and saturate.
    x = x.add_(1 << 21).mul_(2.0**-22).floor_().clamp_(0, 255)
    return x.unflatten(0, (n, c))


def crops_to_model_input(crops, resolution: int) -> torch.Tensor:
    """Resize crops to the model resolution and scale to ``[-1, 1]``.

    crops: ``(N, h, w, 3)`` uint8 from :func:`warp_faces` (numpy or torch).
    returns: ``(N, 3, resolution, resolution)`` float32 in ``[-1, 1]`` on the crops' device.
    The resize is OpenCV's 8-bit Lanczos-4 (what the reference uses), reproduced exactly in
    integer-valued float64 arithmetic; then ``(x / 255 - 0.5) / 0.5`` like torchvision's
    ``Normalize`` in float32, so the values are bit-identical to the reference's.
    """
    t = torch.from_numpy(crops) if isinstance(crops, np.ndarray) else crops
    if t.ndim != 4 or t.shape[-1] != 3 or t.dtype != torch.uint8:
        raise ValueError(f"crops must be (N, h, w, 3) uint8, got {tuple(t.shape)} {t.dtype}")
    levels = _resize_lanczos4_u8(t, (resolution, resolution)).to(torch.int64)
    return device_constant(("u8_to_unit",), levels.device, levels_to_unit_table)[levels]


def levels_to_unit_table() -> torch.Tensor:
    """(256,) float32 on the CPU: 8-bit level -> model input in [-1, 1], ``(x / 255 - 0.5) / 0.5``
    as the reference computes it. Computed on the CPU: a CUDA division by a scalar multiplies by
    its reciprocal, which can differ in the last bit. :func:`crops_to_model_input` maps its
    levels through it; the Triton protocol sends faces as these levels."""
    return (torch.arange(256, dtype=torch.float32) / 255.0 - 0.5) / 0.5


# ---------------------------------------------------------------------------------------------
# Restore
# ---------------------------------------------------------------------------------------------


def _min_filter(x: torch.Tensor, size: int, anchor: int, dim: int) -> torch.Tensor:
    """Running minimum over ``x[i - anchor : i - anchor + size]`` along ``dim``; the border is
    ignored (padded with +inf), like ``cv2.erode``. O(log size) passes: minima over windows of
    doubling length, then two overlapping power-of-two windows cover ``size``."""
    if size <= 1:
        return x
    pad = [0, 0] * (x.ndim - 1 - dim % x.ndim) + [anchor, size - 1 - anchor]
    y = F.pad(x, pad, value=math.inf)
    n = x.shape[dim]
    span, cur = 1, y  # cur[i] = min(y[i : i + span])
    while span * 2 <= size:
        cur = torch.minimum(
            cur.narrow(dim, 0, cur.shape[dim] - span), cur.narrow(dim, span, cur.shape[dim] - span)
        )
        span *= 2
    return torch.minimum(cur.narrow(dim, 0, n), cur.narrow(dim, size - span, n))


def _erode(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 1, H, W) erosion by a ``size x size`` square, OpenCV anchor (its centre, rounded down
    for even sizes: the window is ``[i - size // 2, i - size // 2 + size)``)."""
    anchor = size // 2
    return _min_filter(_min_filter(x, size, anchor, -1), size, anchor, -2)


def _gaussian_blur(x: torch.Tensor, ksize: int, sigma: float) -> torch.Tensor:
    """(B, 1, H, W) separable Gaussian blur, reflect-101 border (kornia ``gaussian_blur2d``)."""
    if ksize <= 1:
        return x
    r = ksize // 2
    taps = torch.arange(ksize, dtype=torch.float32, device=x.device) - r
    k = torch.exp(-(taps**2) / (2 * sigma**2))
    k = k / k.sum()
    n, _, h, w = x.shape
    # Window sizes change with every frame; oneDNN (CPU) caches a primitive per input shape,
    # which grows memory over a long video. Zero-padding batch, height and width up to coarse
    # buckets keeps the set of shapes small; the extra outputs are cropped (values unchanged).
    nb, hb, wb = 1 << (n - 1).bit_length(), _bucket(h + 2 * r), _bucket(w + 2 * r)
    x = F.pad(x, (r, r, 0, 0), mode="reflect")
    x = F.pad(x, (0, wb - x.shape[-1], 0, hb - h, 0, 0, 0, nb - n))
    x = F.conv2d(x, k.view(1, 1, 1, ksize))[:n, :, :h, :w]
    y = F.pad(x, (0, 0, r, r), mode="reflect")
    y = F.pad(y, (0, wb - w, 0, hb - y.shape[-2], 0, 0, 0, nb - n))
    return F.conv2d(y, k.view(1, 1, ksize, 1))[:n, :, :h, :w]


def _bucket(size: int, step: int = 64) -> int:
    return -(-size // step) * step


def _soft_mask(coverage: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's paste mask from the warped crop coverage.

    coverage: ``(N, 1, H, W)`` float, 1 where a frame pixel maps inside the crop.
    returns: ``(eroded, soft)``, both ``(N, 1, H, W)``: the coverage eroded by 2 x 2, and that
    eroded again by ``2 * e`` and blurred with a ``2 * e + 1`` Gaussian, ``e = isqrt(area) // 20``
    (``area`` = sum of the eroded coverage: the edge width scales with the face size).
    """
    eroded = _erode(coverage, 2)
    area = eroded.double().sum(dim=(1, 2, 3)).cpu().numpy()
    edge = np.sqrt(np.maximum(area, 0)).astype(np.int64) // 20
    soft = torch.empty_like(eroded)
    for e in np.unique(edge).tolist():  # frames of one chunk share one or two edge widths
        idx = to_device(np.nonzero(edge == e)[0], coverage.device)
        # cv2.erode with an empty kernel (tiny faces, e = 0) falls back to 3 x 3.
        center = _erode(eroded[idx], 2 * e if e > 0 else 3)
        ksize = 2 * e + 1
        sigma = 0.3 * ((ksize - 1) * 0.5 - 1) + 0.8  # OpenCV's default for this kernel size
        soft[idx] = _gaussian_blur(center, ksize, sigma)
    return eroded, soft


def _crop_hw_for(faces: torch.Tensor, resolution: int | None) -> tuple[int, int]:
    if resolution is not None:
        return crop_size(resolution)
    fh, fw = faces.shape[-2:]
    # Square faces are model outputs at the model resolution; others are already crop sized.
    return crop_size(int(fh)) if fh == fw else (int(fh), int(fw))


@dataclass(frozen=True)
class PasteMask:
    """Where :func:`restore` pastes each face and how strongly: a function of the matrices and
    the sizes only, so it can be made before the faces exist (the pipeline makes it while the
    model runs ahead; computing it needs one read-back of the mask areas).

    origins: ``(N, 2)`` int, each frame's window (x0, y0); window: its ``(height, width)``;
    grid: ``(N, height, width, 2)``, where each window pixel samples the crop (made once, used
    for the coverage here and for the face in :func:`restore`); coverage, eroded, soft:
    ``(N, 1, height, width)`` float32 on the device (see :func:`_soft_mask`).
    """

    origins: np.ndarray
    window: tuple[int, int]
    grid: torch.Tensor
    coverage: torch.Tensor
    eroded: torch.Tensor
    soft: torch.Tensor

    def __len__(self) -> int:
        return len(self.origins)


def paste_mask(
    matrices, frame_hw: tuple[int, int], crop_hw: tuple[int, int], device: torch.device | str
) -> PasteMask:
    """The :class:`PasteMask` of crops of size ``crop_hw`` made with ``matrices`` ``(N, 2, 3)``
    from frames of size ``frame_hw``, on ``device``."""
    n = len(matrices)
    m = _as_matrices(matrices, n)
    h, w = crop_hw
    # Frame region the crop reaches: its rectangle grown by the bilinear footprint.
    inv = invert_transforms(m)
    corners = np.array([[-1, -1], [w, -1], [-1, h], [w, h]], dtype=np.float64)
    reach = _apply(inv, corners)
    origins, (wh, ww) = _windows(reach.min(1), reach.max(1), tuple(frame_hw), margin=4)
    # window-normalised -> window px -> frame px -> crop px -> crop-normalised.
    shift = np.eye(3)[None].repeat(n, 0)
    shift[:, :2, 2] = origins
    theta = (_norm((h, w)) @ _to3(m) @ shift @ np.linalg.inv(_norm((wh, ww))))[:, :2]
    grid = _grid(theta, (wh, ww), device)
    ones = torch.ones((n, 1, h, w), dtype=torch.float32, device=device)
    coverage = _sample_grid(ones, grid)  # (N, 1, wh, ww)
    eroded, soft = _soft_mask(coverage)
    return PasteMask(origins, (wh, ww), grid, coverage, eroded, soft)


def restore(
    frames,
    faces: torch.Tensor,
    matrices,
    *,
    resolution: int | None = None,
    quantize: bool = True,
    inplace: bool = False,
    mask: PasteMask | None = None,
):
    """Paste generated faces back into their frames.

    frames: ``(N, H, W, 3)`` uint8 RGB, numpy or torch (the work runs on its device).
    faces: ``(N, 3, fh, fw)`` float in ``[-1, 1]``, either model outputs at the model resolution
        (square) or faces already at the crop size (``crop_size(resolution)``, portrait).
    matrices: ``(N, 2, 3)`` frame -> crop maps the crops were made with.
    resolution: the model resolution, fixing the crop size; by default a square ``faces`` is
        taken to be at the model resolution and a non-square one at the crop size.
    quantize: convert the face to uint8 (truncating) before warping, as the reference pipeline
        does; ``False`` warps the float face (slightly more accurate).
    inplace: write into ``frames`` instead of a copy.
    mask: the :func:`paste_mask` of these matrices, frame and crop sizes, if made already.
    returns: ``(N, H, W, 3)`` uint8, the same kind as ``frames``. Only pixels the (blurred) paste
        mask reaches can change; everything else is returned bit-identical.

    Reference ``restore_video`` + ``restore_img``, per frame: resize the face to the crop size if
    needed (bilinear, antialiased: torchvision's default), map ``[-1, 1] -> [0, 255]``, warp it
    into the frame (bilinear, grey 127 outside the crop) together with a coverage mask; erode the
    coverage by 2 x 2 (``pasted = eroded * face``), erode it again and blur it into a soft mask
    (:func:`_soft_mask`), and output ``soft * pasted + (1 - soft) * frame``, truncated to uint8.
    """
    dst, is_numpy = _as_frames(frames)
    n, H, W, _ = dst.shape
    if not isinstance(faces, torch.Tensor):
        faces = torch.as_tensor(faces)
    if faces.ndim != 4 or faces.shape[0] != n or faces.shape[1] != 3:
        raise ValueError(f"faces must be ({n}, 3, h, w), got {tuple(faces.shape)}")
    out = dst if inplace else dst.clone()
    if n == 0:
        _as_matrices(matrices, n)
        return out.numpy() if is_numpy else out
    crop_hw = _crop_hw_for(faces, resolution)
    if mask is None:
        mask = paste_mask(matrices, (H, W), crop_hw, dst.device)
    elif len(mask) != n:
        raise ValueError(f"the paste mask is for {len(mask)} frames, not {n}")

    face = faces.to(device=dst.device, dtype=torch.float32)
    if tuple(face.shape[-2:]) != crop_hw:
        face = F.interpolate(
            face, size=crop_hw, mode="bilinear", align_corners=False, antialias=True
        )
    face = (face / 2 + 0.5).clamp(0, 1) * 255
    if quantize:
        face = _truncate_u8(face).float()

    wh, ww = mask.window
    warped = _sample_grid(face, mask.grid)  # (N, 3, wh, ww)
    inv_face = warped + (1.0 - mask.coverage) * FILL_VALUE
    base = _gather_windows(dst, mask.origins, (wh, ww))
    blended = mask.soft * (mask.eroded * inv_face) + (1 - mask.soft) * base
    blended = blended.clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)  # plain truncation
    for i, (x, y) in enumerate(mask.origins.tolist()):
        out[i, y : y + wh, x : x + ww] = blended[i]
    return out.numpy() if is_numpy else out
