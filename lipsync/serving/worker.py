"""``lipsync serve worker``: takes jobs off the queue and runs them, one at a time.

The thing that runs a job is pluggable (:func:`make_runner`): an object with
``run(video, audio, out, progress=None, **options) -> RunReport``, loaded once per worker:

* ``engine`` -- the in-process model, loaded with the settings' ``load_options()`` (preset,
  device, dtype, compile, FP8, …: :func:`lipsync.loading.load_models`);
* ``triton`` -- a Triton Inference Server at ``triton_url`` (``lipsync.serving.triton.client``);
* ``module:factory`` -- any callable taking the settings (tests inject failures this way).

One attempt (:meth:`JobExecutor.__call__`): claim the job row under a fresh lease, fetch the
inputs, run, check for a cancel, store the result under ``results/<job id>.mp4`` and mark the row
succeeded -- or classify the error (:func:`lipsync.serving.queue.decide`). Progress is written to
the row between chunks, and that is where a cancel (or a shutdown) is noticed.

Signals: on SIGTERM / SIGINT the worker stops taking jobs and lets the running one finish for up
to ``shutdown_grace_s`` seconds; past that it *releases* it: the run stops at the next chunk and
the job goes back to the queue at once (not counted as a failure), then the worker exits 0.
A second signal exits immediately; the job is then recovered as a lost one (``stalled_after_s``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import logging
import os
import shutil
import socket
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Protocol

from procrastinate import exceptions as pexc
from procrastinate.job_context import AbortReason, JobContext

from lipsync.errors import ConfigError, one_line
from lipsync.pipeline import Progress, RunReport
from lipsync.progress import weighted_fraction
from lipsync.serving import db, metrics, queue
from lipsync.serving.logs import job_context
from lipsync.serving.storage import Storage, open_storage

log = logging.getLogger("lipsync.serving.worker")

TRITON_MODULE = "lipsync.serving.triton.client"


class Runner(Protocol):
    def run(
        self, video_path, audio_path, out_path, progress: Progress | None = None, **options: Any
    ) -> RunReport: ...


def make_runner(settings) -> Runner:
    """The object that runs jobs for this worker (see the module docstring)."""
    kind = settings.runner
    if kind == "auto":
        kind = "triton" if settings.triton_url else "engine"
    if kind == "engine":
        from lipsync.api import LipSync

        return LipSync.from_options(settings.load_options())
    if kind == "triton":
        # ---- Triton branch ------------------------------------------------------------------
        # lipsync/serving/triton/client.py (built separately) provides
        #     make_runner(settings) -> Runner     (uses settings.triton_url)
        if not settings.triton_url:
            raise ConfigError("runner=triton needs a Triton URL (LIPSYNC_TRITON_URL, --triton-url)")
        try:
            triton_client = importlib.import_module(TRITON_MODULE)
        except ModuleNotFoundError as exc:
            if exc.name == TRITON_MODULE:
                raise ConfigError(
                    f"runner=triton needs {TRITON_MODULE}, which is not installed in this build; "
                    "use --runner engine"
                ) from None
            raise ConfigError(
                f"the Triton runner needs the {exc.name!r} package: pip install -e '.[serve]'"
            ) from None
        return triton_client.make_runner(settings)
    if ":" in kind:
        module, _, attr = kind.partition(":")
        try:
            factory = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"cannot load runner {kind!r}: {one_line(exc)}") from None
        return factory(settings)
    raise ConfigError(f"unknown runner {kind!r}: use auto, engine, triton or module:factory")


class JobProgress(Progress):
    """Progress hook for one attempt: writes progress to the job row (at most every
    ``progress_interval_s``) and raises to stop the run when the job was cancelled, the
    worker is shutting down, or the attempt lost its lease."""

    def __init__(self, executor: JobExecutor, context: JobContext, job_id: str, lease: str):
        self.executor = executor
        self.context = context
        self.job_id = job_id
        self.lease = lease
        self.totals: dict[str, int] = {}
        self.done: dict[str, int] = {}
        self.stage = "starting"
        self._last = 0.0
        self.frames = 0

    def start(self, stage: str, total: int) -> None:
        self.stage = stage
        self.totals[stage] = max(1, int(total))
        self.done[stage] = 0
        self.check()

    def advance(self, stage: str, n: int = 1) -> None:
        self.done[stage] = self.done.get(stage, 0) + n
        if stage == "denoising":
            self.frames += n
        self.check()

    def finish(self, stage: str) -> None:
        self.done[stage] = self.totals.get(stage, 1)
        self.check()

    def fraction(self) -> float:
        return round(min(weighted_fraction(self.totals, self.done), 0.99), 4)

    def check(self, force: bool = False) -> None:
        reason = self.context.abort_reason()
        if reason == AbortReason.SHUTDOWN:
            raise queue.Released("the worker is shutting down")
        if reason == AbortReason.USER_REQUEST:
            raise queue.JobCancelled("cancelled by the user")
        now = time.monotonic()
        if not force and now - self._last < self.executor.settings.progress_interval_s:
            return
        self._last = now
        with db.transaction(self.executor.pool) as conn:
            row = db.update_progress(conn, self.job_id, self.lease, self.fraction(), self.stage)
        if row is None:
            raise queue.LeaseLost("another attempt owns this job now")
        if row["cancel_requested"]:
            raise queue.JobCancelled("cancelled by the user")


class JobExecutor:
    """Runs one attempt of a job (the procrastinate task; module docstring)."""

    def __init__(self, settings, runner: Runner, storage: Storage, pool, name: str):
        self.settings = settings
        self.runner = runner
        self.storage = storage
        self.pool = pool
        self.name = name
        self._paths: dict[str, str] = {}

    def __call__(self, context: JobContext, job_id: str) -> dict:
        with job_context(job_id=job_id, queue_job_id=context.job.id, worker=self.name):
            return self.execute(context, job_id)

    def execute(self, context: JobContext, job_id: str) -> dict:
        lease = uuid.uuid4().hex
        self._paths = {}
        with db.transaction(self.pool) as conn:
            row = db.claim(conn, job_id, lease, self.name)
        if row is None:
            log.error("job row %s does not exist; dropping the queue entry", job_id)
            return {"skipped": "missing"}
        if not row["claimed"]:
            if row["status"] not in db.TERMINAL:  # cancel requested before it started
                with db.transaction(self.pool) as conn:
                    db.finish_cancelled(conn, job_id, None)
                log.info("job cancelled before it started")
                raise queue.JobCancelled("cancelled before it started")
            log.info("job already %s; nothing to do", row["status"])
            return {"skipped": row["status"]}

        log.info("attempt %d started", row["attempts"], extra={"attempt": row["attempts"]})
        metrics.JOBS_IN_PROGRESS.inc()
        t0 = time.monotonic()
        work = Path(tempfile.mkdtemp(prefix=f"lipsync-{job_id[:8]}-", dir=self.settings.work_dir))
        outcome = "error"
        try:
            result = self._attempt(context, job_id, lease, row, work)
            outcome = "succeeded"
            return result
        except queue.JobCancelled:
            outcome = "cancelled"
            with db.transaction(self.pool) as conn:
                db.finish_cancelled(conn, job_id, lease)
            metrics.JOBS_CANCELLED.inc()
            log.info("job cancelled while running; nothing published")
            raise
        except queue.Released:
            outcome = "released"
            with db.transaction(self.pool) as conn:
                db.finish_retry(
                    conn, job_id, lease, kind="released", count_failure=False, retry_in_s=0,
                    reason="released by a worker that shut down; queued again", event="released",
                )  # fmt: skip
            log.info("worker shutting down: job released back to the queue")
            raise
        except queue.LeaseLost:
            outcome = "lost"
            log.error("lease lost: another attempt took over this job; dropping this one")
            raise
        except Exception as exc:
            self._failed(job_id, lease, row, exc, context)  # raises RetryLater or FinalFailure
            raise  # pragma: no cover
        finally:
            metrics.JOBS_IN_PROGRESS.dec()
            metrics.JOB_SECONDS.labels(outcome=outcome).observe(time.monotonic() - t0)
            metrics.update_gpu_memory()
            shutil.rmtree(work, ignore_errors=True)

    def _local(self, key: str, work: Path, name: str) -> Path:
        direct = self.storage.local_path(key)
        if direct is not None:
            return direct
        dest = work / f"{name}{Path(key).suffix}"
        self.storage.get_file(key, dest)
        return dest

    def _attempt(self, context: JobContext, job_id: str, lease: str, row: dict, work: Path):
        video = self._local(row["video_key"], work, "video")
        audio = (
            video if row["audio_key"] == row["video_key"]
            else self._local(row["audio_key"], work, "audio")
        )  # fmt: skip
        self._paths = {str(audio): "the audio file", str(video): "the video file", str(work): "…"}
        out = work / "result.mp4"
        options = dict(row["options"] or {})
        options.setdefault("chunk_frames", self.settings.chunk_frames)
        progress = JobProgress(self, context, job_id, lease)
        report = self.runner.run(video, audio, out, progress=progress, **options)
        progress.check(force=True)  # a cancel that came during encoding: publish nothing

        result_key = f"results/{job_id}.mp4"
        self.storage.put_file(result_key, out)
        summary = report.as_dict() if hasattr(report, "as_dict") else dict(report)
        summary.update(output=None, chunk_frames=options["chunk_frames"])
        with db.transaction(self.pool) as conn:
            done = db.finish_succeeded(conn, job_id, lease, result_key, summary)
            current = None if done else db.get_job(conn, job_id)
        if done is None:
            if current and current["cancel_requested"] and current["status"] not in db.TERMINAL:
                self.storage.delete(result_key)
                raise queue.JobCancelled("cancelled by the user")
            raise queue.LeaseLost("another attempt owns this job now")
        metrics.JOBS_SUCCEEDED.inc()
        metrics.FRAMES.inc(summary.get("frames") or 0)
        created = done["created_at"]
        metrics.JOB_LATENCY.observe((db.now() - created).total_seconds())
        log.info("job succeeded: %s", result_key, extra={"frames": summary.get("frames")})
        return {"result_key": result_key}

    def _failed(
        self, job_id: str, lease: str, row: dict, exc: Exception, context: JobContext | None = None
    ) -> None:
        decision = queue.decide(self.settings, exc, row)
        reason = decision.reason
        for path, name in self._paths.items():  # local paths mean nothing to the user
            reason = reason.replace(path, name)
        decision = dataclasses.replace(decision, reason=reason)
        if decision.kind == "oom":
            _free_gpu_memory()
        if decision.retry_in_s is not None:
            with db.transaction(self.pool) as conn:
                db.finish_retry(
                    conn, job_id, lease, kind=decision.error_kind, reason=decision.reason,
                    retry_in_s=decision.retry_in_s, options=decision.options,
                )  # fmt: skip
            metrics.JOB_RETRIES.labels(reason=decision.kind).inc()
            log.warning(
                "attempt %d failed, retry in %.1f s: %s", row["attempts"], decision.retry_in_s,
                decision.reason, exc_info=decision.kind == "internal",
            )  # fmt: skip
            if decision.kind == "unavailable":
                self._wait_for_model_server(context)
            raise queue.RetryLater(decision.reason, decision.retry_in_s) from exc
        with db.transaction(self.pool) as conn:
            db.finish_failed(conn, job_id, lease, kind=decision.error_kind, reason=decision.reason)
        metrics.JOB_FAILURES.labels(reason=decision.kind).inc()
        log.warning(
            "job failed: %s", decision.reason, exc_info=decision.kind == "internal",
            extra={"error_kind": decision.error_kind},
        )  # fmt: skip
        raise queue.FinalFailure(decision.reason) from exc

    def _wait_for_model_server(self, context: JobContext | None) -> None:
        """The model server (Triton) was unreachable: take no other job until it is back (or
        ``triton_wait_s`` passed, or the worker is stopping), rather than failing one queued
        job after another. The failed job itself is already queued again, with its backoff."""
        wait = getattr(self.runner, "wait_until_ready", None)
        if wait is None or self.settings.triton_wait_s <= 0:
            return

        def stop() -> bool:
            return context is not None and context.abort_reason() is not None

        t0 = time.monotonic()
        log.warning("model server unreachable: waiting up to %.0f s for it before the next job",
                    self.settings.triton_wait_s)  # fmt: skip
        back = wait(self.settings.triton_wait_s, stop)
        log.info("model server %s after %.1f s", "is back" if back else "still unreachable",
                 time.monotonic() - t0)  # fmt: skip


def _free_gpu_memory() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _make_runner_when_reachable(settings, interval_s: float = 1.0) -> Runner:
    """:func:`make_runner`, waiting up to ``triton_wait_s`` for a model server that is not up
    yet (workers and Triton started together, Triton restarting); other errors at once."""
    deadline = time.monotonic() + settings.triton_wait_s
    while True:
        try:
            return make_runner(settings)
        except Exception as exc:
            if getattr(exc, "retry_reason", None) != "unavailable" or time.monotonic() > deadline:
                raise
            log.warning("model server not reachable yet, retrying: %s", one_line(exc))
            time.sleep(interval_s)


def default_worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def run_worker(settings) -> None:
    """Load the runner once, then process jobs until SIGTERM / SIGINT (module docstring)."""
    url = settings.require_database()
    name = settings.worker_name or default_worker_name()
    db.migrate(url)
    storage = open_storage(settings)
    storage.check()
    log.info("loading runner", extra={"settings": settings.describe(), "worker": name})
    runner = _make_runner_when_reachable(settings)
    if settings.worker_metrics_port:
        from prometheus_client import start_http_server

        start_http_server(settings.worker_metrics_port, addr=settings.host)
    pool = db.make_pool(url, max_size=3, name=f"worker-{name}")
    executor = JobExecutor(settings, runner, storage, pool, name)
    app = queue.make_app(settings, executor, asynchronous=True)
    try:
        asyncio.run(_serve(app, settings, pool, name))
    finally:
        pool.close()
    log.info("worker stopped")


async def _serve(app, settings, pool, name: str) -> None:
    async with app.open_async():
        sweeper = asyncio.create_task(queue.sweep_forever(app, settings, pool))
        log.info("worker ready", extra={"queue": settings.queue, "worker": name})
        try:
            while not await _run_until_pruned(app, settings, name):
                # A heartbeat arrived later than stalled_after_s (a starved CPU, a long GC
                # pause): another worker declared this one stalled, put its job back and
                # deleted its registration. Register again instead of crashing; the job's
                # lease keeps this worker from writing to the job it lost.
                log.warning(
                    "this worker was declared stalled (no heartbeat for %.1f s) and "
                    "unregistered; registering again", settings.stalled_after_s,
                    extra={"worker": name},
                )  # fmt: skip
        finally:
            sweeper.cancel()
            try:
                await sweeper
            except (asyncio.CancelledError, pexc.ProcrastinateException):
                pass


def _unregistered(exc: BaseException) -> bool:
    """Is ``exc`` procrastinate failing because this worker's row was pruned?"""
    cause = exc.__cause__
    return (
        isinstance(exc, pexc.ConnectorException)
        and type(cause).__name__ == "ForeignKeyViolation"
        and "worker_id" in str(cause)
    )


async def _run_until_pruned(app, settings, name: str) -> bool:
    """Run procrastinate's worker; True when it stopped normally (shutdown), False when its
    registration was pruned under it (see :func:`_serve`)."""
    try:
        await app.run_worker_async(
            queues=[settings.queue],
            name=name,
            concurrency=1,
            wait=True,
            listen_notify=True,
            fetch_job_polling_interval=settings.poll_interval_s,
            abort_job_polling_interval=settings.poll_interval_s,
            shutdown_graceful_timeout=settings.shutdown_grace_s,
            update_heartbeat_interval=settings.heartbeat_s,
            stalled_worker_timeout=settings.stalled_after_s,
            install_signal_handlers=True,
            delete_jobs="never",
        )
    except pexc.ConnectorException as exc:
        if _unregistered(exc):
            return False
        raise
    return True
