"""Real servers for the job-service tests: PostgreSQL, a moto S3 server, the API and workers.

* :class:`PostgresServer` -- ``initdb`` in a temporary folder, ``postgres`` on a free port, run as
  a non-root user when the tests run as root (the ``postgres`` system user). The binaries are
  required: without them the fixture fails (CI installs Debian's ``postgresql``).
* :class:`Stack` -- one database, one storage, the API (``lipsync serve api``) and any number of
  workers (``lipsync serve worker``), all real subprocesses, with short heartbeat / retry
  intervals so failure scenarios take seconds.

Fixtures (imported by ``conftest.py``): ``postgres_server`` and ``moto_server_url`` (session),
``serving_media`` (session: short face clips made from the demo video).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from lipsync.tools.procs import free_ports

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    return free_ports(1)[0]


def wait_until(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value; returns it (fails after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# -- PostgreSQL ---------------------------------------------------------------------------------


def postgres_bindir() -> Path | None:
    env = os.environ.get("LIPSYNC_PG_BINDIR")
    if env and (Path(env) / "postgres").exists():
        return Path(env)
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/postgres"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if found:
        return Path(found[-1]).parent
    which = shutil.which("postgres")
    return Path(which).parent if which else None


class PostgresServer:
    """A throw-away PostgreSQL server (fsync off: test data only)."""

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="lipsync-pg-"))
        self.data = self.root / "data"
        self.user_kwargs: dict = {}
        if os.geteuid() == 0:  # postgres refuses to run as root
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                pytest.fail("running as root needs a 'postgres' system user to run PostgreSQL")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
            self.user_kwargs = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        self.proc: subprocess.Popen | None = None
        self.log = self.root / "postgres.log"

    def start(self) -> None:
        initdb = [
            str(self.bindir / "initdb"), "-D", str(self.data), "-U", "lipsync", "-A", "trust",
            "-E", "UTF8", "--no-sync", "--no-instructions",
        ]  # fmt: skip
        proc = subprocess.run(initdb, capture_output=True, text=True, **self.user_kwargs)
        if proc.returncode:
            pytest.fail(f"initdb failed: {proc.stderr[-2000:]}")
        self.resume()

    def resume(self) -> None:
        """Start the server (again, after :meth:`halt`) on the same port and data."""
        log = open(self.log, "a")  # noqa: SIM115 - closed with the server
        if self.user_kwargs:
            os.chown(self.log, self.user_kwargs["user"], self.user_kwargs["group"])
        self.proc = subprocess.Popen(
            [
                str(self.bindir / "postgres"), "-D", str(self.data), "-p", str(self.port),
                "-k", str(self.root), "-c", "listen_addresses=127.0.0.1",
                "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                "-c", "max_connections=300", "-c", "shared_buffers=32MB",
            ],
            stdout=log, stderr=subprocess.STDOUT, **self.user_kwargs,
        )  # fmt: skip
        log.close()
        import psycopg

        def ready():
            if self.proc.poll() is not None:
                pytest.fail(f"postgres exited: {self.log.read_text()[-2000:]}")
            try:
                with psycopg.connect(self.url("postgres"), connect_timeout=2):
                    return True
            except psycopg.OperationalError:
                return False

        wait_until(ready, 30, 0.1, "PostgreSQL to accept connections")

    def halt(self) -> None:
        """Stop the server as an operator would (``pg_ctl stop -m fast``: SIGINT), keeping its
        data: every connection is cut and new ones are refused until :meth:`resume`."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def url(self, dbname: str) -> str:
        return f"postgresql://lipsync@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        self.halt()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server():
    bindir = postgres_bindir()
    if bindir is None:
        pytest.fail(
            "PostgreSQL server binaries not found (looked in /usr/lib/postgresql/*/bin and "
            "PATH): install them (Debian: apt-get install postgresql) or set LIPSYNC_PG_BINDIR"
        )
    server = PostgresServer(bindir)
    server.start()
    yield server
    server.stop()


