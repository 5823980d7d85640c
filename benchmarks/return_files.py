"""Fit the results of several jobs of one GPU call into what a call can hand back (at most 8
files of at most 16 MiB under ``$OUT``).

    python3 benchmarks/return_files.py WORK --out $OUT [--same-as lipsync/weights/demo ...]

Every file under ``WORK`` of at least ``--big`` bytes (default 1 MiB) is copied to ``OUT`` at
its relative path, unless its bytes equal a file under a ``--same-as`` folder (e.g. a VAE the
call only passed through); all smaller files go into ``OUT/small.tar.gz``, with ``index.json``
(every file: path, bytes, sha256 of the big ones, where it went). Exit code 2 with one
``error:`` line when the result would not fit (then the big files are listed and nothing is
copied).
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lipsync.own_checkpoints import file_sha256 as sha256  # noqa: E402

MAX_FILES = 8
MAX_BYTES = 15 * 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--same-as", type=Path, nargs="*", default=[])
    ap.add_argument("--big", type=int, default=2**20)
    args = ap.parse_args()
    known = {sha256(p): str(p) for d in args.same_as for p in d.rglob("*") if p.is_file()}
    index, big, small = [], [], []
    for path in sorted(p for p in args.work.rglob("*") if p.is_file()):
        rel, size = path.relative_to(args.work), path.stat().st_size
        entry = {"path": str(rel), "bytes": size}
        if size >= args.big:
            entry["sha256"] = digest = sha256(path)
            if digest in known:
                entry["went"] = f"not returned: same bytes as {known[digest]}"
            else:
                entry["went"] = "returned"
                big.append((path, rel))
        else:
            entry["went"] = "small.tar.gz"
            small.append((path, rel))
        index.append(entry)
    too_big = [str(rel) for path, rel in big if path.stat().st_size > MAX_BYTES]
    if len(big) + 1 > MAX_FILES or too_big:
        print(f"error: {len(big)} big files ({too_big} over 15 MiB): over the return limits: "
              + ", ".join(str(rel) for _, rel in big), file=sys.stderr)  # fmt: skip
        sys.exit(2)
    args.out.mkdir(parents=True, exist_ok=True)
    for path, rel in big:
        (args.out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, args.out / rel)
    with tarfile.open(args.out / "small.tar.gz", "w:gz") as tar:
        for path, rel in small:
            tar.add(path, arcname=str(rel))
        data = json.dumps(index, indent=1).encode()
        info = tarfile.TarInfo("index.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    print(json.dumps({"returned": [str(r) for _, r in big], "small_files": len(small)}))


if __name__ == "__main__":
    main()
