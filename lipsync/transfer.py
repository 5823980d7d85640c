"""Host → device copies that do not make the host wait for the GPU.

A plain ``tensor.to("cuda")`` from pageable host memory synchronises the stream: the host waits
until every kernel queued before it has finished. In the pipeline's pass 2 that made the host
idle through each chunk's whole denoising loop, and the GPU idle while the host then read,
aligned and queued the next chunk. :func:`to_device` copies through pinned memory without
blocking (the pinned buffer stays alive until the copy is done: torch's caching host allocator
records the copy's stream). :func:`device_constant` keeps small per-device tables (resampling
operators, look-up tables) so they are uploaded once.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

#: A/B switch for benchmarks (benchmarks/gpu_e2e.py ``+blocking``): plain blocking copies.
BLOCKING = False

_CONSTANTS: dict[tuple, torch.Tensor] = {}


def to_device(
    array: np.ndarray | torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """A host array (numpy or CPU tensor) on ``device``, converted to ``dtype`` on the host
    first (so the values are the host's conversion on any device)."""
    device = torch.device(device)
    if isinstance(array, torch.Tensor):
        t = array
    else:
        a = np.ascontiguousarray(array)
        t = torch.from_numpy(a if a.flags.writeable else a.copy())
    if dtype is not None:
        t = t.to(dtype)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    if BLOCKING:
        return t.to(device)
    return t.contiguous().pin_memory().to(device, non_blocking=True)


def device_constant(key: tuple, device: torch.device | str, make: Callable[[], object]):
    """``to_device(make())`` cached per ``(key, device)``; ``make`` returns a host array."""
    device = torch.device(device)
    full = (*key, str(device))
    t = _CONSTANTS.get(full)
    if t is None:
        t = _CONSTANTS[full] = to_device(make(), device)
    return t
