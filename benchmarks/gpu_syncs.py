"""Where does pass 2 make the host wait for the GPU? Runs the pipeline on the demo clip with
``torch.cuda.set_sync_debug_mode("warn")`` and counts every synchronising call by the lipsync
source line that made it (one JSON line per mode). Eager v1.6 with random weights: the code
paths are the model-independent ones.

    python benchmarks/gpu_syncs.py --video V --audio A --face-cache DIR --frames 48 \
        --modes exact,dpm6+fast
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
import traceback
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # gpu_e2e

import torch  # noqa: E402

from lipsync.models.bundle import load_models  # noqa: E402
from lipsync.pipeline import LipSyncPipeline, RunOptions  # noqa: E402


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
    from gpu_e2e import with_mode, write_audio_clip

    clip = write_audio_clip(args.audio, args.frames, args.out + ".wav")
    models = load_models(args.preset, device="cuda", dtype=torch.bfloat16, random_weights=True)
    pipe = LipSyncPipeline(models)
    base = RunOptions(seed=1247, face_cache=args.face_cache, force=True)
    for spec in args.modes.split(","):
        opts = base if spec == "exact" else with_mode(base, spec)
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
        print(json.dumps({
            "what": "syncs", "mode": spec, "frames": report.frames,
            "chunks": -(-report.frames // 16), "wall_s": round(time.perf_counter() - t, 2),
            "total": sum(sites.values()), "sites": dict(sites.most_common()),
            "device_name": torch.cuda.get_device_name(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"),
        }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
