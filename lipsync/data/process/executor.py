"""Where tasks run: in this process, a local process pool, or a Ray cluster -- one interface.

Every executor turns ``submit(fn, *args)`` into a :class:`concurrent.futures.Future`, so the
runner's loop (``concurrent.futures.wait``) is the same code for all of them:

* :class:`InlineExecutor` -- runs the task at once in this process (debugging, tests that hand
  step 6 an in-memory scorer).
* :class:`PoolExecutor` -- ``concurrent.futures.ProcessPoolExecutor`` with ``spawn`` workers
  (no fork of a process holding threads). A worker that dies (segfault, OOM kill) breaks the
  pool; :meth:`PoolExecutor.restart` makes a new one and the runner resubmits what was in
  flight.
* :class:`RayExecutor` -- ``ray.remote`` tasks (1 CPU each) on the cluster at ``address``
  (``auto``, ``host:port`` or ``ray://host:10001``); ``ObjectRef.future()`` gives the Future. The
  cluster's nodes need lipsync installed and ``OUT`` (and ``IN``) on a shared file system at the
  same path. Tasks that fail because a worker or node died are retried by Ray (``max_retries``).
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, Protocol

from lipsync.errors import ConfigError

__all__ = ["Executor", "InlineExecutor", "PoolExecutor", "RayExecutor", "worker_setup"]


def worker_setup(threads: int) -> None:
    """Per worker process: bounded CPU threads, quiet native libraries."""
    os.environ.setdefault("GLOG_minloglevel", "2")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import torch

    torch.set_num_threads(max(1, threads))


class Executor(Protocol):
    workers: int

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future: ...

    def restart(self) -> None: ...

    def close(self) -> None: ...


class InlineExecutor:
    workers = 1

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        fut: Future = Future()
        try:
            fut.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller through the future
            fut.set_exception(exc)
        return fut

    def restart(self) -> None:
        pass

    def close(self) -> None:
        pass


class PoolExecutor:
    def __init__(self, workers: int, threads: int):
        self.workers = workers
        self.threads = threads
        self._pool = self._make()

    def _make(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=worker_setup,
            initargs=(self.threads,),
        )

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        return self._pool.submit(fn, *args)

    def restart(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = self._make()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _ray_call(threads: int, fn: Callable[..., Any], *args: Any) -> Any:
    worker_setup(threads)
    return fn(*args)


class RayExecutor:
    def __init__(self, address: str, threads: int = 1, max_retries: int = 2):
        try:
            import ray
        except ImportError as exc:
            raise ConfigError(f"--ray-address needs ray: pip install 'ray>=2.9' ({exc})") from None
        self._ray = ray
        self._owns = not ray.is_initialized()
        if self._owns:
            try:
                ray.init(address=address, logging_level="WARNING", log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                msg = f"cannot connect to the Ray cluster at {address}: {exc}"
                raise ConfigError(msg) from None
        self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.threads = threads
        self._remote = ray.remote(num_cpus=1, max_retries=max_retries)(_ray_call)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        return self._remote.remote(self.threads, fn, *args).future()

    def restart(self) -> None:
        pass

    def close(self) -> None:
        if self._owns:
            self._ray.shutdown()
