"""Fetch the wheels ``benchmarks/triton_bench.py`` needs on a GPU machine with no network
(PyTriton, tritonclient and what the GPU image lacks for them) into ``.whl_triton/``, and numpy
1.26 for Triton's Python-backend stub into ``.whl_triton/stub/``, for CPython 3.12 on x86-64
Linux, and slim them so that they travel (about 49 MB instead of 100):

* ``nvidia-pytriton``: only the Python-backend stub of the target Python version is kept (the
  wheel carries stubs for 3.8-3.13, and a private libpython3.13 for the 3.13 one: -16 MB);
* ``tritonclient``: without ``perf_analyzer`` / ``perf_client`` (two 20 MB binaries);
* ``numpy``: without its tests;
* every wheel's members recompressed with LZMA (pip extracts wheels with ``zipfile``, which
  reads them; the files and RECORD hashes are unchanged): about -30 %.

    python benchmarks/triton_wheels.py [--dest .whl_triton] [--python 3.12]

numpy 1.26 for the stub only: the Python-backend stub (pybind11, built against numpy 1.x)
misreads numpy 2 arrays (BYTES inputs arrive garbled: "unpack_from requires a buffer of at
least 117901067 bytes"), so PyTriton 0.7.0 needs numpy < 2 where the stub runs; the rest of
the process keeps the image's numpy 2 (its scipy, which diffusers imports, may need it). The
stub embeds Python in isolated mode: it ignores PYTHONPATH and sees only the interpreter's
site-packages and what a ``.pth`` file there adds; triton_bench.py writes one that puts
``--stub-site`` and PyTriton's folder first, for the stub only. On the GPU machine:

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl_triton/*.whl
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/stub \
        .whl_triton/stub/*.whl
    PYTHONPATH=/tmp/site python3 benchmarks/triton_bench.py --stub-site /tmp/stub ...
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

# What the GPU image lacks (its package list: /work/.library/device/KINDS.md). tritonclient 2.51
# wants geventhttpclient <= 2.0.2, which has no cp312 wheel; 2.0.12 works with it. protobuf < 5
# for tritonclient 2.51's generated code; grpcio >= 1.67 for its generated stubs (the image's
# version is not known here); setuptools < 81 for pkg_resources, which tritonclient's
# shared-memory module imports. Tested together on CPython 3.12.1 with numpy 2.5.2 in the
# interpreter and numpy 1.26.4 for the stub: gRPC and HTTP, with and without shared memory.
PACKAGES = [
    "nvidia-pytriton==0.7.0",
    "tritonclient==2.51.0",
    "sh==2.4.0",
    "pyzmq==27.3.0",
    "python-rapidjson==1.25",
    "geventhttpclient==2.0.12",
    "gevent==26.9.0",
    "greenlet==3.5.6",
    "zope.event==6.2",
    "zope.interface==8.7",
    "brotli==1.2.1",
    "protobuf==4.25.9",
    "setuptools==80.9.0",
    "grpcio==1.85.3",
]
STUB_PACKAGES = ["numpy==1.26.4"]  # for the Python-backend stub only
PLATFORMS = [
    "manylinux_2_35_x86_64", "manylinux_2_34_x86_64", "manylinux_2_31_x86_64",
    "manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
    "manylinux2014_x86_64", "manylinux1_x86_64",
]  # fmt: skip


def slim(wheel: Path, drop=lambda name: False) -> int:
    """Rewrite ``wheel`` without the members ``drop(name)`` selects, LZMA-compressed; returns
    the bytes saved."""
    before = wheel.stat().st_size
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_LZMA) as dst:
        removed = {i.filename for i in src.infolist() if drop(i.filename)}
        for info in src.infolist():
            if info.filename in removed:
                continue
            data = src.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines()
                keep = [line for line in lines if line.split(",", 1)[0] not in removed]
                data = ("\n".join(keep) + "\n").encode()
            dst.writestr(info, data, compress_type=zipfile.ZIP_LZMA)
    tmp.replace(wheel)
    return before - wheel.stat().st_size


def download(dest: Path, python: str, packages: list[str]) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--python-version", python, "--implementation", "cp", "--dest", str(dest),
            *[f"--platform={p}" for p in PLATFORMS], *packages,
        ],
        check=True,
    )  # fmt: skip


def slim_all(wheels: list[Path], drops: dict[str, Callable[[str], bool]]) -> None:
    """:func:`slim` every wheel not slimmed before, dropping the members ``drops[prefix]`` names
    in the wheels whose file name starts with ``prefix``."""
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as z:
            if all(i.compress_type == zipfile.ZIP_LZMA for i in z.infolist()):
                continue  # slimmed before
        drop = next((d for prefix, d in drops.items() if wheel.name.startswith(prefix)), None)
        saved = slim(wheel, drop) if drop else slim(wheel)
        print(f"{wheel.name}: -{saved / 1e6:.1f} MB")


def check_imports(wheels: list[Path], code: str) -> None:
    """Install ``wheels`` into a temporary folder and run ``code`` with only them added to the
    path: the slimmed wheels still import."""
    with tempfile.TemporaryDirectory() as site:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                        "--target", site, *map(str, wheels)], check=True)  # fmt: skip
        subprocess.run([sys.executable, "-c", code], check=True,
                       env={**os.environ, "PYTHONPATH": site})  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dest", default=".whl_triton")
    ap.add_argument("--python", default="3.12")
    args = ap.parse_args()
    dest = Path(args.dest)
    download(dest, args.python, PACKAGES)
    download(dest / "stub", args.python, STUB_PACKAGES)
    stub = f"pytriton/tritonserver/python_backend_stubs/{args.python}/"
    drops = {
        "nvidia_pytriton-": lambda n: (
            n.startswith("pytriton/tritonserver/python_backend_stubs/")
            and not n.startswith(stub) and not n.endswith("/")
        ) or n.startswith("nvidia_pytriton.libs/libpython3-"),
        "tritonclient-": lambda n: "/data/bin/perf_" in n,
        "numpy-": lambda n: "/tests/" in n,
    }  # fmt: skip
    wheels = sorted([*dest.glob("*.whl"), *dest.glob("stub/*.whl")])
    slim_all(wheels, drops)
    total = sum(p.stat().st_size for p in wheels)
    print(f"{dest}: {len(wheels)} wheels, {total / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
