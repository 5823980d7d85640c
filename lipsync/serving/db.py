"""Our tables (``lipsync_api_keys``, ``lipsync_jobs``) and every query on them.

The job row is what users see: status (queued → running → succeeded | failed | cancelled, and
back to queued between retries), progress, attempts, the error reason, the result's storage key.
Delivery itself (who runs what, when, retries) is procrastinate's ``procrastinate_jobs``
(:mod:`lipsync.serving.queue`); ``queue_job_id`` links the two, and a job row and its queue entry
are inserted in one transaction.

:func:`migrate` creates / upgrades both schemas at start-up, idempotently and safely when several
processes start at once (a PostgreSQL advisory lock serialises them).

Every running attempt holds a random ``lease``; a worker's progress and final writes only apply
while its lease is current, so an attempt that was given up on (its worker stopped heartbeating)
cannot overwrite the attempt that replaced it.

The queue's side (procrastinate's tables) is read and moved here too, through procrastinate's
own SQL (``procrastinate.sql.queries``: the functions of the schema it installed), so that a job
row and its queue entry change in one transaction: an attempt's outcome, a recovered job.

Workers talk to the database through :class:`Link` objects (one connection each, reopened after it
broke); the API through a pool (:func:`make_pool`).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import psycopg
from procrastinate.sql import queries as pq
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

T = TypeVar("T")

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
ACTIVE = ("queued", "running")
TERMINAL = ("succeeded", "failed", "cancelled")
_MIGRATION_LOCK = 0x6C697073796E63  # "lipsync": pg_advisory_lock key for migrations

MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        """
        CREATE TABLE lipsync_api_keys (
            id bigserial PRIMARY KEY,
            name text NOT NULL,
            prefix text NOT NULL,
            key_hash text NOT NULL UNIQUE,
            max_concurrency integer CHECK (max_concurrency >= 1),
            quota integer CHECK (quota >= 1),
            created_at timestamptz NOT NULL DEFAULT now(),
            revoked_at timestamptz
        );
        CREATE TABLE lipsync_jobs (
            id uuid PRIMARY KEY,
            key_id bigint NOT NULL REFERENCES lipsync_api_keys(id),
            status text NOT NULL
                CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
            options jsonb NOT NULL DEFAULT '{}',
            video_key text NOT NULL,
            audio_key text NOT NULL,
            result_key text,
            report jsonb,
            error text,
            error_kind text,
            attempts integer NOT NULL DEFAULT 0,
            failures integer NOT NULL DEFAULT 0,
            max_attempts integer NOT NULL,
            idempotency_key text,
            queue_job_id bigint,
            lease text,
            worker text,
            progress real NOT NULL DEFAULT 0,
            stage text,
            cancel_requested boolean NOT NULL DEFAULT false,
            history jsonb NOT NULL DEFAULT '[]',
            created_at timestamptz NOT NULL DEFAULT now(),
            updated_at timestamptz NOT NULL DEFAULT now(),
            started_at timestamptz,
            finished_at timestamptz,
            retry_at timestamptz,
            UNIQUE (key_id, idempotency_key)
        );
        CREATE INDEX lipsync_jobs_key_created ON lipsync_jobs (key_id, created_at DESC);
        CREATE INDEX lipsync_jobs_active ON lipsync_jobs (key_id)
            WHERE status IN ('queued', 'running');
        CREATE INDEX lipsync_jobs_queue_job ON lipsync_jobs (queue_job_id);
        """,
    ),
]


def connect(url: str, **kwargs: Any) -> psycopg.Connection:
    return psycopg.connect(url, row_factory=dict_row, **kwargs)


# TCP keepalives: a connection to a server that vanished (no FIN, no RST) fails within ~25 s
# instead of hanging for the kernel's ~15 minutes
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
              "keepalives_count": 3}  # fmt: skip


def make_pool(url: str, max_size: int = 8, name: str = "lipsync", timeout_s: float = 10.0):
    """A psycopg connection pool (dict rows) that checks connections before handing them out.

    ``timeout_s`` bounds both the wait for a connection and each reconnection round: after an
    outage the pool gives a lost connection up within that time and opens a fresh one on the
    next request, instead of backing off for minutes (psycopg_pool's default is 5 minutes)."""
    from psycopg_pool import ConnectionPool

    return ConnectionPool(
        url,
        min_size=1,
        max_size=max_size,
        kwargs={"row_factory": dict_row, "connect_timeout": max(1, round(timeout_s)),
                **KEEPALIVES},
        check=ConnectionPool.check_connection,
        name=name,
        open=True,
        timeout=timeout_s,
        reconnect_timeout=max(timeout_s, 1.0),
    )  # fmt: skip


class Link:
    """One autocommit connection, opened on first use and opened again after it broke.

    No pool and no backoff of its own: a caller that hits an outage decides how long to wait
    (:func:`lipsync.serving.outage.retry`), and the next call connects at once. One thread
    per link."""

    def __init__(self, url: str, *, timeout_s: float = 5.0, name: str = "lipsync"):
        self.url = url
        self.timeout_s = timeout_s
        self.name = name
        self.fresh = False  # the current connection was opened by the current call
        self._conn: psycopg.Connection | None = None

    def connection(self) -> psycopg.Connection:
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            self.close()
            self.fresh = True
            conn = psycopg.connect(
                self.url, autocommit=True, row_factory=dict_row,
                connect_timeout=max(1, round(self.timeout_s)), application_name=self.name[:63],
                **KEEPALIVES,
            )  # fmt: skip
            self._conn = conn
        return conn

    @contextmanager
    def transaction(self) -> Iterator[psycopg.Connection]:
        """The connection inside one transaction (committed on success)."""
        conn = self.connection()
        try:
            with conn.transaction():
                yield conn
        except (psycopg.OperationalError, psycopg.InterfaceError):
            self.close()
            raise

    def run(self, fn: Callable[[psycopg.Connection], T]) -> T:
        """``fn(conn)`` in one transaction. A connection that died while it sat idle (the
        server restarted since its last use) is only found out when used: then ``fn`` runs
        once more on a fresh one before the failure counts."""
        self.fresh = False
        try:
            with self.transaction() as conn:
                return fn(conn)
        except (psycopg.OperationalError, psycopg.InterfaceError):
            if self.fresh:
                raise
        with self.transaction() as conn:
            return fn(conn)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: S110 - a broken connection may fail to close; drop it
                pass


def migrate(url: str) -> list[int]:
    """Create procrastinate's schema if absent and apply our pending migrations; returns the
    versions applied now (empty when up to date). Safe to call from many processes at once."""
    applied: list[int] = []
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK,))
        try:
            exists = conn.execute("SELECT to_regclass('procrastinate_jobs')").fetchone()[0]
            if exists is None:
                from procrastinate.schema import SchemaManager

                with conn.transaction():
                    conn.execute(SchemaManager.get_schema())
            conn.execute(
                "CREATE TABLE IF NOT EXISTS lipsync_schema ("
                "version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r[0] for r in conn.execute("SELECT version FROM lipsync_schema").fetchall()}
            for version, sql in MIGRATIONS:
                if version in done:
                    continue
                with conn.transaction():
                    conn.execute(sql)
                    conn.execute("INSERT INTO lipsync_schema (version) VALUES (%s)", (version,))
                applied.append(version)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK,))
    return applied


