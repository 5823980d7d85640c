"""Statistics, tables and charts of the quality protocol (results.jsonl -> summary, Markdown, PNG).

Per arm and metric: mean and sample standard deviation over the seeds. Against the baseline:
the difference of the means, the seed spread ``s_arm + s_baseline``, and whether the difference
*exceeds the spread* (|Δ| > s_arm + s_baseline, both arms with at least 2 seeds): a
deliberately plain, conservative rule. Arms share their seeds' data order and noise with the
baseline, so the paired differences (same seed) are reported too (mean ± std).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

# (key, label, higher is better)
METRICS: list[tuple[str, str, bool]] = [
    ("dub.sync_confidence", "dub: sync confidence", True),
    ("dub.sync_offset_acc", "dub: offset within ±1", True),
    ("dub.viseme_acc", "dub: viseme accuracy", True),
    ("dub.flicker", "dub: mouth flicker (levels)", False),
    ("dub.outside_psnr", "dub: outside-mask PSNR (dB)", True),
    ("recon.sync_confidence", "recon: sync confidence", True),
    ("recon.viseme_acc", "recon: viseme accuracy", True),
    ("recon.mouth_psnr", "recon: mouth PSNR (dB)", True),
    ("recon.flicker", "recon: mouth flicker (levels)", False),
]
BASELINE = "baseline"


def read_results(path: str | os.PathLike) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _mean_std(values: list[float]) -> tuple[float, float, int]:
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return float("nan"), float("nan"), 0
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v)


def summarise(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Arms' means ± std, differences to the baseline, and the reference rows."""
    arms: dict[str, list[dict[str, Any]]] = {}
    refs: dict[str, dict[str, Any]] = {}
    for rec in records:
        if rec.get("kind") == "arm" and rec.get("metrics"):
            arms.setdefault(rec["arm"], []).append(rec)
        elif rec.get("kind") in ("reference", "student", "fast") and rec.get("metrics"):
            refs[rec["name"]] = rec
    out: dict[str, Any] = {"arms": {}, "references": refs, "rule": "|delta| > s_arm + s_baseline"}
    base = {r["seed"]: r["metrics"] for r in arms.get(BASELINE, [])}
    for arm, runs in arms.items():
        row: dict[str, Any] = {
            "seeds": sorted(r["seed"] for r in runs),
            "steps": sorted({r.get("steps") for r in runs}),
        }
        for key, _, higher in METRICS:
            mean, std, n = _mean_std([r["metrics"].get(key) for r in runs])
            cell: dict[str, Any] = {"mean": mean, "std": std, "n": n}
            if arm != BASELINE and base:
                bm, bs, bn = _mean_std([m.get(key) for m in base.values()])
                delta = mean - bm
                spread = std + bs
                paired = [
                    r["metrics"].get(key) - base[r["seed"]].get(key)
                    for r in runs
                    if r["seed"] in base
                    and r["metrics"].get(key) is not None
                    and base[r["seed"]].get(key) is not None
                ]
                pm, ps, pn = _mean_std(paired)
                exceeds = bool(n >= 2 and bn >= 2 and math.isfinite(delta) and abs(delta) > spread)
                cell.update(
                    delta=delta,
                    spread=spread,
                    exceeds=exceeds,
                    better=bool(exceeds and (delta > 0) == higher),
                    paired_mean=pm,
                    paired_std=ps,
                    paired_n=pn,
                )
            row[key] = cell
        out["arms"][arm] = row
    return out


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None or not math.isfinite(x):
        return "–"
    return f"{x:.{digits}f}"


