"""The job queue: PostgreSQL through procrastinate, plus the service's retry and recovery rules.

Delivery (at least once)
    The API inserts the job row and its procrastinate job in one transaction
    (:func:`defer`); workers fetch with ``FOR UPDATE SKIP LOCKED`` and are woken by
    ``LISTEN/NOTIFY`` (and poll every ``poll_interval_s`` for scheduled retries).

Retries
    A failed attempt is classified (:func:`decide`):

    * a :class:`~lipsync.errors.LipSyncError` (bad input, no face, …) is the user's to fix:
      the job fails at once, no retry -- unless it says it is ``retryable`` (the Triton
      server unreachable or failing: :class:`~lipsync.serving.triton_client.TritonError`),
      which is retried like any other failure, labelled with its ``retry_reason``
      (``unavailable``, ``triton``); after an ``unavailable`` one the worker also waits for the
      server (``triton_wait_s``) before it takes another job;
    * CUDA out of memory: retried with ``chunk_frames`` halved (16 → 8 → 4 …), failing when
      even 1 frame per chunk does not fit;
    * anything else: retried;

    at most ``max_attempts`` failures, waiting ``retry_backoff_s × 2^(failures-1)`` (capped at
    ``retry_backoff_max_s``) before the next attempt. The last failure's reason stays on the
    job. The worker writes the decision to the job row and raises :class:`RetryLater` /
    :class:`FinalFailure`; :class:`RetryPolicy` hands the same decision to procrastinate.

Lost workers
    Workers heartbeat every ``heartbeat_s`` (procrastinate's ``procrastinate_workers``).
    Every ``sweep_interval_s`` each worker runs :func:`sweep_stalled`: jobs still ``doing`` on
    a worker silent for ``stalled_after_s`` (``JobManager.get_stalled_jobs``) are put back with
    ``JobManager.retry_job`` (counted as a failure, ``worker_lost``) or, past
    ``max_attempts``, failed. A PostgreSQL advisory lock lets one sweeper act at a time, so a
    job is never put back twice.

Cancellation
    :func:`cancel`: a queued job is cancelled in the queue at once; a running one gets
    ``abort_requested`` (procrastinate notifies its worker) and ``cancel_requested`` on the row;
    the worker checks both between chunks (the pipeline's Progress hook) and stops, publishing
    nothing.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import psycopg
from procrastinate import App, exceptions, jobs, retry

from lipsync.errors import LipSyncError, one_line
from lipsync.serving import db, metrics

log = logging.getLogger("lipsync.serving.queue")

TASK_NAME = "lipsync.run_job"
_SWEEP_LOCK = 0x6C697073796E64  # pg_advisory_lock key for the stalled-job sweep


class RetryLater(Exception):
    """Raised by a worker after it recorded a retry on the job row."""

    def __init__(self, reason: str, delay_s: float):
        super().__init__(reason)
        self.delay_s = delay_s


class FinalFailure(Exception):
    """Raised by a worker after it recorded the job as failed."""


class JobCancelled(exceptions.JobAborted):
    """The user cancelled the running job."""


class Released(exceptions.JobAborted):
    """The worker is shutting down and gave its job back (retried at once elsewhere)."""


class LeaseLost(exceptions.JobAborted):
    """Another attempt owns the job now (this worker was taken for dead)."""


class RetryPolicy(retry.BaseRetryStrategy):
    """Procrastinate's side of the decision the worker already took (module docstring)."""

    def get_retry_decision(
        self, *, exception: BaseException, job: jobs.Job
    ) -> retry.RetryDecision | None:
        if isinstance(exception, RetryLater):
            return retry.RetryDecision(retry_in={"seconds": exception.delay_s})
        if isinstance(exception, Released):
            return retry.RetryDecision(retry_in={"seconds": 0})
        return None


def is_oom(exc: BaseException) -> bool:
    """CUDA (or other accelerator) out of memory."""
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def backoff_s(settings, failures: int) -> float:
    """Delay before the attempt after the ``failures``-th failure (1-based)."""
    delay = settings.retry_backoff_s * 2 ** max(0, failures - 1)
    return float(min(delay, settings.retry_backoff_max_s))


@dataclass(frozen=True)
class Decision:
    kind: str  # metrics reason: user_error, oom, internal, worker_lost, unavailable, triton
    error_kind: str  # stored on the row: the exception class, or worker_lost / oom
    reason: str  # one line for the user
    retry_in_s: float | None  # None: fail now
    options: dict | None = None  # new job options for the next attempt


