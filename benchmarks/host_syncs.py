"""Where does pass 2 make the host wait for the GPU? Runs the pipeline on the demo clip with
``torch.cuda.set_sync_debug_mode("warn")`` and counts every synchronising call by the lipsync
source line that made it (one JSON line per mode). Eager v1.6 with random weights: the code
paths are the model-independent ones.

    python benchmarks/host_syncs.py --video V --audio A --face-cache DIR --frames 48 \
        --modes exact,dpm6+fast

Results: docs/PERFORMANCE.md ("Pass 2 without host syncs"), docs/NOTES.md; was ``gpu_syncs.py``.
"""

from __future__ import annotations

import argparse
import collections
import os
import time
import traceback
import warnings

import common
import torch

from lipsync.config import LoadOptions
from lipsync.loading import load_models
from lipsync.pipeline import LipSyncPipeline, RunOptions


def lipsync_site(stack) -> str:
    """The innermost lipsync frame of a stack (where our code asked for the sync)."""
    marker = f"{os.sep}lipsync{os.sep}"
    for frame in reversed(stack):
        if marker in frame.filename:
            return f"{frame.filename.split(marker)[-1]}:{frame.lineno} {frame.line}"
    return "(outside lipsync)"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--video", required=True)
    ap.add_argument("--audio", required=True)
    ap.add_argument("--face-cache", required=True)
    ap.add_argument("--out", default="/tmp/syncs.mp4")
    ap.add_argument("--preset", default="v1.6")
    ap.add_argument("--frames", type=int, default=48)
    ap.add_argument("--modes", default="exact")
    args = ap.parse_args()
    clip = common.write_audio_clip(args.audio, args.frames, args.out + ".wav")
    load = LoadOptions(preset=args.preset, device="cuda", dtype="bf16", random_weights=True)
    pipe = LipSyncPipeline(load_models(load))
    base = RunOptions(seed=1247, face_cache=args.face_cache, force=True)
    for spec in args.modes.split(","):
        opts = common.with_mode(base, spec)
        pipe.run(args.video, clip, args.out, opts)  # warm-up
        sites: collections.Counter = collections.Counter()

        def record(message, category, filename, lineno, file=None, line=None, sites=sites):
            sites[lipsync_site(traceback.extract_stack()[:-1])] += 1

        old = warnings.showwarning
        warnings.showwarning = record
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        t = time.perf_counter()
        try:
            report = pipe.run(args.video, clip, args.out, opts)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = old
        common.emit({
            "what": "syncs", "mode": spec, "frames": report.frames,
            "chunks": -(-report.frames // 16), "wall_s": round(time.perf_counter() - t, 2),
            "total": sum(sites.values()), "sites": dict(sites.most_common()),
        })  # fmt: skip


if __name__ == "__main__":
    main()
