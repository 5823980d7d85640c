"""``lipsync eval suite``: a model over held-out clips, two tasks, one table and a report.

* **reconstruction**: each clip re-synced to its own audio; scored by sync (SyncNet offset,
  confidence, distance) and compared with the original (:mod:`lipsync.eval.compare`);
* **dubbing**: each clip synced to the next clip's audio (cyclically); scored by sync only
  (there is no reference).
* **original**: the source clip's own sync, the baseline the two tasks are read against.

Clips: the ``final/*.mp4`` segments of a processed corpus whose record has the requested split,
or every ``*.mp4`` of a plain folder. Results per clip are written to ``OUT/clips/<id>.json``
as they finish; a rerun with the same ``OUT`` skips finished clips (resumable after a kill).
``OUT`` then holds ``suite.json`` (summary + rows), ``suite.md``, ``suite.png`` (confidence over
time, offset histograms), ``strips/<id>.png`` (frames of original, reconstruction and dub side
by side) and ``report.html``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lipsync.checkpoints import load_unet
from lipsync.errors import MediaError
from lipsync.eval import report
from lipsync.eval.compare import compare_videos
from lipsync.eval.sync import SyncResult, SyncScorer, WindowScore, score_video
from lipsync.media import read_frames
from lipsync.models.bundle import load_models
from lipsync.pipeline import LipSyncPipeline, RunOptions
from lipsync.train.checkpointing import atomic_write_text
from lipsync.train.progress import TrainProgress

TASKS = ("original", "reconstruction", "dubbing")
COMPARE_KEYS = (
    "psnr", "ssim", "mouth_psnr", "mouth_ssim", "landmark_error", "lip_opening_corr",
    "mouth_flicker",
)  # fmt: skip
COLUMNS = ("clip", "task", "offset", "confidence", "distance", *COMPARE_KEYS)


@dataclass(frozen=True)
class SuiteOptions:
    model: str  # preset name or a U-Net checkpoint file
    preset: str = "v1.5"  # architecture of a checkpoint file
    split: str = "test"
    max_clips: int | None = None
    steps: int = 20
    seed: int = 1247
    device: str | None = None
    checkpoint_dir: Path | None = None
    syncnet: Path | None = None
    syncnet_config: dict | None = None
    strip_frames: int = 6


def list_clips(data: str | os.PathLike, split: str) -> list[Path]:
    """The clips of ``data`` (see the module docstring), sorted by name."""
    root = Path(data).expanduser()
    if not root.is_dir():
        raise MediaError(f"data folder not found: {root}")
    final = root / "final"
    if final.is_dir():
        clips = []
        for record in sorted(final.glob("*.json")):
            try:
                info = json.loads(record.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            video = record.with_suffix(".mp4")
            if info.get("split") == split and video.is_file():
                clips.append(video)
        if not clips:
            raise MediaError(f"no {split!r} segments in {final}")
        return clips
    clips = sorted(root.glob("*.mp4"))
    if not clips:
        raise MediaError(f"no clips (*.mp4) in {root}")
    return clips


def _sync_from_dict(d: dict[str, Any]) -> SyncResult:
    windows = [
        WindowScore(w["start"], w["offset"], w["confidence"], w["distance"])
        for w in d["per_window"]
    ]
    return SyncResult(
        d["offset"], d["confidence"], d["distance"], d["syncnet"], d["offsets"],
        d["mean_distances"], windows, d["frames"], d["frames_with_face"],
    )  # fmt: skip


def _load_pipeline(options: SuiteOptions) -> tuple[LipSyncPipeline, str]:
    device = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    path = Path(options.model).expanduser()
    if path.is_file():
        models = load_models(options.preset, options.checkpoint_dir, device, dtype)
        models.unet = load_unet(path, models.preset.unet_config, device, dtype)
        return LipSyncPipeline(models), f"{path.name} ({options.preset} architecture)"
    models = load_models(options.model, options.checkpoint_dir, device, dtype)
    name = models.preset.name + (" (random weights)" if models.preset.random_weights else "")
    return LipSyncPipeline(models), name


def _strip(clip: Path, videos: dict[str, Path], path: Path, k: int, title: str) -> None:
    rows = []
    for label, video in videos.items():
        frames = read_frames(video)
        idx = np.linspace(0, len(frames) - 1, k).round().astype(int) if len(frames) else []
        rows.append((label, frames[idx]))
    report.frame_strip(rows, path, title=title)


def _clip_record(
    clip: Path, partner: Path | None, out: Path, pipeline, scorer, options: SuiteOptions, name: str
) -> dict[str, Any]:
    videos = out / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    run = RunOptions(steps=options.steps, seed=options.seed, force=True)
    recon = videos / f"{clip.stem}.reconstruction.mp4"
    pipeline.run(clip, clip, recon, run)
    record: dict[str, Any] = {"clip": clip.stem, "source": str(clip), "tasks": {}}
    record["tasks"]["original"] = {"sync": score_video(scorer, clip).as_dict()}
    record["tasks"]["reconstruction"] = {
        "sync": score_video(scorer, recon).as_dict(),
        "compare": compare_videos(recon, clip, device=scorer.device).as_dict(),
        "video": str(recon),
    }
    shown = {"original": clip, "reconstruction": recon}
    if partner is not None:
        dub = videos / f"{clip.stem}.dubbing.mp4"
        pipeline.run(clip, partner, dub, run)
        record["tasks"]["dubbing"] = {
            "sync": score_video(scorer, dub).as_dict(),
            "audio_from": partner.stem,
            "video": str(dub),
        }
        shown["dubbing"] = dub
    strip = out / "strips" / f"{clip.stem}.png"
    _strip(clip, shown, strip, options.strip_frames, f"{clip.stem} — model {name}")
    record["strip"] = str(strip.relative_to(out))
    return record


def _rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for rec in records:
        for task in TASKS:
            if task not in rec["tasks"]:
                continue
            t = rec["tasks"][task]
            row = {"clip": rec["clip"], "task": task}
            row.update({k: t["sync"][k] for k in ("offset", "confidence", "distance")})
            row.update({k: t.get("compare", {}).get(k) for k in COMPARE_KEYS})
            rows.append(row)
    return rows


def _means(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for task in TASKS:
        sel = [r for r in rows if r["task"] == task]
        if not sel:
            continue
        m: dict[str, Any] = {"clip": f"mean of {len(sel)}", "task": task}
        for key in ("offset", "confidence", "distance", *COMPARE_KEYS):
            vals = [r[key] for r in sel if isinstance(r.get(key), int | float)]
            m[key] = float(np.mean(vals)) if vals else None
        m["abs_offset"] = float(np.mean([abs(r["offset"]) for r in sel]))
        out.append(m)
    return out


def run_suite(
    data: str | os.PathLike,
    out: str | os.PathLike,
    options: SuiteOptions,
    show_progress: bool = True,
) -> dict[str, Any]:
    out = Path(out)
    clips = list_clips(data, options.split)[: options.max_clips]
    scorer = SyncScorer.from_checkpoint(options.syncnet, options.device, options.syncnet_config)
    pipeline, model_name = _load_pipeline(options)
    (out / "clips").mkdir(parents=True, exist_ok=True)
    records, ran, start = [], 0, time.perf_counter()
    with TrainProgress(len(clips), 0, show_progress, what="clips") as bar:
        for i, clip in enumerate(clips):
            done = out / "clips" / f"{clip.stem}.json"
            if done.exists():
                records.append(json.loads(done.read_text()))
            else:
                partner = clips[(i + 1) % len(clips)] if len(clips) > 1 else None
                rec = _clip_record(clip, partner, out, pipeline, scorer, options, model_name)
                atomic_write_text(done, json.dumps(rec) + "\n")
                records.append(rec)
                ran += 1
            bar.update(i + 1)
    seconds = time.perf_counter() - start
    rows = _rows(records)
    means = _means(rows)
    results = {
        (rec["clip"], task): _sync_from_dict(t["sync"])
        for rec in records
        for task, t in rec["tasks"].items()
    }
    report.plot_suite(rows, results, out / "suite.png", scorer.name, model_name)
    summary = {
        "model": model_name,
        "syncnet": scorer.name,
        "data": str(data),
        "split": options.split,
        "clips": len(clips),
        "clips_run_now": ran,
        "seconds": seconds,
        "clips_per_s": ran / seconds if ran else None,
        "device": str(scorer.device),
        "steps": options.steps,
        "seed": options.seed,
        "means": means,
        "notes": [report.NOT_COMPARABLE]
        + ([] if len(clips) > 1 else ["one clip only: no dubbing task"]),
    }
    atomic_write_text(out / "suite.json", json.dumps({**summary, "rows": rows}, indent=1) + "\n")
    md = (
        f"# lipsync eval suite\n\nmodel **{model_name}**, SyncNet **{scorer.name}**, "
        f"{len(clips)} clips of `{data}` ({options.split}), {options.steps} steps, "
        f"seed {options.seed}, {summary['device']}"
        + (f", {summary['clips_per_s']:.3f} clips/s" if ran else "")
        + f".\n\n{report.NOT_COMPARABLE}.\n\n## Means\n\n"
        + report.markdown_table(means, [*COLUMNS, "abs_offset"])
        + "\n## Per clip\n\n"
        + report.markdown_table(rows, COLUMNS)
    )
    atomic_write_text(out / "suite.md", md)
    images = [("suite.png", "sync confidence over time and offset histograms")]
    images += [(rec["strip"], f"{rec['clip']}: original / reconstruction / dubbing")
               for rec in records]  # fmt: skip
    page = report.html_page(
        f"lipsync eval suite — {model_name}",
        {k: v for k, v in summary.items() if k not in ("means", "notes")},
        means + rows,
        [*COLUMNS, "abs_offset"],
        images,
    )
    atomic_write_text(out / "report.html", page)
    return summary