def decide(settings, exc: BaseException, row: dict) -> Decision:
    """What to do after attempt ``row['attempts']`` raised ``exc`` (module docstring)."""
    failures = row["failures"] + 1
    max_attempts = row["max_attempts"]
    retryable = bool(getattr(exc, "retryable", False))
    if isinstance(exc, LipSyncError) and not retryable:
        return Decision("user_error", type(exc).__name__, one_line(exc), None)
    options = dict(row["options"] or {})
    if is_oom(exc):
        chunk = int(options.get("chunk_frames") or settings.chunk_frames)
        if chunk <= 1:
            reason = "out of GPU memory even with 1 frame per chunk"
            return Decision("oom", "oom", reason, None)
        options["chunk_frames"] = max(1, chunk // 2)
        reason = f"out of GPU memory with {chunk} frames per chunk"
        if failures >= max_attempts:
            return Decision("oom", "oom", f"{reason} (after {failures} attempts)", None)
        return Decision(
            "oom", "oom", f"{reason}; retrying with {options['chunk_frames']}",
            backoff_s(settings, failures), options,
        )  # fmt: skip
    reason = f"{type(exc).__name__}: {one_line(exc)}"
    kind = str(getattr(exc, "retry_reason", "internal")) if retryable else "internal"
    if failures >= max_attempts:
        return Decision(
            kind, type(exc).__name__, f"failed after {failures} attempts: {reason}", None
        )
    return Decision(kind, type(exc).__name__, reason, backoff_s(settings, failures))


# -- the procrastinate app --------------------------------------------------------------------


def _not_here(context, job_id: str) -> None:  # pragma: no cover - the API never runs jobs
    raise RuntimeError("jobs run in `lipsync serve worker`, not in this process")


def make_app(settings, handler=None, *, asynchronous: bool = False) -> App:
    """The procrastinate app with our one task. The API defers through a synchronous connector
    (inside its own transactions); a worker runs ``handler(context, job_id)`` with the async one.
    """
    from procrastinate import PsycopgConnector, SyncPsycopgConnector

    url = settings.require_database()
    connector = (
        PsycopgConnector(conninfo=url, min_size=1, max_size=4)
        if asynchronous
        else SyncPsycopgConnector(conninfo=url, min_size=1, max_size=2)
    )
    app = App(connector=connector)
    app.task(
        name=TASK_NAME,
        queue=settings.queue,
        pass_context=True,
        retry=RetryPolicy(),
    )(handler or _not_here)
    return app


def defer(app: App, conn: psycopg.Connection, job_id: str) -> int:
    """Queue ``job_id`` inside ``conn``'s open transaction; returns the queue job's id."""
    deferrer = app.tasks[TASK_NAME].configure(connection=conn)
    return deferrer.defer(job_id=job_id)


def cancel(app: App, conn: psycopg.Connection, queue_job_id: int | None) -> str | None:
    """Cancel (queued) or ask to abort (running) within ``conn``'s transaction; returns the
    queue job's status afterwards (``cancelled`` when it will never run)."""
    if queue_job_id is None:
        return None
    app.job_manager.cancel_job_by_id(queue_job_id, abort=True, connection=conn)
    row = conn.execute(
        "SELECT status FROM procrastinate_jobs WHERE id = %s", (queue_job_id,)
    ).fetchone()
    return row["status"] if row else None


# -- lost workers ------------------------------------------------------------------------------


async def sweep_stalled(app: App, settings, pool) -> list[str]:
    """Put back (or fail) the jobs of workers that stopped heartbeating; returns the job ids
    handled. Only one process sweeps at a time (advisory lock); the others return at once."""
    handled: list[str] = []
    url = settings.require_database()
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as lock_conn:
        cur = await lock_conn.execute("SELECT pg_try_advisory_lock(%s)", (_SWEEP_LOCK,))
        if not (await cur.fetchone())[0]:
            return handled
        try:
            stalled = await app.job_manager.get_stalled_jobs(
                queue=settings.queue,
                task_name=TASK_NAME,
                seconds_since_heartbeat=settings.stalled_after_s,
            )
            for job in stalled:
                job_id = job.task_kwargs.get("job_id")
                action = await asyncio.to_thread(_recover_row, settings, pool, job_id)
                log.warning(
                    "worker of job %s stopped heartbeating: %s", job_id, action,
                    extra={"job_id": job_id, "queue_job_id": job.id, "action": action},
                )  # fmt: skip
                if action == "retry":
                    await app.job_manager.retry_job(job)
                    metrics.JOB_RETRIES.labels(reason="worker_lost").inc()
                elif action == "failed":
                    await app.job_manager.finish_job(job, jobs.Status.FAILED, delete_job=False)
                    metrics.JOB_FAILURES.labels(reason="worker_lost").inc()
                elif action == "cancelled":
                    await app.job_manager.finish_job(job, jobs.Status.ABORTED, delete_job=False)
                else:  # the row already finished: only the queue entry was left behind
                    await app.job_manager.finish_job(job, jobs.Status.SUCCEEDED, delete_job=False)
                handled.append(job_id)
            await app.job_manager.prune_stalled_workers(settings.stalled_after_s)
        finally:
            await lock_conn.execute("SELECT pg_advisory_unlock(%s)", (_SWEEP_LOCK,))
    return handled


def _recover_row(settings, pool, job_id: str | None) -> str:
    with db.transaction(pool) as conn:
        row = db.get_job(conn, job_id, lock=True) if job_id else None
        if row is None:
            return "failed"
        if row["status"] in db.TERMINAL:
            return "done"
        if row["cancel_requested"]:
            db.finish_cancelled(conn, job_id, None)
            return "cancelled"
        if row["status"] == "queued":  # died between fetching the job and starting it
            return "retry"
        failures = row["failures"] + 1
        reason = f"worker {row['worker']} stopped responding (attempt {row['attempts']})"
        if failures >= row["max_attempts"]:
            db.finish_failed(
                conn, job_id, None, kind="worker_lost",
                reason=f"{reason}; gave up after {failures} attempts",
            )  # fmt: skip
            return "failed"
        db.finish_retry(
            conn, job_id, None, kind="worker_lost", reason=reason, retry_in_s=0,
            event="worker_lost",
        )  # fmt: skip
        return "retry"


async def sweep_forever(app: App, settings, pool) -> None:
    """:func:`sweep_stalled` every ``sweep_interval_s`` and refresh the queue-depth gauges."""
    while True:
        await asyncio.sleep(settings.sweep_interval_s)
        try:
            await sweep_stalled(app, settings, pool)
            counts = await asyncio.to_thread(_status_counts, pool)
            metrics.set_status_counts(counts)
        except Exception as exc:  # keep sweeping: the database may come back
            log.error("stalled-job sweep failed: %s", one_line(exc), exc_info=exc)


def _status_counts(pool) -> dict[str, Any]:
    with pool.connection() as conn:
        return db.status_counts(conn)
