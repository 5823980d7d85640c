"""``lipsync serve worker``: takes jobs off the queue and runs them, one at a time.

The thing that runs a job is pluggable (:func:`make_runner`): an object with
``run(video, audio, out, progress=None, **options) -> RunReport``, loaded once per worker:

* ``engine`` -- the in-process model, loaded with the settings' ``load_options()`` (preset,
  device, dtype, compile, FP8, …: :func:`lipsync.loading.load_models`);
* ``triton`` -- a Triton Inference Server at ``triton_url`` (``lipsync.serving.triton.client``);
* ``module:factory`` -- any callable taking the settings (tests inject failures this way).

One attempt (:meth:`JobExecutor.__call__`): claim the job row under a fresh lease, fetch the
inputs, run, check for a cancel, store the result under ``results/<job id>.mp4``, then record
the outcome -- succeeded, or the error classified (:func:`lipsync.serving.queue.decide`) -- on
the row and its queue entry in one transaction (:func:`lipsync.serving.queue.record`), trying
again until the database answers. Progress is written to the row between chunks, and that is
where a cancel (or a shutdown) is noticed. Scratch files live in this process's own folder
(:mod:`lipsync.serving.scratch`), which the next worker removes if this one is killed.

The loop around it -- registration, heartbeats, fetching, signals, database outages -- is
:mod:`lipsync.serving.consumer`. Signals: on SIGTERM / SIGINT the worker stops taking jobs and
lets the running one finish for up to ``shutdown_grace_s`` seconds; past that it *releases* it:
the run stops at the next chunk and the job goes back to the queue at once (not counted as a
failure), then the worker exits 0. A second signal exits immediately; the job is then recovered
as a lost one (``stalled_after_s``).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import shutil
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Protocol

from lipsync.errors import ConfigError, one_line
from lipsync.pipeline import Progress, RunReport
from lipsync.progress import weighted_fraction
from lipsync.serving import consumer, db, metrics, outage, probes, queue, scratch
from lipsync.serving.consumer import Attempt
from lipsync.serving.logs import job_context
from lipsync.serving.outage import Health
from lipsync.serving.scratch import Scratch
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
    ``progress_interval_s``; skipped while the database is down) and raises to stop the run
    when the job was cancelled, the worker is shutting down, or the attempt lost its lease."""

    def __init__(self, executor: JobExecutor, attempt: Attempt, lease: str):
        self.executor = executor
        self.attempt = attempt
        self.job_id = attempt.job_id
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
        if self.attempt.stopping():
            raise queue.Released("the worker is shutting down")
        now = time.monotonic()
        if not force and now - self._last < self.executor.settings.progress_interval_s:
            return
        self._last = now
        row = self.executor.write_progress(self.job_id, self.lease, self.fraction(), self.stage)
        if row is False:  # the database is down: keep computing, write again later
            return
        if row is None:
            raise queue.LeaseLost("another attempt owns this job now")
        if row["cancel_requested"]:
            raise queue.JobCancelled("cancelled by the user")


