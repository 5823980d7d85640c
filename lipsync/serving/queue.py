"""The job queue: PostgreSQL through procrastinate, plus the service's retry and recovery rules.

Delivery (at least once)
    The API inserts the job row and its procrastinate job in one transaction
    (:func:`defer`); workers (:mod:`lipsync.serving.consumer`) fetch with ``FOR UPDATE SKIP
    LOCKED``, are woken by ``LISTEN/NOTIFY`` and poll every ``poll_interval_s`` (for scheduled
    retries, and while notifications are down).

Outcomes
    An attempt ends with an :class:`Outcome` that :func:`record` writes to the job row and its
    queue entry in **one transaction**, and only while the attempt's lease is current. A worker
    that cannot write it (the database is down) keeps trying (:func:`lipsync.serving.outage.retry`)
    instead of dropping it; so the row and the queue entry never disagree about a finished
    attempt.

Retries
    A failed attempt is classified (:func:`decide`):

    * a :class:`~lipsync.errors.LipSyncError` (bad input, no face, …) is the user's to fix:
      the job fails at once, no retry -- unless it says it is ``retryable`` (the Triton
      server unreachable or failing: :class:`~lipsync.serving.triton.client.TritonError`),
      which is retried like any other failure, labelled with its ``retry_reason``
      (``unavailable``, ``triton``); after an ``unavailable`` one the worker also waits for the
      server (``triton_wait_s``) before it takes another job;
    * CUDA out of memory: retried with ``chunk_frames`` halved (16 → 8 → 4 …), failing when
      even 1 frame per chunk does not fit;
    * anything else: retried;

    at most ``max_attempts`` failures, waiting ``retry_backoff_s × 2^(failures-1)`` (capped at
    ``retry_backoff_max_s``) before the next attempt. The last failure's reason stays on the
    job.

The sweep (:func:`sweep`, every ``sweep_interval_s`` in every worker; a PostgreSQL advisory
lock lets one process act at a time, so a job is never put back twice)
    * Lost workers: jobs still ``doing`` on a worker silent for ``stalled_after_s`` (or whose
      registration is gone) are put back (counted as a failure, ``worker_lost``) or, past
      ``max_attempts``, failed; then those workers' registrations are deleted. A sweeper only
      does this once its own connection has worked for ``stalled_after_s`` without a break:
      after a database outage every worker's heartbeat is old, and the live ones must have
      the time to beat again before anyone is declared dead.
    * Reconciliation: job rows still ``queued`` / ``running`` whose queue entry is missing or
      no longer ``todo`` / ``doing`` (nothing would ever run them) get a new queue entry
      (a ``running`` one counted as a failure, ``outcome_lost``), are failed past
      ``max_attempts``, or cancelled when a cancel was asked for.

Cancellation
    :func:`cancel`: a queued job is cancelled in the queue at once; a running one gets
    ``abort_requested`` and ``cancel_requested`` on the row; the worker reads the latter with
    every progress write (between chunks) and stops, publishing nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import psycopg
from procrastinate import App

from lipsync.errors import LipSyncError, one_line
from lipsync.serving import db, metrics

log = logging.getLogger("lipsync.serving.queue")

TASK_NAME = "lipsync.run_job"
SWEEP_LOCK = 0x6C697073796E64  # pg_advisory_lock key for the sweep


class JobCancelled(Exception):
    """The user cancelled the running job."""


class Released(Exception):
    """The worker is shutting down and gave its job back (retried at once elsewhere)."""


class LeaseLost(Exception):
    """Another attempt owns the job now (this worker was taken for dead)."""


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

    def outcome(self) -> Outcome:
        """The attempt's :class:`Outcome`: another try, or the end."""
        if self.retry_in_s is None:
            return Outcome("failed", kind=self.error_kind, reason=self.reason)
        return Outcome(
            "retry", kind=self.error_kind, reason=self.reason, retry_in_s=self.retry_in_s,
            options=self.options,
        )  # fmt: skip


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


