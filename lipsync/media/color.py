"""RGB → YUV 4:2:0 (BT.709, limited range) in torch, so a GPU can do the encoder's colour work.

At 1080p, swscale's conversion on one CPU core caps the encoder below the GPU model's speed
however many cores x264 has (docs/PERFORMANCE.md, "Media and face stages"). Converting on the
GPU (where the restored frames already are) moves that off the CPU and halves the bytes copied
back to the host.
"""

from __future__ import annotations

import numpy as np
import torch

from lipsync.transfer import is_blocking

# BT.709 luma coefficients; limited ("TV") range: Y in [16, 235], Cb/Cr in [16, 240].
_KR, _KB = 0.2126, 0.0722
_KG = 1.0 - _KR - _KB


class Yuv420Frames:
    """A batch of frames already in planar YUV 4:2:0: (n, H * 3 // 2, W) uint8 (Y, then U, V).

    ``planes`` may still be arriving from a GPU: then it is a pinned host tensor being filled
    by a non-blocking copy and ``ready`` the CUDA event recorded after it; reading
    :attr:`planes` waits for that event (the encoder thread does, not the GPU's feeder).
    """

    def __init__(self, planes, width: int, height: int, ready=None):
        self._planes, self._ready = planes, ready
        self.width, self.height = int(width), int(height)
        self._n = len(planes)

    @property
    def planes(self) -> np.ndarray:
        if self._ready is not None:
            self._ready.synchronize()
            self._ready = None
        if isinstance(self._planes, torch.Tensor):
            self._planes = self._planes.numpy()
        return self._planes

    def __len__(self) -> int:
        return self._n


def rgb_to_yuv420(frames: torch.Tensor | np.ndarray) -> Yuv420Frames:
    """frames (n, H, W, 3) uint8 RGB (any device) -> :class:`Yuv420Frames` on the host.

    Odd sizes are padded to even ones by repeating the last row/column (4:2:0 needs even sizes).
    """
    x = torch.as_tensor(frames)
    n, h, w, _ = x.shape
    if h % 2 or w % 2:
        x = torch.nn.functional.pad(
            x.permute(0, 3, 1, 2).float(), (0, w % 2, 0, h % 2), mode="replicate"
        ).permute(0, 2, 3, 1)
        h, w = h + h % 2, w + w % 2
    rgb = x.float() / 255.0
    r, g, b = rgb.unbind(-1)
    y = _KR * r + _KG * g + _KB * b
    cb = (b - y) / (2 * (1 - _KB))
    cr = (r - y) / (2 * (1 - _KR))
    # 2x2 chroma average (centre-sited), then limited-range quantisation
    cb = torch.nn.functional.avg_pool2d(cb[:, None], 2)[:, 0]
    cr = torch.nn.functional.avg_pool2d(cr[:, None], 2)[:, 0]
    yq = (16 + 219 * y).round_().clamp_(0, 255).to(torch.uint8)
    uq = (128 + 224 * cb).round_().clamp_(0, 255).to(torch.uint8)
    vq = (128 + 224 * cr).round_().clamp_(0, 255).to(torch.uint8)
    out = torch.empty((n, h * 3 // 2, w), dtype=torch.uint8, device=x.device)
    out[:, :h] = yq
    out[:, h : h + h // 4] = uq.reshape(n, h // 4, w)
    out[:, h + h // 4 :] = vq.reshape(n, h // 4, w)
    if out.device.type == "cuda":
        # into pinned memory without blocking: the caller goes on queueing GPU work while the
        # copy runs; the encoder thread waits for the event when it reads the planes
        host = torch.empty(out.shape, dtype=torch.uint8, pin_memory=True)
        host.copy_(out, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(out.device))
        if is_blocking():  # transfer.blocking_copies(): wait for the download here
            ready.synchronize()
            ready = None
        return Yuv420Frames(host, w, h, ready)
    return Yuv420Frames(out.numpy(), w, h)


def as_rgb_batch(frames) -> np.ndarray:
    """Check and normalise frames to a C-contiguous (N, H, W, 3) uint8 RGB array; a single
    (H, W, 3) frame becomes a batch of one. Raises ValueError otherwise."""
    arr = np.asarray(frames)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"frames must be (N, H, W, 3) RGB, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {arr.dtype}")
    return np.ascontiguousarray(arr)