@contextmanager
def transaction(pool) -> Iterator[psycopg.Connection]:
    """A pooled connection inside one transaction (committed on success)."""
    with pool.connection() as conn, conn.transaction():
        yield conn


def now() -> datetime:
    return datetime.now(UTC)


def _event(**fields: Any) -> Jsonb:
    fields = {k: v for k, v in fields.items() if v is not None}
    fields.setdefault("at", now().isoformat())
    return Jsonb([fields])


# -- API side ----------------------------------------------------------------------------------


def new_job_id() -> str:
    return str(uuid.uuid4())


def insert_job(
    conn: psycopg.Connection,
    *,
    job_id: str,
    key_id: int,
    options: dict,
    video_key: str,
    audio_key: str,
    max_attempts: int,
    idempotency_key: str | None,
) -> dict:
    return conn.execute(
        """
        INSERT INTO lipsync_jobs (id, key_id, status, options, video_key, audio_key,
                                  max_attempts, idempotency_key, history)
        VALUES (%s, %s, 'queued', %s, %s, %s, %s, %s, %s)
        RETURNING *
        """,
        (
            job_id, key_id, Jsonb(options), video_key, audio_key, max_attempts,
            idempotency_key, _event(event="queued"),
        ),
    ).fetchone()  # fmt: skip


