"""Throughput of ``lipsync data process`` (steps 1-7; step 6 skipped without a SyncNet) with 1
and with 2 local workers, on copies of the 1080 x 1920, 10 s demo clip.

    python benchmarks/data_process.py --clips 6 --workers 1 2 --out /tmp/bench.json

For each worker count: a fresh output folder, wall seconds, clips (segments) per minute, the
CPU seconds the tasks used (all workers, from the run log) and per-step wall / CPU seconds, and
the machine's load average before and after (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from lipsync.data.process import ProcessOptions, process_corpus


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clips", type=int, default=6)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--video", default=str(Path(os.environ.get("LIPSYNC_SHARED", "../shared"))
                                           / "media" / "demo1_video.mp4"))  # fmt: skip
    ap.add_argument("--out", default="data_process_bench.json")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="lipsync-bench-"))
    src = root / "in"
    src.mkdir()
    for k in range(args.clips):
        shutil.copy(args.video, src / f"clip{k:03d}.mp4")
    results = []
    for workers in args.workers:
        out = root / f"out-{workers}"
        load0 = os.getloadavg()
        t = time.perf_counter()
        report = process_corpus(src, out, ProcessOptions(workers=workers, progress=False))
        wall = time.perf_counter() - t
        segments = report.summary.segments_kept + sum(
            n for (kind, step, _), (n, _) in report.summary.dropped.items()
            if kind == "segment" and step in ("faces", "sync", "quality")
        )  # fmt: skip
        results.append({
            "workers": workers,
            "clips": args.clips,
            "segments_through_step5": segments,
            "wall_s": round(wall, 2),
            "clips_per_minute": round(args.clips / wall * 60, 2),
            "task_cpu_s": round(report.cpu_seconds, 2),
            "steps_wall_cpu_s": {k: [round(w, 2), round(c, 2)] for k, (w, c) in
                                 sorted(report.timings.items())},  # fmt: skip
            "loadavg_before": load0,
            "loadavg_after": os.getloadavg(),
            "cpus": os.cpu_count(),
        })  # fmt: skip
        print(json.dumps(results[-1]), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
