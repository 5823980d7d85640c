"""Riding out database outages: which errors mean "the database is gone", how long to wait
between tries, and when to give up (docs/SERVING.md, "Failure model").

Every process keeps one :class:`Health`: the first failed call starts an outage (one warning),
the first call that works again ends it (one line with its length). :func:`retry` runs a
database call until it works, waiting ``db_retry_s``, doubling up to ``db_retry_max_s`` between
tries, and raises :class:`DatabaseUnavailable` once the outage has lasted ``db_outage_limit_s``.
Errors that are not about reaching the database (a constraint, a bug in a query) are raised at
once: retrying them would only hide them.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import psycopg
from psycopg_pool import PoolTimeout

from lipsync.errors import LipSyncError, one_line
from lipsync.serving import metrics

log = logging.getLogger("lipsync.serving.outage")

T = TypeVar("T")

# errors that mean the server cannot be reached (or went away mid-call), not a bad query
OUTAGE_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout)


class DatabaseUnavailable(LipSyncError):
    """The database stayed unreachable for longer than ``db_outage_limit_s``."""

    exit_code = 3
    retryable = True
    retry_reason = "database"


def is_outage(exc: BaseException) -> bool:
    """Does ``exc`` (or what caused it) say that the database cannot be reached?"""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, OUTAGE_ERRORS) and not isinstance(current, DatabaseUnavailable):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def delays(settings) -> Iterator[float]:
    """``db_retry_s``, doubling up to ``db_retry_max_s``, each ±10 % so that workers that lost
    the database together do not knock on it together."""
    delay = settings.db_retry_s
    while True:
        yield delay * random.uniform(0.9, 1.1)
        delay = min(delay * 2, settings.db_retry_max_s)


class Health:
    """What this process knows about the database: up (since when) or down (since when)."""

    def __init__(self, settings, clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self.clock = clock
        self._lock = threading.Lock()
        self.down_since: float | None = None
        self.up_since = clock()
        self.last_error = ""
        metrics.DATABASE_UP.set(1)

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def ok(self) -> None:
        with self._lock:
            if self.down_since is None:
                return
            lasted = self.clock() - self.down_since
            self.down_since = None
            self.up_since = self.clock()
        metrics.DATABASE_UP.set(1)
        log.warning("database reachable again after %.1f s", lasted, extra={"outage_s": lasted})

    def failed(self, exc: BaseException, what: str) -> None:
        with self._lock:
            self.last_error = one_line(exc)
            if self.down_since is not None:
                return
            self.down_since = self.clock()
        metrics.DATABASE_UP.set(0)
        metrics.DATABASE_OUTAGES.inc()
        log.warning(
            "database unreachable (%s): %s; retrying for up to %.0f s", what, self.last_error,
            self.settings.db_outage_limit_s,
        )  # fmt: skip

    def outage_s(self) -> float:
        since = self.down_since
        return 0.0 if since is None else self.clock() - since

    def up_for(self) -> float:
        """Seconds the database has been reachable without a failure (0 while it is not)."""
        return 0.0 if self.down else self.clock() - self.up_since

    def check_limit(self) -> None:
        """Raise :class:`DatabaseUnavailable` once the current outage is too long."""
        if self.outage_s() > self.settings.db_outage_limit_s:
            raise DatabaseUnavailable(
                f"the database has been unreachable for {self.outage_s():.0f} s "
                f"(limit {self.settings.db_outage_limit_s:.0f} s): {self.last_error}"
            )


def retry(fn: Callable[[], T], health: Health, what: str) -> T:
    """``fn()`` until it stops failing for want of a database (module docstring)."""
    waits = delays(health.settings)
    while True:
        try:
            result = fn()
        except Exception as exc:
            if not is_outage(exc):
                raise
            health.failed(exc, what)
            health.check_limit()
            time.sleep(next(waits))
            continue
        health.ok()
        return result