class JobExecutor:
    """Runs one attempt of a job and records how it ended (module docstring)."""

    def __init__(self, settings, runner: Runner, storage: Storage, name: str, health: Health,
                 scratch: Scratch):  # fmt: skip
        self.settings = settings
        self.runner = runner
        self.storage = storage
        self.name = name
        self.health = health
        self.scratch = scratch
        self.link = db.Link(
            settings.require_database(), timeout_s=settings.db_timeout_s, name=f"lipsync job {name}"
        )
        self._paths: dict[str, str] = {}

    def __call__(self, attempt: Attempt) -> str:
        with job_context(job_id=attempt.job_id, queue_job_id=attempt.queue_job_id,
                         worker=self.name):  # fmt: skip
            return self.execute(attempt)

    def close(self) -> None:
        self.link.close()

    def _db(self, what: str, fn):
        """``fn(conn)`` in one transaction, tried again through database outages."""

        return outage.retry(lambda: self.link.run(fn), self.health, what)

    def write_progress(self, job_id: str, lease: str, fraction: float, stage: str):
        """The row's ``{cancel_requested}``, None when the lease is lost, False when the
        database is down (nothing written)."""
        if self.health.down:
            return False
        try:
            row = self.link.run(lambda c: db.update_progress(c, job_id, lease, fraction, stage))
        except Exception as exc:
            if not outage.is_outage(exc):
                raise
            self.health.failed(exc, "progress")
            return False
        self.health.ok()
        return row

    def execute(self, attempt: Attempt) -> str:
        """One attempt: claim, run, record the outcome; returns what happened (``succeeded``,
        ``retry``, ``failed``, ``cancelled``, ``lost``, or why it did not run)."""
        job_id, queue_job_id = attempt.job_id, attempt.queue_job_id
        lease = uuid.uuid4().hex
        self._paths = {}
        row = self._db("claim", lambda c: db.claim(c, job_id, lease, self.name))
        if row is None or not row["claimed"]:
            return self._not_run(job_id, queue_job_id, row)

        log.info("attempt %d started", row["attempts"], extra={"attempt": row["attempts"]})
        metrics.JOBS_IN_PROGRESS.inc()
        t0 = time.monotonic()
        work = self.scratch.mkdtemp(prefix=f"job-{job_id[:8]}-")
        label = "error"
        try:
            decision = None
            try:
                outcome = self._attempt(attempt, lease, row, work)
            except queue.JobCancelled:
                outcome = queue.Outcome("cancelled")
            except queue.Released:
                outcome = queue.Outcome(
                    "retry", kind="released", count_failure=False, event="released",
                    reason="released by a worker that shut down; queued again",
                )  # fmt: skip
            except queue.LeaseLost:
                outcome = None
            except outage.DatabaseUnavailable:
                raise
            except Exception as exc:
                decision = self._decide(exc, row)
                outcome = decision.outcome()
                if decision.kind == "oom":
                    _free_gpu_memory()
            written = None
            if outcome is not None:
                written = self._db(
                    "record the outcome",
                    lambda c: queue.record(c, job_id, queue_job_id, lease, outcome),
                )  # fmt: skip
            label = self._report(written, outcome, decision, row)
        finally:
            metrics.JOBS_IN_PROGRESS.dec()
            metrics.JOB_SECONDS.labels(outcome=label).observe(time.monotonic() - t0)
            metrics.update_gpu_memory()
            shutil.rmtree(work, ignore_errors=True)
        if decision is not None and decision.kind == "unavailable" and label == "retry":
            self._wait_for_model_server(attempt)
        return label

    def _not_run(self, job_id: str, queue_job_id: int, row: dict | None) -> str:
        """The row is missing, finished, or was cancelled before it started: end the queue
        entry accordingly."""
        if row is None:
            log.error("job row %s does not exist; dropping the queue entry", job_id)
            self._db("end the queue entry", lambda c: db.queue_finish(c, queue_job_id, "failed"))
            return "missing"
        if row["status"] in db.TERMINAL:
            log.info("job already %s; nothing to do", row["status"])
            end = queue.QUEUE_END[row["status"]]
            self._db("end the queue entry", lambda c: db.queue_finish(c, queue_job_id, end))
            return row["status"]

        def cancel(conn) -> None:  # cancel requested before it started
            db.finish_cancelled(conn, job_id, None)
            db.queue_finish(conn, queue_job_id, "aborted")

        self._db("cancel", cancel)
        log.info("job cancelled before it started")
        return "cancelled"

    def _report(self, written: dict | None, outcome, decision, row: dict) -> str:
        """Logs and metrics for an outcome as it was written; returns its label."""
        if written is None:
            log.error("lease lost: another attempt took over this job; dropping this one")
            return "lost"
        status = written["status"]
        if status == "cancelled":
            if outcome.result_key:  # the cancel came in while the result was being stored
                self.storage.delete(outcome.result_key)
            metrics.JOBS_CANCELLED.inc()
            log.info("job cancelled while running; nothing published")
            return "cancelled"
        if status == "succeeded":
            frames = (written["report"] or {}).get("frames") or 0
            metrics.JOBS_SUCCEEDED.inc()
            metrics.FRAMES.inc(frames)
            metrics.JOB_LATENCY.observe((db.now() - written["created_at"]).total_seconds())
            log.info("job succeeded: %s", written["result_key"], extra={"frames": frames})
            return "succeeded"
        if decision is None:  # released
            log.info("worker shutting down: job released back to the queue")
            return "released"
        if status == "queued":
            metrics.JOB_RETRIES.labels(reason=decision.kind).inc()
            log.warning(
                "attempt %d failed, retry in %.1f s: %s", row["attempts"], decision.retry_in_s,
                decision.reason, exc_info=decision.kind == "internal",
            )  # fmt: skip
            return "retry"
        metrics.JOB_FAILURES.labels(reason=decision.kind).inc()
        log.warning(
            "job failed: %s", decision.reason, exc_info=decision.kind == "internal",
            extra={"error_kind": decision.error_kind},
        )  # fmt: skip
        return "failed"

    def _local(self, key: str, work: Path, name: str) -> Path:
        direct = self.storage.local_path(key)
        if direct is not None:
            return direct
        dest = work / f"{name}{Path(key).suffix}"
        self.storage.get_file(key, dest)
        return dest

    def _attempt(self, attempt: Attempt, lease: str, row: dict, work: Path) -> queue.Outcome:
        video = self._local(row["video_key"], work, "video")
        audio = (
            video if row["audio_key"] == row["video_key"]
            else self._local(row["audio_key"], work, "audio")
        )  # fmt: skip
        self._paths = {str(audio): "the audio file", str(video): "the video file", str(work): "…"}
        out = work / "result.mp4"
        options = dict(row["options"] or {})
        options.setdefault("chunk_frames", self.settings.chunk_frames)
        progress = JobProgress(self, attempt, lease)
        report = self.runner.run(video, audio, out, progress=progress, **options)
        progress.check(force=True)  # a cancel that came during encoding: publish nothing

        result_key = f"results/{attempt.job_id}.mp4"
        self.storage.put_file(result_key, out)
        summary = report.as_dict() if hasattr(report, "as_dict") else dict(report)
        summary.update(output=None, chunk_frames=options["chunk_frames"])
        return queue.Outcome("succeeded", result_key=result_key, report=summary)

    def _decide(self, exc: Exception, row: dict) -> queue.Decision:
        """:func:`queue.decide`, with our local paths replaced by what they mean to the user."""
        decision = queue.decide(self.settings, exc, row)
        reason = decision.reason
        for path, name in self._paths.items():
            reason = reason.replace(path, name)
        return dataclasses.replace(decision, reason=reason)

    def _wait_for_model_server(self, attempt: Attempt) -> None:
        """The model server (Triton) was unreachable: take no other job until it is back (or
        ``triton_wait_s`` passed, or the worker is stopping), rather than failing one queued
        job after another. The failed job itself is already queued again, with its backoff."""
        wait = getattr(self.runner, "wait_until_ready", None)
        if wait is None or self.settings.triton_wait_s <= 0:
            return
        t0 = time.monotonic()
        log.warning("model server unreachable: waiting up to %.0f s for it before the next job",
                    self.settings.triton_wait_s)  # fmt: skip
        back = wait(self.settings.triton_wait_s, attempt.stopping)
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
    consumer.check_settings(settings)
    health = outage.Health(settings)
    outage.retry(lambda: db.migrate(url), health, "migrate")
    storage = open_storage(settings)
    storage.check()
    log.info("loading runner", extra={"settings": settings.describe(), "worker": name})
    runner = _make_runner_when_reachable(settings)
    work = Scratch(settings.work_dir, "worker")
    scratch.purge_orphans(settings.work_dir)
    executor = JobExecutor(settings, runner, storage, name, health, work)
    loop = consumer.Consumer(settings, executor, name, health)
    if settings.worker_metrics_port:
        probes.serve(settings.host, settings.worker_metrics_port, loop.alive, loop.ready)
    try:
        loop.run()
    except outage.DatabaseUnavailable as exc:
        _give_up(exc)
    finally:
        executor.close()
        work.close()
    log.info("worker stopped")


def _give_up(exc: outage.DatabaseUnavailable) -> None:
    """Exit with code 3 at once: a job thread may still be inside native code (torch,
    MediaPipe), which the interpreter's normal shutdown would abort on."""
    log.error("giving up: %s", exc)
    print(f"error: {exc}", file=sys.stderr, flush=True)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(exc.exit_code)
