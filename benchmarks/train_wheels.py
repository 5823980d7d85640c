"""Fetch the wheels that training on the GPU machine needs and its image lacks (diffusers for
the VAE and schedulers, soundfile to read a pack's Opus audio) into ``.whl_train/``, for CPython
3.12 on x86-64 Linux, slimmed so that they travel beside a training pack:

* ``diffusers``: without ``diffusers/pipelines/`` (AutoencoderKL and the schedulers do not import
  it; 80 % of the wheel) — checked by importing what lipsync uses from the slimmed wheel;
* every wheel's members recompressed with LZMA (:func:`triton_wheels.slim`).

    python benchmarks/train_wheels.py [--dest .whl_train] [--python 3.12]

On the GPU machine (add ``.whl_train`` to the call's ``carry``):

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl_train/*.whl
    export PYTHONPATH=/tmp/site:$PYTHONPATH
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fetch_triton_wheels import check_imports, download, slim_all  # noqa: E402

# KINDS.md's package list for the GPU image has neither diffusers, importlib_metadata (which
# diffusers imports), soundfile, nor cffi / pycparser (which soundfile loads libsndfile with).
PACKAGES = [
    "diffusers==0.42.1",
    "importlib_metadata==8.7.0",
    "soundfile==0.14.0",
    "cffi==2.1.1",
    "pycparser==2.22",
]
DROPS = {"diffusers-": lambda name: name.startswith("diffusers/pipelines/")}
CHECK = (
    "from diffusers import AutoencoderKL, DDIMScheduler, DPMSolverMultistepScheduler; "
    "import soundfile; print('ok', soundfile.__libsndfile_version__)"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dest", default=".whl_train")
    ap.add_argument("--python", default="3.12")
    args = ap.parse_args()
    dest = Path(args.dest)
    download(dest, args.python, PACKAGES)
    wheels = sorted(dest.glob("*.whl"))
    slim_all(wheels, DROPS)
    check_imports([w for w in wheels if w.name.startswith("diffusers-")], CHECK)
    total = sum(p.stat().st_size for p in wheels)
    print(f"{dest}: {len(wheels)} wheels, {total / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