@dataclass(frozen=True)
class Outcome:
    """How one attempt ended, as :func:`record` writes it."""

    status: Literal["succeeded", "retry", "failed", "cancelled"]
    kind: str | None = None  # error_kind on the row
    reason: str | None = None
    retry_in_s: float = 0.0
    options: dict | None = None  # new job options for the next attempt
    count_failure: bool = True
    event: str = "retry"  # the history event of a retry (retry, released)
    result_key: str | None = None
    report: dict | None = None


QUEUE_END = {"succeeded": "succeeded", "failed": "failed", "cancelled": "aborted"}


def record(
    conn: psycopg.Connection, job_id: str, queue_job_id: int, lease: str, outcome: Outcome
) -> dict | None:
    """Write ``outcome`` to the job row and its queue entry, in ``conn``'s transaction. Returns
    the row as written -- ``cancelled`` when a cancel came in first, whatever the outcome --
    or None when the lease is no longer ours (then nothing is written)."""
    row = db.get_job(conn, job_id, lock=True)
    if row is None or row["lease"] != lease or row["status"] != "running":
        return None
    if row["cancel_requested"]:
        outcome = Outcome("cancelled")
    if outcome.status == "succeeded":
        row = db.finish_succeeded(conn, job_id, lease, outcome.result_key, outcome.report or {})
    elif outcome.status == "retry":
        row = db.finish_retry(
            conn, job_id, lease, kind=outcome.kind, reason=outcome.reason,
            retry_in_s=outcome.retry_in_s, options=outcome.options,
            count_failure=outcome.count_failure, event=outcome.event,
        )  # fmt: skip
    elif outcome.status == "failed":
        row = db.finish_failed(conn, job_id, lease, kind=outcome.kind, reason=outcome.reason)
    else:
        row = db.finish_cancelled(conn, job_id, lease)
    if outcome.status == "retry":
        moved = db.queue_retry(conn, queue_job_id, outcome.retry_in_s)
    else:
        moved = db.queue_finish(conn, queue_job_id, QUEUE_END[outcome.status])
    if not moved:
        log.warning(
            "queue entry %s was no longer running; the sweep will reconcile job %s",
            queue_job_id, job_id,
        )  # fmt: skip
    return row


# -- the procrastinate app --------------------------------------------------------------------


def _not_here(job_id: str) -> None:  # pragma: no cover - jobs run in lipsync.serving.consumer
    raise RuntimeError("jobs run in `lipsync serve worker`, not through procrastinate's worker")


def make_app(settings) -> App:
    """The procrastinate app with our one task, for deferring jobs inside our own transactions
    (:func:`defer`; it is never opened, and never runs jobs)."""
    from procrastinate import SyncPsycopgConnector

    app = App(connector=SyncPsycopgConnector(conninfo=settings.require_database()))
    app.task(name=TASK_NAME, queue=settings.queue)(_not_here)
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
    return db.queue_status(conn, queue_job_id)


# -- the sweep ---------------------------------------------------------------------------------


