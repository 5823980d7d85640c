"""Train our small SyncNet on one GPU for a wall-time budget, resumably, and hand back the files.

    python benchmarks/gpu_syncnet_train.py --data .corpus/processed --max-minutes 8 --out $OUT \
        [--config lipsync/configs/syncnet_synth_train.json] [--resume .syncnet_resume]

1. Checks that the modules training needs are importable (one line naming the missing ones).
2. Resumes: if the run folder (``--run``, default ``.runs/syncnet_synth``) has no checkpoint and
   ``--resume DIR`` holds the files a previous call wrote to its ``$OUT`` (``checkpoint.pt.NNN``
   parts + ``summary.json`` + ``metrics.jsonl``), the checkpoint is reassembled (sha256 checked)
   into the run folder first. With neither, training starts from scratch.
3. Trains with ``lipsync.train.syncnet`` until ``--max-minutes`` of training time, then
   checkpoints, validates (val split) and measures held-out accuracy on the test split.
4. Copies into ``--out`` (at most 8 files, each ≤ 15 MiB): ``syncnet.safetensors`` (fp16 model,
   config and name inside), ``metrics.jsonl``, ``metrics.png``, ``summary.json`` (numbers,
   timings, and what ``--resume`` needs), and the newest training checkpoint split into
   ``checkpoint.pt.000``, ``.001``, …

Copy the returned files into a carried folder (e.g. ``.syncnet_resume/``) and pass it as
``--resume`` to continue in a later call. Exit code 0 on success, 2 with one ``error:`` line
for a problem the caller can fix.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lipsync.own_checkpoints import file_sha256 as sha256  # noqa: E402

REQUIRED = ("torch", "numpy", "safetensors", "rich", "matplotlib")
CORPUS_REQUIRED = ("av",)  # decoding a processed corpus's videos (packs and toy data need none)
PART_BYTES = 15 * 2**20
MAX_FILES = 8
REPO = Path(__file__).resolve().parents[1]


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def split_file(path: Path, out: Path, stem: str) -> list[str]:
    names = []
    with open(path, "rb") as f:
        for k, block in enumerate(iter(lambda: f.read(PART_BYTES), b"")):
            name = f"{stem}.{k:03d}"
            (out / name).write_bytes(block)
            names.append(name)
    return names


def restore(resume: Path, run: Path) -> int | None:
    """Reassemble a checkpoint from ``resume`` into ``run``; returns its step (None: nothing)."""
    summary_file = resume / "summary.json"
    if not summary_file.is_file():
        return None
    info = json.loads(summary_file.read_text()).get("resume")
    if not info:
        return None
    target = run / "checkpoints" / f"step-{info['step']:08d}.pt"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".part")
    with open(tmp, "wb") as f:
        for name in info["parts"]:
            part = resume / name
            if not part.is_file():
                fail(f"--resume {resume}: part {name} is missing")
            f.write(part.read_bytes())
    if sha256(tmp) != info["sha256"]:
        tmp.unlink()
        fail(f"--resume {resume}: the reassembled checkpoint does not match its sha256")
    os.replace(tmp, target)
    (run / "config.json").write_text(json.dumps(info["config"], indent=1) + "\n")
    if (resume / "metrics.jsonl").is_file():
        shutil.copyfile(resume / "metrics.jsonl", run / "metrics.jsonl")
    return int(info["step"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="processed corpus folder, 'pack:DIR' or 'toy[:…]'")
    p.add_argument("--config", default=str(REPO / "lipsync/configs/syncnet_synth_train.json"))
    p.add_argument("--max-minutes", type=float, required=True, help="training wall time")
    p.add_argument("--out", default=os.environ.get("OUT"), help="where the files go ($OUT)")
    p.add_argument("--run", default=".runs/syncnet_synth", help="run folder on this machine")
    p.add_argument("--resume", default=".syncnet_resume", help="files of a previous call")
    p.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    p.add_argument("--num-workers", type=int, default=None, help="DataLoader workers")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--init", default=None, help="a SyncNet file to start from (fine-tuning)")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument("--schedule", choices=("constant", "cosine"), default=None)
    p.add_argument(
        "--max-steps",
        type=int,
        default=10**9,
        help="the cosine schedule's length; --max-minutes still stops it",
    )
    p.add_argument(
        "--no-checkpoint-files",
        action="store_true",
        help="return no checkpoint parts (fewer files; the run cannot be resumed)",
    )
    args = p.parse_args()
    if not args.out:
        fail("--out (or $OUT) is required")

    needed = REQUIRED
    if not args.data.startswith(("pack:", "toy")):
        needed += CORPUS_REQUIRED
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        fail(f"missing Python modules: {', '.join(missing)} (carry their wheels)")

    import torch

    from lipsync.errors import LipSyncError
    from lipsync.train.metrics import plot_metrics  # noqa: F401 - matplotlib works
    from lipsync.train.syncnet import SyncNetTrainConfig, train_syncnet

    if torch.cuda.is_available():  # speed over bit-exact resumption on the GPU
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out, run, resume = Path(args.out), Path(args.run), Path(args.resume)
    out.mkdir(parents=True, exist_ok=True)
    run.mkdir(parents=True, exist_ok=True)
    started = time.time()
    try:
        cfg = SyncNetTrainConfig.from_file(
            args.config, data=args.data, max_minutes=args.max_minutes,
            num_workers=args.num_workers, batch_size=args.batch_size, max_steps=args.max_steps,
            init=args.init, lr=args.lr, warmup_steps=args.warmup_steps, schedule=args.schedule,
        )  # fmt: skip
        has_ckpt = any((run / "checkpoints").glob("step-*.pt"))
        restored = None if has_ckpt else (restore(resume, run) if resume.is_dir() else None)
        if restored is not None:
            print(f"restored step {restored} from {resume}", file=sys.stderr)
        summary = train_syncnet(cfg, run, device=args.device, show_progress=sys.stderr.isatty())
    except LipSyncError as e:
        fail(str(e))

    ckpt = Path(summary["checkpoint"])
    for name in ("syncnet.safetensors", "metrics.jsonl", "metrics.png"):
        if (run / name).is_file():
            shutil.copyfile(run / name, out / name)
    parts = [] if args.no_checkpoint_files else split_file(ckpt, out, "checkpoint.pt")
    summary.update(
        restored_from_step=restored,
        wall_s=time.time() - started,
        torch=torch.__version__,
        gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        resume={
            "step": summary["steps"],
            "parts": parts,
            "sha256": sha256(ckpt),
            "config": json.loads((run / "config.json").read_text()),
        }
        if parts
        else None,
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    files = sorted(p.name for p in out.iterdir())
    too_big = [f for f in files if (out / f).stat().st_size > 16 * 2**20]
    if len(files) > MAX_FILES or too_big:
        fail(f"{out} holds {len(files)} files ({too_big} too big): over the transfer limits")
    test = summary.get("test") or {}
    print(json.dumps({
        "steps": summary["steps"], "stopped": summary["stopped"],
        "val_accuracy": (summary.get("val") or {}).get("accuracy"),
        "test_accuracy": test.get("accuracy"), "test_pairs": test.get("pairs"),
        "elapsed_s": summary["elapsed_s"], "files": files,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
