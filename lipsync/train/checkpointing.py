"""Training checkpoints that survive SIGKILL: ``DIR/step-00001000.pt``, written atomically.

A checkpoint is written to ``step-….pt.part``, flushed to disk, then renamed; a killed writer
leaves at most a ``.part`` file, which is ignored (and removed by the next save). The newest
``keep`` checkpoints are kept. Files hold plain containers of tensors and numbers only, so they
load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from lipsync.errors import CheckpointError

_NAME = re.compile(r"^step-(\d{8,})\.pt$")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` through a temporary file, fsync and rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file through a temporary file and rename (readers never see half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


class CheckpointDir:
    """The checkpoints of one run: save, find the newest, load, prune."""

    def __init__(self, root: str | os.PathLike, keep: int = 2):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root = Path(root)
        self.keep = keep

    def path(self, step: int) -> Path:
        return self.root / f"step-{step:08d}.pt"

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = (_NAME.match(p.name) for p in self.root.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def latest(self) -> Path | None:
        steps = self.steps()
        return self.path(steps[-1]) if steps else None

    def save(self, step: int, state: dict[str, Any]) -> Path:
        for stale in self.root.glob("*.part") if self.root.is_dir() else []:
            stale.unlink(missing_ok=True)  # left by a killed writer
        path = atomic_torch_save({**state, "step": step}, self.path(step))
        for old in self.steps()[: -self.keep]:
            self.path(old).unlink(missing_ok=True)
        return path

    def load(self, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:  # noqa: BLE001 - a damaged file fails in many ways
            raise CheckpointError(f"cannot read training checkpoint {path}: {e}") from e
        if not isinstance(state, dict) or "step" not in state:
            raise CheckpointError(f"{path} is not a lipsync training checkpoint")
        return state

    def load_latest(self, map_location: str | torch.device = "cpu") -> dict | None:
        path = self.latest()
        return None if path is None else self.load(path, map_location)