def lock_key(conn: psycopg.Connection, key_id: int) -> None:
    """Serialise one key's submissions until the transaction ends (limits, idempotency)."""
    conn.execute("SELECT id FROM lipsync_api_keys WHERE id = %s FOR UPDATE", (key_id,))


def set_queue_job_id(conn: psycopg.Connection, job_id: str, queue_job_id: int) -> None:
    conn.execute("UPDATE lipsync_jobs SET queue_job_id = %s WHERE id = %s", (queue_job_id, job_id))


def get_job(conn: psycopg.Connection, job_id: str, key_id: int | None = None, lock=False):
    try:
        uuid.UUID(str(job_id))
    except ValueError:
        return None
    sql = "SELECT * FROM lipsync_jobs WHERE id = %s"
    args: list[Any] = [job_id]
    if key_id is not None:
        sql += " AND key_id = %s"
        args.append(key_id)
    if lock:
        sql += " FOR UPDATE"
    return conn.execute(sql, args).fetchone()


def find_idempotent(conn: psycopg.Connection, key_id: int, idempotency_key: str):
    return conn.execute(
        "SELECT * FROM lipsync_jobs WHERE key_id = %s AND idempotency_key = %s",
        (key_id, idempotency_key),
    ).fetchone()


def list_jobs(
    conn: psycopg.Connection, key_id: int, limit: int = 50, status: str | None = None,
    before: datetime | None = None,
) -> list[dict]:  # fmt: skip
    return conn.execute(
        """
        SELECT * FROM lipsync_jobs
         WHERE key_id = %(key)s
           AND (%(status)s::text IS NULL OR status = %(status)s)
           AND (%(before)s::timestamptz IS NULL OR created_at < %(before)s)
         ORDER BY created_at DESC, id
         LIMIT %(limit)s
        """,
        {"key": key_id, "status": status, "before": before, "limit": limit},
    ).fetchall()


def count_active(conn: psycopg.Connection, key_id: int) -> int:
    return conn.execute(
        "SELECT count(*) AS n FROM lipsync_jobs WHERE key_id = %s "
        "AND status IN ('queued', 'running')",
        (key_id,),
    ).fetchone()["n"]


def count_recent(conn: psycopg.Connection, key_id: int, hours: float = 24) -> int:
    return conn.execute(
        "SELECT count(*) AS n FROM lipsync_jobs WHERE key_id = %s "
        "AND created_at > now() - make_interval(secs => %s)",
        (key_id, hours * 3600),
    ).fetchone()["n"]


def mark_cancelled(conn: psycopg.Connection, job_id: str, reason: str) -> dict:
    return conn.execute(
        """
        UPDATE lipsync_jobs
           SET status = 'cancelled', cancel_requested = true, finished_at = now(),
               updated_at = now(), lease = NULL, error = %s, error_kind = 'cancelled',
               history = history || %s
         WHERE id = %s
        RETURNING *
        """,
        (reason, _event(event="cancelled", reason=reason), job_id),
    ).fetchone()


def request_cancel(conn: psycopg.Connection, job_id: str) -> dict:
    return conn.execute(
        "UPDATE lipsync_jobs SET cancel_requested = true, updated_at = now(), "
        "history = history || %s WHERE id = %s RETURNING *",
        (_event(event="cancel_requested"), job_id),
    ).fetchone()


