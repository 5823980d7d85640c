"""Temporary files of atomic writes, and the leftovers of writers that were killed.

A writer of ``DIR/NAME.EXT`` works in ``DIR/.NAME.<host>-<pid>-<random>.partial.EXT`` and renames
it into place at the end (:class:`lipsync.media.encode.VideoWriter`). Ctrl-C, SIGTERM and errors
delete it; SIGKILL or a power loss cannot. :func:`remove_stale_partials` (run by the next writer
of the same output) deletes such leftovers: files of this naming made on this host by a process
that no longer runs, and files of other hosts or of the older naming without a pid when they
have not been touched for an hour (a live writer keeps appending to its file).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import socket
import tempfile
import time
from functools import cache
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["STALE_AFTER_S", "host_tag", "make_partial", "remove_stale_partials"]

STALE_AFTER_S = 3600  # a partial file of another host (or without a pid) untouched this long
_TAG = re.compile(r"(?:(?P<host>[0-9a-f]{6})-(?P<pid>\d+)-)?[a-z0-9_]{8}")


@cache
def host_tag() -> str:
    """This machine's part of partial-file names (a hash of the host name)."""
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]


def make_partial(path: str | os.PathLike) -> str:
    """Create (empty, mode 0666 minus the umask) the temporary file a writer of ``path`` works
    in, in ``path``'s folder; returns its path."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.stem}.{host_tag()}-{os.getpid()}-",
        suffix=f".partial{path.suffix}",
        dir=parent,
    )
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    with contextlib.suppress(OSError):
        os.chmod(tmp, 0o666 & ~umask)
    return tmp


def remove_stale_partials(path: str | os.PathLike) -> list[Path]:
    """Delete what killed writers of ``path`` left behind (see the module docstring); returns
    the files removed."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    head, tail = f".{path.stem}.", f".partial{path.suffix}"
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    removed = []
    for name in names:
        if not (name.startswith(head) and name.endswith(tail)):
            continue
        match = _TAG.fullmatch(name[len(head) : len(name) - len(tail)])
        if match is None:
            continue  # another output's file (its name only starts like ours)
        tmp = parent / name
        if match["pid"] is not None and match["host"] == host_tag():
            stale = not _process_alive(int(match["pid"]))
        else:
            try:
                stale = time.time() - tmp.stat().st_mtime > STALE_AFTER_S
            except OSError:
                continue
        if stale:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                removed.append(tmp)
                log.info("removed %s, left by an earlier run that was killed", tmp)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
