"""The inputs of a run: which files, their ids, their synthetic-corpus sidecars, their split.

* Every file under ``IN`` (recursively; or ``IN`` itself if it is a file) whose extension is a
  video container, sorted by relative path. Hidden files and folders are skipped; JSON files are
  sidecars, not inputs. Files with a video extension that are not media at all are inputs too
  (step 1 records them as broken).
* Input id: the file stem, made filesystem-safe, plus 8 hex digits of the SHA-1 of the path
  relative to ``IN`` (``demo1_video-1a2b3c4d``): unique, stable across runs and machines.
* Sidecar: ``<stem>.json`` beside the file with ``"schema": "lipsync.synth/1"`` (the synthetic
  corpus, CONTRACT-data.md section 1). Its ``split`` is inherited.
* Split otherwise: a hash of the file name (``split_key="name"``, the contract's rule) or of its
  parent folder (``"folder"``: VoxCeleb2-style ``<identity>/<video>/<clip>.mp4`` trees, so one
  identity never lands in two splits). ``hash < val`` -> val, ``< val + test`` -> test, else train.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from lipsync.data.process.options import SplitKey
from lipsync.errors import ConfigError

__all__ = ["InputFile", "SYNTH_SCHEMA", "VIDEO_EXTENSIONS", "assign_split", "find_inputs"]

VIDEO_EXTENSIONS = frozenset(
    ".mp4 .m4v .mov .mkv .webm .avi .flv .mpg .mpeg .ts .mts .m2ts .wmv .3gp .ogv".split()
)
SYNTH_SCHEMA = "lipsync.synth/1"


@dataclass(frozen=True)
class InputFile:
    path: str  # absolute
    rel: str  # relative to IN, POSIX separators
    id: str
    sidecar: str | None  # absolute path of a synth sidecar, if any
    split: str


def _safe(stem: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("._-")
    return (s or "input")[:48]


def input_id(rel: str) -> str:
    digest = hashlib.sha1(rel.encode("utf-8")).hexdigest()[:8]
    return f"{_safe(PurePosixPath(rel).stem)}-{digest}"


def _unit_hash(text: str) -> float:
    return int(hashlib.sha1(text.encode("utf-8")).hexdigest()[:12], 16) / float(16**12)


def assign_split(rel: str, key: SplitKey, val: float, test: float) -> str:
    p = PurePosixPath(rel)
    text = p.name if key == "name" else (str(p.parent) if str(p.parent) != "." else p.name)
    h = _unit_hash(text)
    return "val" if h < val else "test" if h < val + test else "train"


def _sidecar(path: Path) -> tuple[str | None, str | None]:
    side = path.with_suffix(".json")
    if not side.is_file():
        return None, None
    try:
        data = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None, None
    if not isinstance(data, dict) or data.get("schema") != SYNTH_SCHEMA:
        return None, None
    split = data.get("split")
    return str(side.resolve()), split if split in ("train", "val", "test") else None


def find_inputs(
    root: str | os.PathLike, key: SplitKey = "name", val: float = 0.05, test: float = 0.05
) -> list[InputFile]:
    """All inputs under ``root`` (see the module docstring), sorted by relative path."""
    root = Path(root)
    if not root.exists():
        raise ConfigError(f"input not found: {root}")
    if root.is_file():
        files, base = [root], root.parent
    else:
        base = root
        files = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in filenames:
                if name.startswith("."):
                    continue
                if Path(name).suffix.lower() in VIDEO_EXTENSIONS:
                    files.append(Path(dirpath) / name)
    out = []
    for f in files:
        rel = f.relative_to(base).as_posix()
        side, split = _sidecar(f)
        split = split or assign_split(rel, key, val, test)
        out.append(InputFile(str(f.resolve()), rel, input_id(rel), side, split))
    out.sort(key=lambda i: i.rel)
    ids = [i.id for i in out]
    if len(set(ids)) != len(ids):  # pragma: no cover - a SHA-1 prefix collision
        raise ConfigError("two inputs map to the same id; rename one of them")
    return out