def status_counts(conn: psycopg.Connection) -> dict[str, int]:
    rows = conn.execute("SELECT status, count(*) AS n FROM lipsync_jobs GROUP BY status")
    counts = dict.fromkeys(STATUSES, 0)
    counts.update({r["status"]: r["n"] for r in rows.fetchall()})
    return counts


# -- worker side -------------------------------------------------------------------------------


def claim(conn: psycopg.Connection, job_id: str, lease: str, worker: str) -> dict | None:
    """Start an attempt: the row becomes ``running`` under ``lease``. Returns the row as it was
    before (status included) when it cannot run (finished, cancelled, missing), else the
    updated row with ``claimed`` = True."""
    row = conn.execute("SELECT * FROM lipsync_jobs WHERE id = %s FOR UPDATE", (job_id,)).fetchone()
    if row is None:
        return None
    if row["status"] in TERMINAL or row["cancel_requested"]:
        return {**row, "claimed": False}
    attempt = row["attempts"] + 1
    new = conn.execute(
        """
        UPDATE lipsync_jobs
           SET status = 'running', lease = %s, worker = %s, attempts = %s, progress = 0,
               stage = NULL, retry_at = NULL, updated_at = now(),
               started_at = COALESCE(started_at, now()),
               history = history || %s
         WHERE id = %s
        RETURNING *
        """,
        (
            lease, worker, attempt,
            _event(event="started", attempt=attempt, worker=worker,
                   chunk_frames=row["options"].get("chunk_frames")),
            job_id,
        ),
    ).fetchone()  # fmt: skip
    return {**new, "claimed": True}


def update_progress(
    conn: psycopg.Connection, job_id: str, lease: str, progress: float, stage: str
) -> dict | None:
    """Write progress; returns ``{cancel_requested}`` or None when the lease is no longer ours."""
    return conn.execute(
        "UPDATE lipsync_jobs SET progress = %s, stage = %s, updated_at = now() "
        "WHERE id = %s AND lease = %s RETURNING cancel_requested",
        (progress, stage, job_id, lease),
    ).fetchone()


def cancel_requested(conn: psycopg.Connection, job_id: str) -> bool:
    row = conn.execute(
        "SELECT cancel_requested FROM lipsync_jobs WHERE id = %s", (job_id,)
    ).fetchone()
    return bool(row and row["cancel_requested"])


def finish_succeeded(
    conn: psycopg.Connection, job_id: str, lease: str, result_key: str, report: dict
) -> dict | None:
    """Publish the result; None if the lease was lost or a cancel came in first."""
    return conn.execute(
        """
        UPDATE lipsync_jobs
           SET status = 'succeeded', result_key = %s, report = %s, progress = 1,
               stage = 'done', error = NULL, error_kind = NULL, lease = NULL,
               finished_at = now(), updated_at = now(), history = history || %s
         WHERE id = %s AND lease = %s AND NOT cancel_requested
        RETURNING *
        """,
        (result_key, Jsonb(report), _event(event="succeeded"), job_id, lease),
    ).fetchone()


def finish_retry(
    conn: psycopg.Connection, job_id: str, lease: str | None, *, kind: str, reason: str,
    retry_in_s: float, options: dict | None = None, count_failure: bool = True,
    event: str = "retry",
) -> dict | None:  # fmt: skip
    """Back to ``queued`` for another attempt in ``retry_in_s`` seconds (``lease`` None: the
    stalled-job sweeper, which owns the row by then)."""
    return conn.execute(
        """
        UPDATE lipsync_jobs
           SET status = 'queued', error = %(reason)s, error_kind = %(kind)s, lease = NULL,
               failures = failures + %(inc)s,
               options = COALESCE(%(options)s, options),
               retry_at = now() + make_interval(secs => %(delay)s), updated_at = now(),
               history = history || %(event)s
         WHERE id = %(id)s AND status = 'running'
           AND (%(lease)s::text IS NULL OR lease = %(lease)s)
        RETURNING *
        """,
        {
            "reason": reason, "kind": kind, "inc": 1 if count_failure else 0,
            "options": Jsonb(options) if options is not None else None, "delay": retry_in_s,
            "event": _event(event=event, error_kind=kind, error=reason, retry_in_s=retry_in_s),
            "id": job_id, "lease": lease,
        },
    ).fetchone()  # fmt: skip


