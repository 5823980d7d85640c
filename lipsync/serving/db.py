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
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

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


def make_pool(url: str, max_size: int = 8, name: str = "lipsync"):
    """A psycopg connection pool (dict rows) that checks connections before handing them out."""
    from psycopg_pool import ConnectionPool

    return ConnectionPool(
        url,
        min_size=1,
        max_size=max_size,
        kwargs={"row_factory": dict_row},
        check=ConnectionPool.check_connection,
        name=name,
        open=True,
        timeout=10,
    )


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


def as_json(value: Any) -> Any:
    """Rows → JSON-safe values (UUIDs and datetimes as strings)."""
    return json.loads(json.dumps(value, default=str))
