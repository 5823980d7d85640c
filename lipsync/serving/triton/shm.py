"""Tensors through shared memory instead of the socket (the client's side; docs/TRITON.md).

:class:`SharedMemoryPool` keeps one pair of regions (inputs, outputs) per call in flight,
registered with the server, grown when a chunk needs more, re-registered after the server lost
them (a restart), unregistered and unlinked by :meth:`SharedMemoryPool.close`. ``system``
regions are POSIX shared memory (``tritonclient.utils.shared_memory``; the server must share
our ``/dev/shm``); ``cuda`` regions are CUDA IPC (``tritonclient.utils.cuda_shared_memory``,
needs ``cuda-python``; untested here: no GPU Triton on the development machines).
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from lipsync.errors import ConfigError, one_line
from lipsync.serving.triton.protocol import NP_OF_TORCH, TRITON_OF_NP

LOG = logging.getLogger("lipsync.triton")

ALIGN = 64  # byte alignment of tensors inside a shared-memory region


@dataclass
class Region:
    name: str  # the name the server knows it by
    key: str  # the /dev/shm key (system) or "" (cuda)
    size: int
    handle: object


@dataclass
class Slot:
    """The regions of one call in flight: inputs and outputs."""

    inputs: Region | None = None
    outputs: Region | None = None
    generation: int = 0  # the pool's generation when these regions were registered


def aligned(n: int) -> int:
    """``n`` rounded up to the alignment of tensors inside a region."""
    return (n + ALIGN - 1) // ALIGN * ALIGN


class SharedMemoryPool:
    """A pool of region pairs (one per concurrent call), registered with the server.

    ``client``: returns this thread's Triton client (gRPC or HTTP); ``headers``: for the
    server's restricted endpoints (the access token); ``kind``: ``"system"`` or ``"cuda"``
    (``device_id``: the GPU of CUDA regions).
    """

    def __init__(
        self,
        client: Callable[[], object],
        kind: str,
        headers: dict[str, str] | None = None,
        device_id: int = 0,
    ):
        self.client = client
        self.kind = kind  # "system" or "cuda"
        self.prefix = f"lipsync_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        self._free: list[Slot] = []
        self._all: list[Slot] = []
        self._lock = threading.Lock()
        self._count = 0
        # bumped when the server may have forgotten our registrations (it was unreachable, or
        # it answered "Unable to find shared memory region": a restarted server); slots of an
        # older generation register fresh regions at their next use
        self.generation = 0
        self.headers = headers
        if kind == "system":
            with warnings.catch_warnings():  # tritonclient 2.51 imports pkg_resources
                warnings.simplefilter("ignore")
                import tritonclient.utils.shared_memory as shm

            self.lib = shm
        else:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    import tritonclient.utils.cuda_shared_memory as cudashm
            except (ImportError, RuntimeError) as exc:
                raise ConfigError(
                    f"CUDA shared memory needs cuda-python: {one_line(exc)}"
                ) from None
            self.lib = cudashm
        self.device_id = device_id

    # regions -------------------------------------------------------------------------------

    def _create(self, size: int) -> Region:
        with self._lock:
            self._count += 1
            name = f"{self.prefix}_{self._count}"
        client = self.client()
        if self.kind == "system":
            key = "/" + name
            handle = self.lib.create_shared_memory_region(name, key, size)
            try:
                client.register_system_shared_memory(name, key, size, headers=self.headers)
            except BaseException:
                self.lib.destroy_shared_memory_region(handle)
                raise
            return Region(name, key, size, handle)
        handle = self.lib.create_shared_memory_region(name, size, self.device_id)
        try:
            raw = self.lib.get_raw_handle(handle)
            client.register_cuda_shared_memory(
                name, raw, self.device_id, size, headers=self.headers
            )
        except BaseException:
            self.lib.destroy_shared_memory_region(handle)
            raise
        return Region(name, "", size, handle)

    def _destroy(self, region: Region | None) -> None:
        if region is None:
            return
        try:
            client = self.client()
            if self.kind == "system":
                client.unregister_system_shared_memory(region.name, headers=self.headers)
            else:
                client.unregister_cuda_shared_memory(region.name, headers=self.headers)
        except Exception as exc:  # the server may be gone: still free our side
            LOG.debug("unregistering %s: %s", region.name, one_line(exc))
        try:
            self.lib.destroy_shared_memory_region(region.handle)
        except Exception as exc:
            LOG.warning("cannot free shared memory region %s: %s", region.name, one_line(exc))

    def probe(self) -> None:
        """Create, register and drop a small region: fails unless the server shares our memory."""
        region = self._create(4096)
        self._destroy(region)

    def invalidate(self) -> None:
        """The server may have lost our regions (restarted): register new ones before use."""
        with self._lock:
            self.generation += 1

    def acquire(self, in_bytes: int, out_bytes: int) -> Slot:
        with self._lock:
            slot = self._free.pop() if self._free else None
            if slot is None:
                slot = Slot(generation=self.generation)
                self._all.append(slot)
            generation = self.generation
        try:
            if slot.generation != generation:  # unregister (if still known) and start afresh
                self._destroy(slot.inputs)
                self._destroy(slot.outputs)
                slot.inputs = slot.outputs = None
                slot.generation = generation
            if slot.inputs is None or slot.inputs.size < in_bytes:
                self._destroy(slot.inputs)
                slot.inputs = None
                slot.inputs = self._create(in_bytes)
            if slot.outputs is None or slot.outputs.size < out_bytes:
                self._destroy(slot.outputs)
                slot.outputs = None
                slot.outputs = self._create(out_bytes)
        except BaseException:
            self.release(slot)
            raise
        return slot

    def release(self, slot: Slot) -> None:
        with self._lock:
            self._free.append(slot)

    def close(self) -> None:
        with self._lock:
            slots, self._all, self._free = self._all, [], []
        for slot in slots:
            self._destroy(slot.inputs)
            self._destroy(slot.outputs)
            slot.inputs = slot.outputs = None

    @property
    def region_names(self) -> list[str]:
        with self._lock:
            return [r.name for s in self._all for r in (s.inputs, s.outputs) if r is not None]

    # tensors ----------------------------------------------------------------------------------

    def write(self, region: Region, tensors: list[torch.Tensor]) -> list[int]:
        """Copy ``tensors`` into ``region``; their byte offsets there."""
        if self.kind == "system":  # 64-byte aligned, written through numpy views of the map
            offsets, pos = [], 0
            for t in tensors:
                offsets.append(pos)
                pos = aligned(pos + t.numel() * t.element_size())
            for t, off in zip(tensors, offsets, strict=True):
                view = self.lib.get_contents_as_numpy(
                    region.handle, NP_OF_TORCH[t.dtype], list(t.shape), offset=off
                )
                torch.from_numpy(view).copy_(t)
            return offsets
        # pragma: no cover - CUDA IPC needs a GPU server: tensors packed back to back (DLPack
        # copies, device to device for CUDA tensors)
        offsets = np.cumsum([0] + [t.numel() * t.element_size() for t in tensors])[:-1]
        self.lib.set_shared_memory_region_from_dlpack(
            region.handle, [t.contiguous() for t in tensors]
        )
        return [int(o) for o in offsets]

    def read(self, region: Region, np_dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """A copy of the output tensor at the start of ``region``."""
        if self.kind == "system":
            view = self.lib.get_contents_as_numpy(region.handle, np_dtype, list(shape))
            return torch.from_numpy(np.array(view, copy=True))
        # pragma: no cover - CUDA: stays on the GPU (DLPack view, then a copy)
        name = TRITON_OF_NP[np.dtype(np_dtype).type]
        view = torch.from_dlpack(self.lib.as_shared_memory_tensor(region.handle, name, list(shape)))
        return view.clone()
