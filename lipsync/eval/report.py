"""Charts and pages people read: sync curves, offset histograms, frame strips, the suite report.

All PNGs are drawn with matplotlib's Agg backend and written atomically (temporary file +
rename). Every chart names the SyncNet that produced its numbers.
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lipsync.eval.sync import NOT_COMPARABLE, SyncResult  # noqa: E402


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".part" + path.suffix)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def plot_sync(result: SyncResult, path: str | os.PathLike, title: str = "") -> Path:
    """Two panels: mean distance per offset (the search), and confidence per window over time."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6))
    a.plot(result.offsets, result.mean_distances, marker="o", ms=3)
    a.axvline(result.offset, color="C3", ls="--", label=f"offset {result.offset:+d}")
    a.axvline(0, color="0.6", lw=0.8)
    a.set_xlabel("audio offset (frames; + = audio lags video)")
    a.set_ylabel("mean embedding distance")
    a.set_title(f"LSE-D {result.distance:.3f}, LSE-C {result.confidence:.3f}")
    a.legend(fontsize=8)
    t = [w.time for w in result.windows]
    b.plot(t, [w.confidence for w in result.windows], lw=1)
    b.set_xlabel("time (s, window start)")
    b.set_ylabel("confidence (median - min distance)")
    b.set_title("per 16-frame window")
    fig.suptitle(f"{title}\nSyncNet: {result.syncnet} (not comparable to published LSE-C)",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()
    return _save(fig, path)


def plot_suite(
    rows: Sequence[dict[str, Any]],
    results: dict[tuple[str, str], SyncResult],
    path: str | os.PathLike,
    syncnet: str,
    model: str,
) -> Path:
    """Sync confidence over time (every clip, per task) and the offset histograms."""
    tasks = sorted({task for _, task in results})
    fig, axes = plt.subplots(2, len(tasks), figsize=(6 * len(tasks), 7), squeeze=False)
    for col, task in enumerate(tasks):
        ax = axes[0, col]
        for (clip, t), res in results.items():
            if t != task:
                continue
            ax.plot([w.time for w in res.windows], [w.confidence for w in res.windows],
                    lw=1, alpha=0.7, label=clip)  # fmt: skip
        ax.set_title(f"{task}: sync confidence over time")
        ax.set_xlabel("time (s)")
        ax.set_ylabel("confidence")
        if sum(1 for _, t in results if t == task) <= 8:
            ax.legend(fontsize=7)
        ax = axes[1, col]
        offsets = [res.offset for (_, t), res in results.items() if t == task]
        bins = np.arange(-15.5, 16.5, 1.0)
        ax.hist(offsets, bins=bins, color="C1", edgecolor="k")
        ax.axvline(0, color="0.4", lw=0.8)
        ax.set_title(f"{task}: estimated offsets ({len(offsets)} clips)")
        ax.set_xlabel("offset (frames; + = audio lags video)")
        ax.set_ylabel("clips")
    fig.suptitle(f"model {model} — SyncNet {syncnet} (numbers not comparable to published "
                 "LSE-C)", fontsize=9)  # fmt: skip
    fig.tight_layout()
    return _save(fig, path)


def frame_strip(
    rows: Sequence[tuple[str, np.ndarray]], path: str | os.PathLike, title: str = ""
) -> Path:
    """Labelled rows of frames side by side: ``[(label, (k, H, W, 3) uint8)]``."""
    k = max(len(frames) for _, frames in rows)
    fig, axes = plt.subplots(len(rows), k, figsize=(1.9 * k, 2.0 * len(rows)), squeeze=False)
    for r, (label, frames) in enumerate(rows):
        for c in range(k):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(frames):
                ax.imshow(frames[c])
            if c == 0:
                ax.set_ylabel(label, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    head = "| " + " | ".join(columns) + " |\n| " + " | ".join("---" for _ in columns) + " |\n"
    return head + "".join("| " + " | ".join(cell(r.get(c)) for c in columns) + " |\n" for r in rows)


def html_page(title: str, summary: dict[str, Any], table_rows, columns, images) -> str:
    """A self-contained page (images referenced by relative path)."""
    esc = html.escape

    def cell(v: Any) -> str:
        if v is None:
            return "–"
        return f"{v:.4g}" if isinstance(v, float) else esc(str(v))

    rows = "".join(
        "<tr>" + "".join(f"<td>{cell(r.get(c))}</td>" for c in columns) + "</tr>"
        for r in table_rows
    )
    items = "".join(f"<li><b>{esc(k)}</b>: {cell(v)}</li>" for k, v in summary.items())
    figs = "".join(
        f'<figure><img src="{esc(src)}" style="max-width:100%"><figcaption>{esc(cap)}'
        "</figcaption></figure>"
        for src, cap in images
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
        "<style>body{font-family:sans-serif;max-width:1200px;margin:auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 6px;"
        "font-size:13px}</style></head><body>"
        f"<h1>{esc(title)}</h1><ul>{items}</ul><p><i>{esc(NOT_COMPARABLE)}</i></p>"
        f"<table><tr>{''.join(f'<th>{esc(c)}</th>' for c in columns)}</tr>{rows}</table>"
        f"{figs}</body></html>"
    )
