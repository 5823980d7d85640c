"""Scratch folders that outlive no process: each process works under its own folder, and the
folders of processes that died (``kill -9``, OOM-killed, a lost node's restarted container)
are removed by the next process that looks.

A process's folder is ``<root>/lipsync-<role>-<pid>-<random>/``; the process holds an exclusive
``flock`` on its ``.owner`` file for as long as it lives. The kernel drops that lock when the
process ends, however it ends, so :func:`purge_orphans` (run at start-up and by the workers'
sweep) removes exactly the folders whose owner is gone, never a live process's, whatever the
process ids and whichever machine-local clock. The folder is made under a hidden name, locked,
then renamed into place, so no purger ever sees a new folder before it is locked.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path

log = logging.getLogger("lipsync.serving.scratch")

PREFIX = "lipsync-"
OWNER = ".owner"


class Scratch:
    """This process's scratch folder (see the module docstring)."""

    def __init__(self, root: str | os.PathLike | None, role: str):
        base = Path(root or tempfile.gettempdir())
        base.mkdir(parents=True, exist_ok=True)
        name = f"{PREFIX}{role}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        hidden = base / f".{name}"
        hidden.mkdir()
        self._fd = os.open(hidden / OWNER, os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.path = base / name
        hidden.rename(self.path)

    def mkdtemp(self, prefix: str) -> Path:
        """A new folder for one job or one upload, inside this process's folder."""
        return Path(tempfile.mkdtemp(prefix=prefix, dir=self.path))

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        os.close(self._fd)


def purge_orphans(root: str | os.PathLike | None) -> list[Path]:
    """Remove the scratch folders under ``root`` whose process has ended; returns them."""
    base = Path(root or tempfile.gettempdir())
    removed: list[Path] = []
    try:
        candidates = [p for p in base.iterdir() if p.name.startswith(PREFIX) and p.is_dir()]
    except OSError:
        return removed
    for folder in candidates:
        owner = folder / OWNER
        try:
            fd = os.open(owner, os.O_RDWR)
        except OSError:  # not one of ours (or being removed right now)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # its process is alive
            os.close(fd)
            continue
        try:
            shutil.rmtree(folder, ignore_errors=True)
        finally:
            os.close(fd)
        removed.append(folder)
        log.info("removed the scratch folder of an ended process: %s", folder)
    return removed
