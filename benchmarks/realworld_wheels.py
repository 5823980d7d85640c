"""Prepare what ``benchmarks/gpu_realworld.py`` needs on the GPU machine and its image lacks
(KINDS.md's package list has neither PyAV, diffusers nor importlib_metadata; nothing can be
fetched there): the wheels, for CPython 3.12 on x86-64 Linux, slimmed, in ``.whl_realworld/``,
and the demo clip (``../shared`` does not travel) in ``.bench_media/``. Both folders are ignored
by git; name them in the call's ``carry`` (together about 30 MB of the 64 MiB a call may carry).

    python benchmarks/realworld_wheels.py [--dest .whl_realworld] [--media .bench_media]

* ``av``: the version this project's virtual environment runs (its FFmpeg libraries inside),
  LZMA-recompressed;
* ``diffusers``: without ``diffusers/pipelines/`` (AutoencoderKL and the schedulers do not import
  it), checked by importing what lipsync uses from the slimmed wheel;
* ``importlib_metadata`` (diffusers imports it).

On the GPU machine:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \\
        .whl_realworld/*.whl && export PYTHONPATH=/tmp/site
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from fetch_triton_wheels import check_imports, download, slim_all  # noqa: E402

PACKAGES = ["av==18.1.0", "diffusers==0.42.1", "importlib_metadata==8.7.0"]
DROPS = {"diffusers-": lambda name: name.startswith("diffusers/pipelines/")}
CHECK = (
    "import av; from diffusers import AutoencoderKL, DDIMScheduler, DPMSolverMultistepScheduler; "
    "print('ok: av', av.__version__)"
)
MEDIA = ("demo1_video.mp4", "demo1_audio.wav")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dest", type=Path, default=common.REPO / ".whl_realworld")
    ap.add_argument("--media", type=Path, default=common.REPO / ".bench_media")
    ap.add_argument("--python", default="3.12")
    args = ap.parse_args()
    download(args.dest, args.python, PACKAGES)
    wheels = sorted(args.dest.glob("*.whl"))
    slim_all(wheels, DROPS)
    check_imports(wheels, CHECK)
    args.media.mkdir(parents=True, exist_ok=True)
    for name in MEDIA:  # byte for byte: the face track in benchmarks/data/faces is keyed by it
        shutil.copyfile(common.shared_media() / name, args.media / name)
    sizes = [p.stat().st_size for p in [*wheels, *args.media.iterdir()]]
    print(f"{args.dest} + {args.media}: {len(sizes)} files, {sum(sizes) / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
