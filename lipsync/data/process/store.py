"""Where each step keeps its results, and how they are written so that a kill never hurts.

Layout of a processing folder ``OUT``::

    OUT/process.json              the options that shape the outputs (a re-run must match them)
    OUT/manifest.jsonl            one line per input and per segment (rebuilt from the records)
    OUT/1_check/<input>.json      step records, one JSON per input (steps 1-4) ...
    OUT/2_resample/<input>.mp4    ... with their data beside them: 25 fps video, 16 kHz wav
    OUT/2_resample/<input>.wav
    OUT/3_scenes/<input>.json
    OUT/4_segments/<input>.json
    OUT/5_faces/<segment>.mp4     ... one per segment (steps 5-7): aligned face crops + audio
    OUT/5_faces/<segment>.json
    OUT/6_sync/<segment>.json     (+ .mp4 when the audio was shifted)
    OUT/7_quality/<segment>.json
    OUT/final/<segment>.mp4       kept segments: what training reads
    OUT/final/<segment>.json
    OUT/runs/<time>.json          per-run timing (the only non-deterministic files)

Rules that make every step resumable and idempotent:

* A step's data files are written to a hidden temporary file in the same folder and renamed into
  place (:func:`atomic_path`); its record (``<id>.json``) is written the same way, **last**. A
  record on disk means the step finished for that item; its data files are complete.
* A later step only opens data files named by a finished record, so it never reads a half-written
  file. A re-run skips items whose record exists and redoes the others (overwriting any data file
  a killed attempt had completed but not yet recorded).
* Temporary files left by a killed run (``.*.partial*`` / ``.*.tmp``) are deleted when the next
  run starts (:func:`remove_stale`). Only one run works on a folder at a time (:class:`RunLock`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lipsync.errors import ConfigError

__all__ = [
    "STEP_DIRS",
    "STEPS",
    "Layout",
    "RunLock",
    "atomic_path",
    "read_json",
    "remove_stale",
    "write_json",
]

#: The seven steps, in order (the names used in records and the manifest).
STEPS = ("check", "resample", "scenes", "segment", "faces", "sync", "quality")
STEP_DIRS = {step: f"{i}_{step}" for i, step in enumerate(STEPS, start=1)}


class Layout:
    """Paths inside a processing folder (see the module docstring)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.final = self.root / "final"
        self.runs = self.root / "runs"
        self.manifest = self.root / "manifest.jsonl"
        self.options = self.root / "process.json"

    def step_dir(self, step: str) -> Path:
        return self.root / STEP_DIRS[step]

    def record(self, step: str, item: str) -> Path:
        return self.step_dir(step) / f"{item}.json"

    def data(self, step: str, item: str, suffix: str) -> Path:
        return self.step_dir(step) / f"{item}{suffix}"

    def final_record(self, segment: str) -> Path:
        return self.final / f"{segment}.json"

    def final_media(self, segment: str) -> Path:
        return self.final / f"{segment}.mp4"

    def folders(self) -> list[Path]:
        return [self.step_dir(s) for s in STEPS] + [self.final, self.runs]

    def create(self) -> None:
        for folder in self.folders():
            folder.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path`` (atomic).

    On an exception the temporary file is removed and ``path`` is untouched. After a SIGKILL the
    temporary file stays behind under a hidden ``.<name>.*.tmp`` name that no reader looks for
    (:func:`remove_stale` deletes it on the next run).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as UTF-8 JSON atomically (sorted keys, so equal data gives equal bytes)."""
    text = json.dumps(data, sort_keys=True, ensure_ascii=False, indent=1) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def read_json(path: str | os.PathLike) -> Any | None:
    """The JSON in ``path``, or None if it does not exist."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


def remove_stale(layout: Layout) -> int:
    """Delete temporary files a killed run left in the step folders; returns how many."""
    removed = 0
    for folder in [layout.root, *layout.folders()]:
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            name = entry.name
            if name.startswith(".") and (".partial" in name or name.endswith(".tmp")):
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
                    removed += 1
    return removed


class RunLock:
    """An exclusive ``flock`` on ``OUT/.lock`` for the life of a run (released by the kernel if
    the process dies, so a SIGKILLed run never blocks the next one)."""

    def __init__(self, root: str | os.PathLike):
        self.path = Path(root) / ".lock"
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            self._fd = None
            raise ConfigError(
                f"another 'lipsync data process' run is working on {self.path.parent}; wait for "
                "it to finish or use another output folder"
            ) from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
