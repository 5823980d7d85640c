"""The worker's loop around the queue -- registration, heartbeats, fetching, wake-ups, the sweep,
shutdown -- built to ride out database outages (docs/SERVING.md, "Failure model").

One worker runs one job at a time. Its threads, each with its own connection (:class:`db.Link`):

* main: registers the worker (``procrastinate_workers``), fetches a job when woken by a
  notification or every ``poll_interval_s``, runs it in a job thread (the executor,
  :class:`lipsync.serving.worker.JobExecutor`) and watches it. On SIGTERM / SIGINT it stops
  fetching, lets the job finish for ``shutdown_grace_s``, then releases it (the job goes back
  to the queue at once); a second signal exits at once.
* heartbeat: every ``heartbeat_s`` refreshes the registration. When the registration is gone
  (another worker took this one for dead and pruned it) it registers again and takes its
  running job back, unless that was already handed to someone else.
* listener: ``LISTEN`` for new jobs.
* sweeper: :func:`lipsync.serving.queue.sweep` every ``sweep_interval_s``, the job-count
  gauges, and the scratch folders of ended processes (:mod:`lipsync.serving.scratch`).

**Database outages.** A call that fails for want of a database marks the outage
(:class:`~lipsync.serving.outage.Health`) and is tried again, waiting ``db_retry_s`` doubling
to ``db_retry_max_s``. A running job keeps computing (its progress writes are skipped while the
database is down) and its outcome is written once the database is back. Nobody unregisters and
nothing is dropped. After ``db_outage_limit_s`` without the database the worker gives up: it
exits with code 3, leaving its registration and its job to the other workers' sweep (and
itself to its supervisor, which starts it again).

**Probes** (the metrics port): ``/readyz`` answers 200 while the worker is registered with a
heartbeat younger than ``stalled_after_s``, reaches the database and is not stopping;
``/healthz`` while the main loop keeps turning.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg
from procrastinate.manager import get_channel_for_queues

from lipsync.errors import ConfigError
from lipsync.serving import db, metrics, outage, queue, scratch
from lipsync.serving.outage import Health, is_outage

log = logging.getLogger("lipsync.serving.worker")

WAIT_TICK_S = 0.2  # how often the main thread looks at a running job (signals, grace period)


@dataclass
class Attempt:
    """What the executor gets for one attempt of one job."""

    job_id: str  # our row (lipsync_jobs)
    queue_job_id: int  # its queue entry (procrastinate_jobs)
    stopping: Callable[[], bool]  # True: the worker is shutting down, release the job


def check_settings(settings) -> None:
    """Refuse timings under which live workers would be taken for dead after an outage."""
    if settings.db_retry_max_s + settings.heartbeat_s >= settings.stalled_after_s:
        raise ConfigError(
            f"stalled_after_s ({settings.stalled_after_s:g}) must exceed heartbeat_s "
            f"({settings.heartbeat_s:g}) + db_retry_max_s ({settings.db_retry_max_s:g}): "
            "a live worker must be able to heartbeat again after a database outage before "
            "the others take it for dead"
        )
    if settings.db_outage_limit_s <= settings.heartbeat_s + settings.db_retry_max_s:
        raise ConfigError(
            f"db_outage_limit_s ({settings.db_outage_limit_s:g}) must exceed heartbeat_s + "
            "db_retry_max_s: a worker gives up when no heartbeat went through for that long"
        )


class Consumer:
    """Takes jobs off the queue and hands them to ``execute(attempt)``, one at a time."""

    def __init__(self, settings, execute: Callable[[Attempt], object], name: str, health: Health):
        check_settings(settings)
        self.settings = settings
        self.execute = execute
        self.name = name
        self.health = health
        url = settings.require_database()
        self.app = queue.make_app(settings)

        def link(role: str) -> db.Link:
            return db.Link(url, timeout_s=settings.db_timeout_s, name=f"lipsync {role} {name}")

        self.main_link, self.beat_link = link("worker"), link("heartbeat")
        self.listen_link, self.sweep_link = link("listener"), link("sweeper")
        self.worker_id: int | None = None
        self.last_beat = 0.0
        self.current: int | None = None  # the queue entry being run
        self._unsure = False  # a fetch failed: it may have taken a job we never saw
        self._registration = threading.Lock()
        self.stop_requested = threading.Event()
        self.release = threading.Event()
        self.wake = threading.Event()
        self.done = threading.Event()
        self.tick = time.monotonic()

    # -- probes ----------------------------------------------------------------------------

    def ready(self) -> tuple[bool, str]:
        if self.stop_requested.is_set():
            return False, "stopping"
        if self.health.down:
            return False, f"database unreachable for {self.health.outage_s():.0f} s"
        if self.worker_id is None:
            return False, "not registered"
        silent = time.monotonic() - self.last_beat
        if silent > self.settings.stalled_after_s:
            return False, f"no heartbeat for {silent:.0f} s"
        return True, "ready"

    def alive(self) -> tuple[bool, str]:
        if self.worker_id is None:  # registering (through an outage, up to its limit)
            return True, "registering"
        stuck = time.monotonic() - self.tick
        limit = max(60.0, 3 * self.settings.db_timeout_s)
        if stuck > limit:
            return False, f"the worker loop has not turned for {stuck:.0f} s"
        silent = time.monotonic() - self.last_beat
        if silent > self.settings.db_outage_limit_s:
            return False, f"no heartbeat for {silent:.0f} s"
        return True, "ok"

    def _watchdog(self) -> None:
        """Give up (exit code 3) when the database has been away, or this worker's heartbeat
        has not gone through, for ``db_outage_limit_s``: a worker that cannot register is of
        no use, and its job is recovered by the others."""
        self.health.check_limit()
        silent = time.monotonic() - self.last_beat
        if not self.health.down and silent > self.settings.db_outage_limit_s:
            raise outage.DatabaseUnavailable(
                f"no heartbeat has gone through for {silent:.0f} s "
                f"(limit {self.settings.db_outage_limit_s:.0f} s)"
            )

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> None:
        """Until SIGTERM / SIGINT; raises :class:`~lipsync.serving.outage.DatabaseUnavailable`
        when the database stays away too long."""
        self._install_signal_handlers()
        outage.retry(self._register, self.health, "register")
        threads = [
            threading.Thread(target=fn, name=name, daemon=True)
            for name, fn in (("heartbeat", self._beat_loop), ("listener", self._listen_loop),
                             ("sweeper", self._sweep_loop))
        ]  # fmt: skip
        for t in threads:
            t.start()
        log.info("worker ready", extra={"queue": self.settings.queue, "worker": self.name,
                                        "worker_id": self.worker_id})  # fmt: skip
        gave_up = False
        try:
            self._loop()
        except outage.DatabaseUnavailable:
            gave_up = True
            raise
        finally:
            self.done.set()
            self.wake.set()
            for t in threads:
                t.join(timeout=5)
            if not gave_up:
                self._unregister()
            for link in (self.main_link, self.beat_link, self.listen_link, self.sweep_link):
                link.close()
            metrics.WORKER_REGISTERED.set(0)

    def _loop(self) -> None:
        waits = outage.delays(self.settings)
        while not self.stop_requested.is_set():
            self.tick = time.monotonic()
            try:
                job = self._fetch()
            except Exception as exc:
                if not is_outage(exc):
                    raise
                self.health.failed(exc, "fetch")
                self._watchdog()
                self.stop_requested.wait(next(waits))
                continue
            self.health.ok()
            self._watchdog()
            waits = outage.delays(self.settings)
            if job is None:
                self.wake.wait(self.settings.poll_interval_s)
                self.wake.clear()
                continue
            self._process(job)

    def _fetch(self) -> dict | None:
        if self._unsure:
            self.main_link.run(self._release_unseen)
            self._unsure = False
        try:
            self._unsure = True
            job = self.main_link.run(lambda c: db.fetch_job(c, self.settings.queue, self.worker_id))
        except psycopg.errors.ForeignKeyViolation:  # pruned since the last heartbeat
            self._unsure = False
            self._beat()
            return None
        self._unsure = False
        return job

    def _release_unseen(self, conn) -> None:
        """After a fetch whose answer was lost with the connection: a queue entry it may have
        taken for this worker, which this worker never saw, goes back to the queue (else it
        would stay ``doing`` on a live worker, that nobody takes for dead)."""
        for queue_job_id in db.own_running_jobs(conn, self.worker_id):
            if queue_job_id != self.current:
                db.queue_retry(conn, queue_job_id, 0)
                log.warning("queue entry %s was taken by a fetch whose answer was lost; "
                            "put back", queue_job_id)  # fmt: skip

    def _process(self, job: dict) -> None:
        job_id = str((job["args"] or {}).get("job_id"))
        attempt = Attempt(job_id, int(job["id"]), self.release.is_set)
        self.current = attempt.queue_job_id
        failure: list[BaseException] = []

        def run() -> None:
            try:
                self.execute(attempt)
            except BaseException as exc:  # handed to the main thread
                failure.append(exc)

        thread = threading.Thread(target=run, name=f"job-{job_id[:8]}", daemon=True)
        thread.start()
        grace_ends = None
        while thread.is_alive():
            thread.join(WAIT_TICK_S)
            self.tick = now = time.monotonic()
            if self.stop_requested.is_set() and not self.release.is_set():
                if grace_ends is None:
                    grace_ends = now + self.settings.shutdown_grace_s
                    log.info("stopping: waiting up to %.0f s for the running job",
                             self.settings.shutdown_grace_s)  # fmt: skip
                if now >= grace_ends:
                    log.info("grace period over: releasing the running job")
                    self.release.set()
            self._watchdog()  # gives up on the job too: the others' sweep recovers it
        self.current = None
        if failure:
            raise failure[0]

    # -- registration ------------------------------------------------------------------------

    def _register(self) -> None:
        with self._registration:
            if self.worker_id is None:
                self.worker_id = self.main_link.run(db.register_worker)
                self.last_beat = time.monotonic()
        metrics.WORKER_REGISTERED.set(1)

    def _beat(self) -> None:
        with self._registration:
            self.beat_link.run(self._beat_in)

    def _beat_in(self, conn) -> None:
        """Refresh the heartbeat; register again if the registration was pruned."""
        if self.worker_id is not None and db.heartbeat(conn, self.worker_id):
            self.last_beat = time.monotonic()
            return
        log.warning(
            "this worker was declared stalled (no heartbeat for %.1f s) and unregistered; "
            "registering again", self.settings.stalled_after_s,
            extra={"worker": self.name, "worker_id": self.worker_id},
        )  # fmt: skip
        self.worker_id = db.register_worker(conn)
        self.last_beat = time.monotonic()
        current = self.current
        if current is not None and not db.attach_job(conn, current, self.worker_id):
            log.warning("the running job was given to another worker meanwhile; its "
                        "result will not be published from here")  # fmt: skip

    def _unregister(self) -> None:
        if self.worker_id is None:
            return
        try:
            with self.main_link.transaction() as conn:
                db.unregister_worker(conn, self.worker_id)
            self.worker_id = None
        except Exception as exc:  # the others' sweep prunes it
            log.warning("could not unregister: %s", exc)

    # -- side threads ------------------------------------------------------------------------

    def _side_loop(self, what: str, step: Callable[[], None], every_s: float, link) -> None:
        """``step()`` every ``every_s`` until the worker stops, through database outages."""
        waits = outage.delays(self.settings)
        pause = every_s
        while not self.done.wait(pause):
            try:
                link.fresh = False
                try:
                    step()
                except Exception as exc:
                    if link.fresh or not is_outage(exc):
                        raise
                    link.close()  # it died while idle: once more on a fresh connection
                    step()
            except Exception as exc:
                link.close()
                if is_outage(exc):
                    self.health.failed(exc, what)
                    metrics.WORKER_REGISTERED.set(0)
                    pause = min(next(waits), every_s or float("inf"))
                else:
                    log.error("%s failed: %s", what, exc, exc_info=exc)
                    pause = every_s or self.settings.db_retry_max_s
                continue
            self.health.ok()
            waits = outage.delays(self.settings)
            pause = every_s

    def _beat_loop(self) -> None:
        def step() -> None:
            self._beat()
            metrics.WORKER_REGISTERED.set(1)

        self._side_loop("heartbeat", step, self.settings.heartbeat_s, self.beat_link)

    def _sweep_loop(self) -> None:
        root = self.settings.work_dir

        def step() -> None:
            trust = self.health.up_for() >= self.settings.stalled_after_s
            queue.sweep(self.sweep_link, self.settings, self.app, trust_heartbeats=trust)
            with self.sweep_link.transaction() as conn:
                metrics.set_status_counts(db.status_counts(conn))
            scratch.purge_orphans(root)

        self._side_loop("sweep", step, self.settings.sweep_interval_s, self.sweep_link)

    def _listen_loop(self) -> None:
        channels = get_channel_for_queues([self.settings.queue])

        def step() -> None:
            conn = self.listen_link.connection()
            db.listen(conn, channels)
            self.health.ok()
            while not self.done.is_set():
                for _ in conn.notifies(timeout=1.0):
                    self.wake.set()

        self._side_loop("listen", step, 0.0, self.listen_link)

    # -- signals -----------------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        def handler(signum, frame) -> None:
            if self.stop_requested.is_set():
                log.warning("second signal: exiting at once (the job is recovered as lost)")
                os._exit(128 + signum)
            log.info("stop requested (%s)", signal.Signals(signum).name)
            self.stop_requested.set()
            self.wake.set()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
