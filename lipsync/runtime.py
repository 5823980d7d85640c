"""Process-level hygiene: memory for long runs, native libraries' log lines.

Frame-sized buffers (hundreds of KB to MB) are allocated and freed all the time by the decoder,
encoder and model threads. glibc keeps freed heap memory for reuse, so resident memory creeps up
over a long video through fragmentation. :func:`release_memory` asks glibc to return free heap
pages to the system (``malloc_trim``); the pipeline calls it after every chunk. Pinning glibc's
mmap threshold instead also stopped the creep but made the CPU pipeline slower (page faults on
every large temporary). Measurements: docs/NOTES.md, "Memory hygiene".
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import sys
import threading


@functools.cache
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim  # noqa: B018 - glibc only (musl has none)
    except (OSError, AttributeError):
        return None
    return libc


def release_memory() -> bool:
    """Return free heap pages to the OS (glibc ``malloc_trim(0)``); False where unsupported."""
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


_STDERR_LOCK = threading.Lock()


@contextlib.contextmanager
def native_stderr_silenced():
    """Point file descriptor 2 at the null device for the block: what C/C++ libraries log there
    directly (MediaPipe's absl and TensorFlow Lite lines, which ignore Python's logging and
    print on every run) is dropped. Python's own ``sys.stderr`` writes made meanwhile are
    dropped too, so keep the block short (a model's set-up, not a whole run)."""
    with _STDERR_LOCK:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 2)
            yield
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            os.close(devnull)
