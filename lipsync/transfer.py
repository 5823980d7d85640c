"""Host → device copies that do not make the host wait for the GPU.

A plain ``tensor.to("cuda")`` from pageable host memory synchronises the stream: the host waits
until every kernel queued before it has finished. In the pipeline's pass 2 that made the host
idle through each chunk's whole denoising loop, and the GPU idle while the host then read,
aligned and queued the next chunk. :func:`to_device` copies through pinned memory without
blocking (the pinned buffer stays alive until the copy is done: torch's caching host allocator
records the copy's stream). :func:`device_constant` keeps small per-device tables (resampling
operators, look-up tables) so they are uploaded once. :func:`blocking_copies` turns the waiting
back on inside a block (an A/B switch for measuring what it costs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import numpy as np
import torch

_BLOCKING: ContextVar[bool] = ContextVar("lipsync_blocking_copies", default=False)


@contextmanager
def blocking_copies(on: bool = True) -> Iterator[None]:
    """Inside the block (this thread), host→device copies are plain blocking ``.to(device)``
    calls and GPU→host frame downloads are waited for at once (:func:`is_blocking`): the
    behaviour before the pipeline stopped waiting on the GPU. Restored on exit."""
    token = _BLOCKING.set(on)
    try:
        yield
    finally:
        _BLOCKING.reset(token)


def is_blocking() -> bool:
    """Whether copies must block here (inside :func:`blocking_copies`)."""
    return _BLOCKING.get()


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
    if is_blocking():
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