def sweep(link: db.Link, settings, app: App, *, trust_heartbeats: bool) -> list[tuple[str, str]]:
    """One pass of the sweep (module docstring); returns ``(job id, action)`` for each job it
    moved. ``trust_heartbeats``: this process's own connection has worked for at least
    ``stalled_after_s``, so old heartbeats mean dead workers (else lost workers are left for
    a later pass). Only one process sweeps at a time; the others return at once."""
    conn = link.connection()
    if not db.try_lock(conn, SWEEP_LOCK):
        return []
    handled: list[tuple[str, str]] = []
    try:
        if trust_heartbeats:
            stalled = db.stalled_jobs(conn, settings.queue, TASK_NAME, settings.stalled_after_s)
            for job in stalled:
                job_id = (job["args"] or {}).get("job_id")
                with conn.transaction():
                    action = recover_stalled(conn, job_id, job["id"])
                log.warning(
                    "worker of job %s stopped heartbeating: %s", job_id, action,
                    extra={"job_id": job_id, "queue_job_id": job["id"], "action": action},
                )  # fmt: skip
                if action in ("retry", "failed"):
                    counter = metrics.JOB_RETRIES if action == "retry" else metrics.JOB_FAILURES
                    counter.labels(reason="worker_lost").inc()
                handled.append((job_id, action))
            db.prune_workers(conn, settings.stalled_after_s)
        for orphan in db.orphaned_jobs(conn):
            job_id = str(orphan["id"])
            with conn.transaction():
                action = reconcile(conn, app, job_id)
            if action:
                log.warning(
                    "job %s was %s but its queue entry %s; %s", job_id, orphan["status"],
                    orphan["queue_status"] or "is missing", action,
                    extra={"job_id": job_id, "queue_job_id": orphan["queue_job_id"],
                           "action": action},
                )  # fmt: skip
                metrics.JOBS_RECONCILED.labels(action=action).inc()
                handled.append((job_id, action))
    finally:
        if not (conn.closed or conn.broken):
            db.unlock(conn, SWEEP_LOCK)
    return handled


def recover_stalled(conn: psycopg.Connection, job_id: str | None, queue_job_id: int) -> str:
    """The job row and queue entry of a lost worker's job, moved together: ``retry``,
    ``failed``, ``cancelled`` or ``done`` (the row had finished; only the entry was left)."""
    row = db.get_job(conn, job_id, lock=True) if job_id else None
    if row is None:
        db.queue_finish(conn, queue_job_id, "failed")
        return "failed"
    if row["status"] in db.TERMINAL:
        db.queue_finish(conn, queue_job_id, QUEUE_END[row["status"]])
        return "done"
    if row["cancel_requested"]:
        db.finish_cancelled(conn, job_id, None)
        db.queue_finish(conn, queue_job_id, "aborted")
        return "cancelled"
    if row["status"] == "queued":  # died between fetching the job and starting it
        db.queue_retry(conn, queue_job_id, 0)
        return "retry"
    failures = row["failures"] + 1
    reason = f"worker {row['worker']} stopped responding (attempt {row['attempts']})"
    if failures >= row["max_attempts"]:
        db.finish_failed(
            conn, job_id, None, kind="worker_lost",
            reason=f"{reason}; gave up after {failures} attempts",
        )  # fmt: skip
        db.queue_finish(conn, queue_job_id, "failed")
        return "failed"
    db.finish_retry(
        conn, job_id, None, kind="worker_lost", reason=reason, retry_in_s=0, event="worker_lost"
    )
    db.queue_retry(conn, queue_job_id, 0)
    return "retry"


def reconcile(conn: psycopg.Connection, app: App, job_id: str) -> str | None:
    """A row that nothing will run any more (its queue entry ended or vanished): a new queue
    entry (``requeued``), ``failed`` past ``max_attempts``, or ``cancelled``. None when the row
    or its entry moved on in the meantime."""
    row = db.get_job(conn, job_id, lock=True)
    if row is None or row["status"] not in db.ACTIVE:
        return None
    queue_status = db.queue_status(conn, row["queue_job_id"])
    if queue_status in ("todo", "doing"):
        return None
    if row["cancel_requested"]:
        db.finish_cancelled(conn, job_id, None)
        return "cancelled"
    was_running = row["status"] == "running"
    reason = (
        f"the job's queue entry ended ({queue_status or 'missing'}) while the job was "
        f"{row['status']} (attempt {row['attempts']})"
    )
    if was_running and row["failures"] + 1 >= row["max_attempts"]:
        db.finish_failed(
            conn, job_id, None, kind="outcome_lost",
            reason=f"{reason}; gave up after {row['failures'] + 1} attempts",
        )  # fmt: skip
        return "failed"
    queue_job_id = defer(app, conn, job_id)
    db.requeue(
        conn, job_id, queue_job_id=queue_job_id, kind="outcome_lost", reason=reason,
        count_failure=was_running,
    )  # fmt: skip
    return "requeued"