def finish_failed(
    conn: psycopg.Connection, job_id: str, lease: str | None, *, kind: str, reason: str,
    count_failure: bool = True,
) -> dict | None:  # fmt: skip
    return conn.execute(
        """
        UPDATE lipsync_jobs
           SET status = 'failed', error = %(reason)s, error_kind = %(kind)s, lease = NULL,
               failures = failures + %(inc)s, finished_at = now(), updated_at = now(),
               history = history || %(event)s
         WHERE id = %(id)s AND status IN ('running', 'queued')
           AND (%(lease)s::text IS NULL OR lease = %(lease)s)
        RETURNING *
        """,
        {
            "reason": reason, "kind": kind, "inc": 1 if count_failure else 0,
            "event": _event(event="failed", error_kind=kind, error=reason),
            "id": job_id, "lease": lease,
        },
    ).fetchone()  # fmt: skip


def finish_cancelled(conn: psycopg.Connection, job_id: str, lease: str | None) -> dict | None:
    return conn.execute(
        """
        UPDATE lipsync_jobs
           SET status = 'cancelled', lease = NULL, finished_at = now(), updated_at = now(),
               error = 'cancelled by the user', error_kind = 'cancelled',
               history = history || %s
         WHERE id = %s AND status IN ('running', 'queued')
           AND (%s::text IS NULL OR lease = %s)
        RETURNING *
        """,
        (_event(event="cancelled"), job_id, lease, lease),
    ).fetchone()


def requeue(
    conn: psycopg.Connection, job_id: str, *, queue_job_id: int, kind: str, reason: str,
    count_failure: bool,
) -> dict | None:  # fmt: skip
    """Back to ``queued`` under a new queue entry (the sweep's reconciliation)."""
    return conn.execute(
        """
        UPDATE lipsync_jobs
           SET status = 'queued', lease = NULL, queue_job_id = %(queue)s, error = %(reason)s,
               error_kind = %(kind)s, failures = failures + %(inc)s, retry_at = NULL,
               updated_at = now(), history = history || %(event)s
         WHERE id = %(id)s AND status IN ('queued', 'running')
        RETURNING *
        """,
        {
            "queue": queue_job_id, "reason": reason, "kind": kind,
            "inc": 1 if count_failure else 0,
            "event": _event(event="requeued", error_kind=kind, error=reason),
            "id": job_id,
        },
    ).fetchone()  # fmt: skip


def orphaned_jobs(conn: psycopg.Connection, limit: int = 100) -> list[dict]:
    """Rows still queued or running whose queue entry is missing or no longer ``todo`` /
    ``doing``: no worker will ever run them again (the sweep puts them back or fails them)."""
    return conn.execute(
        """
        SELECT j.id, j.status, j.queue_job_id, p.status::text AS queue_status
          FROM lipsync_jobs j
          LEFT JOIN procrastinate_jobs p ON p.id = j.queue_job_id
         WHERE j.status IN ('queued', 'running')
           AND (p.id IS NULL OR p.status NOT IN ('todo', 'doing'))
         ORDER BY j.updated_at
         LIMIT %s
        """,
        (limit,),
    ).fetchall()


# -- the queue: procrastinate's tables, through its own SQL ------------------------------------


def queue_status(conn: psycopg.Connection, queue_job_id: int | None) -> str | None:
    if queue_job_id is None:
        return None
    row = conn.execute(pq["get_job_status"], {"job_id": queue_job_id}).fetchone()
    return str(row["status"]) if row else None


def queue_finish(conn: psycopg.Connection, queue_job_id: int, status: str) -> bool:
    """End a queue entry (``succeeded``, ``failed``, ``aborted``); False (and nothing changed)
    when it was no longer waiting or running."""
    return _queue_call(conn, pq["finish_job"],
                       {"job_id": queue_job_id, "status": status, "delete_job": False})  # fmt: skip