# -- S3 (moto) ----------------------------------------------------------------------------------

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def moto_server_url():
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="moto-", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **S3_ENV},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    def ready():
        if proc.poll() is not None:
            pytest.fail(f"moto_server exited: {Path(log.name).read_text()[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return True
        return False

    wait_until(ready, 30, 0.1, "moto_server")
    yield url
    proc.terminate()
    proc.wait(timeout=10)
    os.unlink(log.name)


# -- media ----------------------------------------------------------------------------------------


class Media:
    """Short inputs: ``video`` (0.6 s, 224 px, a face), ``audio`` (0.6 s), ``long_video`` /
    ``long_audio`` (2 s, for jobs that must run a while), and bad inputs."""

    def __init__(self, root: Path):
        from lipsync.media import read_frames
        from tests.support.media_factory import (
            make_audio,
            make_text_file,
            make_video,
            speechlike,
            truncate_copy,
        )
        from tests.support.shared import MEDIA

        self.root = root
        frames = read_frames(MEDIA / "demo1_video.mp4", stop=50)[:, 380:980, 295:895]
        import numpy as np
        import torch

        t = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
        small = torch.nn.functional.interpolate(t, size=(224, 224), mode="area")
        faces = small.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
        n = len(faces)

        def clip(name, seconds, audio=False):
            return make_video(
                root / name, seconds=seconds, size=(224, 224), audio=audio, crf=16,
                draw=lambda i, t: faces[min(int(t * 25 + 1e-6), n - 1)],
            )  # fmt: skip

        self.seconds = 0.6
        self.frames = 15
        self.video = clip("face.mp4", 0.6)
        self.audio = make_audio(root / "speech.wav", seconds=0.6, signal=speechlike(0.6))
        self.long_video = clip("face_long.mp4", 2.0)
        self.long_audio = make_audio(root / "speech_long.wav", seconds=2.0, signal=speechlike(2.0))
        self.video_with_sound = clip("face_sound.mp4", 0.6, audio=speechlike(0.6))
        self.no_face = make_video(root / "noface.mp4", seconds=0.6, size=(224, 224))
        self.text = make_text_file(root / "notes.txt")
        self.text_as_mp4 = make_text_file(root / "fake.mp4")
        self.truncated = truncate_copy(self.long_video, root / "truncated.mp4", keep=0.4)
        self.too_long = make_video(root / "long.mp4", seconds=6.0, size=(64, 48), audio=True)
        self.big = root / "big.bin"
        self.big.write_bytes(os.urandom(3 * 1024 * 1024))


@pytest.fixture(scope="session")
def serving_media(tmp_path_factory) -> Media:
    return Media(tmp_path_factory.mktemp("serving-media"))


# -- the service ------------------------------------------------------------------------------


class Proc:
    def __init__(self, name: str, args: list[str], env: dict, log_dir: Path):
        self.name = name
        self.log = log_dir / f"{name}.log"
        self._log = open(self.log, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            args, env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO
        )
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, sig=signal.SIGTERM, timeout: float = 30) -> int:
        if self.alive():
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._log.close()
        return self.popen.returncode


FAST_QUEUE_ENV = {
    "LIPSYNC_PRESET": "tiny",
    "LIPSYNC_DEVICE": "cpu",
    "LIPSYNC_CPU_THREADS": "1",
    "LIPSYNC_HEARTBEAT_S": "0.5",
    "LIPSYNC_STALLED_AFTER_S": "4",
    "LIPSYNC_SWEEP_INTERVAL_S": "0.5",
    "LIPSYNC_POLL_INTERVAL_S": "0.2",
    "LIPSYNC_PROGRESS_INTERVAL_S": "0.1",
    "LIPSYNC_RETRY_BACKOFF_S": "0.4",
    "LIPSYNC_SHUTDOWN_GRACE_S": "0",
    "LIPSYNC_FACE_CHECK_FRAMES": "3",
    "LIPSYNC_WORKER_METRICS_PORT": "0",
    "LIPSYNC_DB_TIMEOUT_S": "2",
    "LIPSYNC_DB_RETRY_S": "0.2",
    "LIPSYNC_DB_RETRY_MAX_S": "1",
}


