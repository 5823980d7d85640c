"""Training metrics as JSON lines (one record per line, each with a ``step``) and PNG charts.

:class:`MetricsLog` appends records and flushes each line. After a resume from step ``s``,
:meth:`MetricsLog.truncate_after` drops the records a killed run wrote past ``s`` (they will be
recomputed), so the file reads like one uninterrupted run. :func:`plot_metrics` draws the
numeric series against the step with matplotlib's Agg backend.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from lipsync.train.checkpointing import atomic_write_text


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The complete records of a JSONL file (a torn last line from a kill is skipped)."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


class MetricsLog:
    def __init__(self, path: str | os.PathLike, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """Keep only records with ``step <= step`` (rewritten atomically)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def records(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path)


def _series(records: Iterable[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, int | float) and math.isfinite(v) and "step" in r:
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys


def plot_metrics(
    records: Sequence[dict[str, Any]],
    path: str | os.PathLike,
    panels: Sequence[tuple[str, Sequence[str]]],
    title: str = "",
) -> Path | None:
    """One PNG with a panel per ``(y label, [record keys])``; None if there is nothing to draw.

    Written atomically (temporary file + rename).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = [(label, keys) for label, keys in panels if any(_series(records, k)[0] for k in keys)]
    if not drawn:
        return None
    fig, axes = plt.subplots(len(drawn), 1, figsize=(8, 2.8 * len(drawn)), sharex=True)
    axes = [axes] if len(drawn) == 1 else list(axes)
    for ax, (label, keys) in zip(axes, drawn, strict=True):
        for key in keys:
            xs, ys = _series(records, key)
            if xs:
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3, label=key)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    axes[-1].set_xlabel("step")
    if title:
        axes[0].set_title(title)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.stem + ".part.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