def queue_retry(conn: psycopg.Connection, queue_job_id: int, delay_s: float) -> bool:
    """Put a running (or failed) queue entry back, runnable in ``delay_s`` seconds; False (and
    nothing changed) when it was in neither state."""
    params = {
        "job_id": queue_job_id, "retry_at": now() + timedelta(seconds=delay_s),
        "new_priority": None, "new_queue_name": None, "new_lock": None,
    }  # fmt: skip
    return _queue_call(conn, pq["retry_job"], params)


def _queue_call(conn: psycopg.Connection, query: str, params: dict) -> bool:
    try:
        with conn.transaction():  # a savepoint: the caller's transaction survives a refusal
            conn.execute(query, params)
    except psycopg.errors.RaiseException:  # procrastinate: "not in doing status" and the like
        return False
    return True


def register_worker(conn: psycopg.Connection) -> int:
    return int(conn.execute(pq["register_worker"]).fetchone()["worker_id"])


def unregister_worker(conn: psycopg.Connection, worker_id: int) -> None:
    conn.execute(pq["unregister_worker"], {"worker_id": worker_id})


def heartbeat(conn: psycopg.Connection, worker_id: int) -> bool:
    """Refresh the worker's heartbeat; False when its registration is gone (pruned as stalled
    by another worker)."""
    conn.execute(pq["update_heartbeat"], {"worker_id": worker_id})
    return (
        conn.execute("SELECT 1 FROM procrastinate_workers WHERE id = %s", (worker_id,)).fetchone()
        is not None
    )


def attach_job(conn: psycopg.Connection, queue_job_id: int, worker_id: int) -> bool:
    """Give a running queue entry whose worker registration was pruned back to that worker
    (registered again), unless someone else has taken it in the meantime."""
    return (
        conn.execute(
            "UPDATE procrastinate_jobs SET worker_id = %s "
            "WHERE id = %s AND status = 'doing' AND worker_id IS NULL RETURNING id",
            (worker_id, queue_job_id),
        ).fetchone()
        is not None
    )


def fetch_job(conn: psycopg.Connection, queue: str, worker_id: int) -> dict | None:
    """Take the next runnable queue entry (``FOR UPDATE SKIP LOCKED``), or None."""
    row = conn.execute(pq["fetch_job"], {"queues": [queue], "worker_id": worker_id}).fetchone()
    return row if row and row["id"] is not None else None


def own_running_jobs(conn: psycopg.Connection, worker_id: int) -> list[int]:
    """Queue entries ``doing`` on this worker (registration ``worker_id``)."""
    rows = conn.execute(
        "SELECT id FROM procrastinate_jobs WHERE worker_id = %s AND status = 'doing'",
        (worker_id,),
    )
    return [r["id"] for r in rows.fetchall()]


def stalled_jobs(
    conn: psycopg.Connection, queue: str, task_name: str, seconds: float
) -> list[dict]:
    """Running queue entries of workers silent for ``seconds`` (or unregistered)."""
    return conn.execute(
        pq["select_stalled_jobs_by_heartbeat"],
        {"queue": queue, "task_name": task_name, "seconds_since_heartbeat": seconds},
    ).fetchall()


def prune_workers(conn: psycopg.Connection, seconds: float) -> list[int]:
    rows = conn.execute(pq["prune_stalled_workers"], {"seconds_since_heartbeat": seconds})
    return [r["worker_id"] for r in rows.fetchall()]


def listen(conn: psycopg.Connection, channels) -> None:
    for channel in channels:
        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))


def try_lock(conn: psycopg.Connection, key: int) -> bool:
    """A session-level advisory lock, if free (released by :func:`unlock` or disconnecting)."""
    return bool(conn.execute("SELECT pg_try_advisory_lock(%s) AS ok", (key,)).fetchone()["ok"])


def unlock(conn: psycopg.Connection, key: int) -> None:
    conn.execute("SELECT pg_advisory_unlock(%s)", (key,))


def as_json(value: Any) -> Any:
    """Rows → JSON-safe values (UUIDs and datetimes as strings)."""
    return json.loads(json.dumps(value, default=str))
