"""``OUT/manifest.jsonl``: one JSON line per input and per segment of a processing run.

Input line::

    {"kind": "input", "id": "talk-1a2b3c4d", "source": "talk.mp4", "split": "train",
     "status": "kept" | "dropped", "step": "check", "reason": "no_audio", "message": "...",
     "segments": 3, "kept_segments": 2,
     "stats": {"duration": 31.2, "fps": 29.97, "width": 1920, "height": 1080, ...}}

Segment line (one per piece of an input that got past step 4, including scenes too short to
make a segment)::

    {"kind": "segment", "id": "talk-1a2b3c4d-s001", "input": "talk-1a2b3c4d",
     "source": "talk.mp4", "split": "train", "status": "kept", "step": "quality",
     "reason": null, "message": null, "start_frame": 250, "frames": 238,
     "path": "final/talk-1a2b3c4d-s001.mp4",
     "stats": {"duration": 9.52, "fps": 25, "face_size": 412.0, "sync_offset": 0,
               "sync_confidence": 7.1, "quality": 83.4, "trimmed_frames": 0}}

``status`` is ``kept`` or ``dropped``; for a drop, ``step`` is the step that dropped it (one of
``check resample scenes segment faces sync quality``) and ``reason`` a stable code (see
``docs/DATA.md``). An item that failed with an unexpected error in this run is listed as dropped
with reason ``internal_error``; it has no step record, so the next run retries it. An input is
``kept`` when at least one of its segments is. Lines are sorted (inputs by source path, each
followed by its segments in time order), and hold nothing that depends on timing, so the same
inputs and options give the same file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Summary", "read_manifest", "summarize", "write_manifest"]


def write_manifest(path: str | os.PathLike, entries: list[dict]) -> None:
    """Write the entries (already in order) as JSON lines, atomically (temp file + rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for e in entries:
                f.write(json.dumps(e, sort_keys=True, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_manifest(path: str | os.PathLike) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@dataclass
class Summary:
    """Counts and hours: kept segments, and drops by (kind, step, reason)."""

    inputs: int = 0
    inputs_kept: int = 0
    input_hours: float = 0.0
    segments_kept: int = 0
    hours_kept: float = 0.0
    dropped: dict[tuple[str, str, str], list[float]] = field(default_factory=dict)
    errors: int = 0

    def rows(self) -> list[tuple[str, str, int, float]]:
        """(what, reason, count, hours) rows for a table, kept first."""
        rows = [("kept segments", "", self.segments_kept, self.hours_kept)]
        for (kind, step, reason), (count, hours) in sorted(self.dropped.items()):
            rows.append((f"dropped {kind}s ({step})", reason, int(count), hours))
        return rows


def _seconds(entry: dict) -> float:
    stats = entry.get("stats") or {}
    for key in ("duration", "usable_seconds"):
        value = stats.get(key)
        if value is not None:
            return float(value)
    frames = entry.get("frames")
    return float(frames) / 25.0 if frames else 0.0


def summarize(entries: list[dict]) -> Summary:
    s = Summary()
    dropped: dict[tuple[str, str, str], list[float]] = defaultdict(lambda: [0, 0.0])
    for e in entries:
        kind = e["kind"]
        if kind == "input":
            s.inputs += 1
            s.input_hours += _seconds(e) / 3600
            s.inputs_kept += e["status"] == "kept"
            # inputs dropped after step 4 are accounted for by their segments
            if e["status"] == "dropped" and e["step"] in ("check", "resample", "scenes"):
                d = dropped[("input", e["step"], e.get("reason") or "")]
                d[0] += 1
                d[1] += _seconds(e) / 3600
        elif e["status"] == "kept":
            s.segments_kept += 1
            s.hours_kept += _seconds(e) / 3600
        else:
            d = dropped[("segment", e["step"], e.get("reason") or "")]
            d[0] += 1
            d[1] += _seconds(e) / 3600
        s.errors += e.get("reason") == "internal_error"
    s.dropped = dict(dropped)
    return s


def manifest_path(root: str | os.PathLike) -> Path:
    return Path(root) / "manifest.jsonl"