def markdown(summary: dict[str, Any], meta: dict[str, Any] | None = None) -> str:
    """The docs/QUALITY.md tables: arms (mean ± std), differences vs the baseline, reference rows
    and the student benchmark."""
    lines: list[str] = []
    keys = [m for m in METRICS]
    arms = summary["arms"]
    order = [BASELINE] + sorted(a for a in arms if a != BASELINE)
    order = [a for a in order if a in arms]
    if meta:
        lines.append(
            "Measured by `python -m lipsync.eval.protocol run` "
            f"({meta.get('date', '?')}, {meta.get('device', '?')}; {meta.get('steps', '?')} "
            f"fine-tuning steps of batch {meta.get('batch', '?')} per arm and seed, seeds "
            f"{meta.get('seeds', '?')}; {meta.get('eval', '')})."
        )
        lines.append("")
    lines.append("| arm | " + " | ".join(label for _, label, _ in keys) + " |")
    lines.append("| --- | " + " | ".join("---:" for _ in keys) + " |")
    for arm in order:
        row = arms[arm]
        cells = [f"{_fmt(row[k]['mean'])} ± {_fmt(row[k]['std'])}" for k, _, _ in keys]
        lines.append(f"| {arm} (n={len(row['seeds'])}) | " + " | ".join(cells) + " |")
    refs = summary.get("references", {})
    for name in ("teacher", "ground_truth", "ground_truth_dubbed"):
        if name in refs:
            m = refs[name]["metrics"]
            lines.append(f"| *{name}* | " + " | ".join(_fmt(m.get(k)) for k, _, _ in keys) + " |")
    lines.append("")
    if len(order) > 1:
        lines.append(
            "Difference to the baseline (Δ of the means; in brackets the seed spread "
            "s_arm + s_baseline; **bold** where |Δ| exceeds it; paired Δ over the "
            "shared seeds after the slash):"
        )
        lines.append("")
        lines.append("| arm | " + " | ".join(label for _, label, _ in keys) + " |")
        lines.append("| --- | " + " | ".join("---:" for _ in keys) + " |")
        for arm in order[1:]:
            cells = []
            for k, _, _ in keys:
                c = arms[arm][k]
                text = f"{c['delta']:+.3f}" if math.isfinite(c.get("delta", math.nan)) else "–"
                if c.get("exceeds"):
                    text = f"**{text}**"
                cells.append(
                    f"{text} ({_fmt(c.get('spread'))}) / "
                    f"{_fmt(c.get('paired_mean'))} ± {_fmt(c.get('paired_std'))}"
                )
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
        lines.append("")
    bench = summary.get("benchmark")
    if bench:
        lines.append(
            f"| sampler | U-Net calls / chunk | frames/s ({bench.get('device', '?')}) | "
            "dub: sync confidence | dub: viseme accuracy | dub: flicker | recon: mouth PSNR |"
        )
        lines.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for row in bench["rows"]:
            m = refs.get(row["name"], {}).get("metrics", {})
            lines.append(
                f"| {row['label']} | {row['calls']} | {_fmt(row['fps'], 1)} | "
                f"{_fmt(m.get('dub.sync_confidence'))} | {_fmt(m.get('dub.viseme_acc'))} | "
                f"{_fmt(m.get('dub.flicker'))} | {_fmt(m.get('recon.mouth_psnr'))} |"
            )
        lines.append("")
    return "\n".join(lines)


def chart(summary: dict[str, Any], records: list[dict[str, Any]], path: str | os.PathLike) -> None:
    """One panel per metric: each arm's seeds (dots) and mean ± std (bar); the teacher and the
    ground truth as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = summary["arms"]
    order = [BASELINE] + sorted(a for a in arms if a != BASELINE)
    order = [a for a in order if a in arms]
    cols = 3
    rows = math.ceil(len(METRICS) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    refs = summary.get("references", {})
    for ax, (key, label, higher) in zip(axes.flat, METRICS, strict=False):
        for i, arm in enumerate(order):
            c = arms[arm][key]
            color = (
                "tab:gray"
                if arm == BASELINE
                else (
                    "tab:green"
                    if c.get("better")
                    else "tab:red"
                    if c.get("exceeds")
                    else "tab:blue"
                )
            )
            ax.bar(
                i,
                c["mean"] if math.isfinite(c["mean"]) else 0,
                yerr=c["std"] or 0,
                color=color,
                alpha=0.5,
                capsize=3,
            )
            seeds = [
                r["metrics"].get(key) for r in records if r.get("kind") == "arm" and r["arm"] == arm
            ]
            ax.plot([i] * len(seeds), seeds, "k.", ms=4)
        for name, style in (("teacher", "--"), ("ground_truth", ":")):
            if name in refs and refs[name]["metrics"].get(key) is not None:
                ax.axhline(refs[name]["metrics"][key], color="k", ls=style, lw=0.8, label=name)
        ax.set_xticks(range(len(order)), order, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{label} {'↑' if higher else '↓'}", fontsize=9)
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(METRICS) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower right", fontsize=8)
    fig.suptitle(
        "quality protocol: arms × seeds (green/red: difference to the baseline exceeds "
        "the seed spread)",
        fontsize=10,
    )
    fig.tight_layout()
    tmp = Path(f"{path}.part.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)