class Stack:
    """A database + storage + API + workers for one test module."""

    def __init__(self, pg: PostgresServer, name: str, tmp: Path, **env: str):
        self.name = name
        self.tmp = tmp
        self.database_url = pg.create_database(name)
        self.storage_dir = tmp / "storage"
        self.env = {
            **os.environ,
            **FAST_QUEUE_ENV,
            "DATABASE_URL": self.database_url,
            "LIPSYNC_STORAGE_URL": self.storage_dir.as_uri(),
            "LIPSYNC_WORK_DIR": str(tmp),
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            "PYTHONUNBUFFERED": "1",
        }
        self.env.update(env)
        self.api: Proc | None = None
        self.api_port = free_port()
        self.workers: list[Proc] = []
        self._n = 0
        from lipsync.serving import db

        db.migrate(self.database_url)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def settings(self):
        from lipsync.serving.settings import ServeSettings

        return ServeSettings.from_env(self.env)

    def storage(self):
        from lipsync.serving.storage import open_storage

        return open_storage(self.settings())

    def cli(self, *args: str, **env: str) -> list[str]:
        return [sys.executable, "-m", "lipsync.cli", "serve", *args]

    def start_api(self) -> Proc:
        env = {**self.env, "LIPSYNC_PORT": str(self.api_port)}
        self.api = Proc(f"api-{self._next()}", self.cli("api"), env, self.tmp)
        return self.api

    def wait_api(self, timeout: float = 60) -> None:
        import httpx

        def ready():
            if not self.api.alive():
                pytest.fail(f"the API exited:\n{self.api.tail()}")
            try:
                return httpx.get(self.url + "/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, timeout, 0.1, "the API")

    def start_worker(self, **env: str) -> Proc:
        proc = Proc(f"worker-{self._next()}", self.cli("worker"), {**self.env, **env}, self.tmp)
        self.workers.append(proc)
        return proc

    def wait_workers(self, timeout: float = 90) -> None:
        """Until every started worker is registered in procrastinate (heartbeating)."""

        def ready():
            for w in self.workers:
                if not w.alive() and w.popen.returncode not in (0, -9):
                    pytest.fail(f"worker {w.name} exited:\n{w.tail()}")
            live = [w for w in self.workers if w.alive()]
            return "worker ready" in "".join(w.tail(100000) for w in live) and all(
                "worker ready" in w.tail(100000) for w in live
            )

        wait_until(ready, timeout, 0.1, "the workers")

    def _next(self) -> int:
        self._n += 1
        return self._n

    def create_key(self, name: str, concurrency: int | None = None, quota: int | None = None):
        from lipsync.serving import auth, db

        with db.connect(self.database_url) as conn:
            secret, _ = auth.create_key(conn, name, concurrency, quota)
        return secret

    def client(self, key: str | None, headers: dict | None = None):
        import httpx

        headers = {**({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def query(self, sql: str, *args):
        from lipsync.serving import db

        with db.connect(self.database_url) as conn:
            return conn.execute(sql, args).fetchall()

    def job_row(self, job_id: str) -> dict:
        rows = self.query("SELECT * FROM lipsync_jobs WHERE id = %s", job_id)
        assert rows, f"no job row {job_id}"
        return rows[0]

    def queue_status(self, job_id: str) -> str:
        rows = self.query(
            "SELECT p.status FROM procrastinate_jobs p JOIN lipsync_jobs j "
            "ON j.queue_job_id = p.id WHERE j.id = %s",
            job_id,
        )
        return rows[0]["status"] if rows else None

    def wait_queue_status(self, job_id: str, status: str, timeout: float = 15) -> None:
        """Wait for the queue's own record of a job to reach ``status``: the worker writes the
        job's final status to its row before returning to procrastinate, which then records
        its own, so the two are not updated at the same instant."""
        seen = []

        def reached():
            seen.append(self.queue_status(job_id))
            return seen[-1] == status

        wait_until(reached, timeout, what=f"queue status {status!r} (last seen {seen[-1:]})")

    def wait_status(self, job_id: str, statuses, timeout: float = 60) -> dict:
        statuses = {statuses} if isinstance(statuses, str) else set(statuses)

        def done():
            row = self.job_row(job_id)
            if row["status"] in statuses:
                return row
            for w in self.workers:
                if not w.alive() and w.popen.returncode not in (0, -9, -15):
                    pytest.fail(f"worker {w.name} crashed:\n{w.tail()}")
            return None

        try:
            return wait_until(done, timeout, 0.1, f"job {job_id} to become {statuses}")
        except BaseException:
            print(self.job_row(job_id))
            for w in self.workers:
                print(f"--- {w.name}\n{w.tail(4000)}")
            raise

    def close(self) -> None:
        for w in self.workers:
            w.stop(timeout=15)
        if self.api:
            self.api.stop(timeout=15)


def submit(client, media_video, media_audio=None, *, headers=None, **fields):
    """POST /v1/jobs with file uploads; returns the response."""
    files = {"video": (Path(media_video).name, open(media_video, "rb"), "video/mp4")}
    if media_audio is not None:
        files["audio"] = (Path(media_audio).name, open(media_audio, "rb"), "audio/wav")
    try:
        data = {k: str(v) for k, v in fields.items()}
        return client.post("/v1/jobs", files=files, data=data, headers=headers or {})
    finally:
        for _, f, _ in files.values():
            f.close()


def check_output(path: Path, frames: int, seconds: float) -> None:
    """A valid lip-sync output: ``frames`` video frames at 25 fps and ~``seconds`` of audio."""
    from lipsync.audio import load_audio
    from lipsync.media import read_frames

    video = read_frames(path)
    assert len(video) == frames, (len(video), frames)
    wav = load_audio(path)
    assert abs(len(wav) - seconds * 16000) <= 2048, (len(wav), seconds)
    assert float(abs(wav).max()) > 0.01  # the speech is there, not silence
