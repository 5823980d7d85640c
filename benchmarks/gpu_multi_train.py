"""Training on several GPUs of one host: throughput, scaling, GPU busy share and memory, measured
with ``torchrun`` on 1, 2, 4 … GPUs, unattended, within a wall-time budget.

    python3 benchmarks/gpu_multi_train.py --pack .pack --out $OUT            # every GPU there
    python3 benchmarks/gpu_multi_train.py --pack PACK --out DIR --device cpu --smoke   # CPU, gloo

For each process count N (``--gpus``; default 1, 2, 4, 8 up to ``torch.cuda.device_count()``;
on the CPU 1 and 2, gloo), one ``torchrun --standalone --nproc_per_node N`` launch each of:

(a) ``syncnet``: ``lipsync train syncnet`` on ``pack:PACK`` with the small synth config
    (``syncnet_synth_train.json``; validation and test off), global batch ``--syncnet-batch``;
(b) ``unet``: ``lipsync train unet`` with ``data.pack`` (:mod:`lipsync.train.pack_windows`: the
    DataLoader path, the VAE encoding every step) and the demo recipe's stage-2 settings: the
    demo U-Net with motion modules at 256 px, every parameter training, noise MSE + 0.05 ·
    SyncNet loss on the decoded lower half, bf16, global batch ``--unet-batch`` (16); random
    weights (scratch U-Net, the demo VAE's architecture seeded, a seeded small SyncNet);
(c) ``fsdp`` (N = 1 and the largest N only): memory of the 512 px stage-2 config
    (``unet_stage2_512_config.json``, motion modules + attentions training, SD-VAE, official
    StableSyncNet, LPIPS-VGG and TREPA's VideoMAE-g, random weights: ``gpu_train_stage2.py``'s
    build) under FSDP2 (``lipsync.train.building.wrap_model``, the ``lipsync train unet`` path)
    with ``--fsdp-batch`` windows per GPU, a few steps of ``TrainLoop.train_step``. This one is
    launched as ``torchrun … gpu_multi_train.py --worker fsdp``, not through the CLI: the CLI's
    final checkpoint of a 1.3 B-parameter model would cost more than the whole measurement.

Every (a)/(b) launch at one N uses the same global batch (per-process batch = global / N) and
the same seed, so the loss curves must agree with N = 1 (the data order and per-sample noise do
not depend on the process count). Per launch: samples/s between the step ``--warmup`` record and
the last one (wall clock, data loading included), scaling efficiency ``rate_N / (N · rate_1)``
(strong scaling: the per-GPU batch shrinks with N), GPU busy share (mean ``utilization.gpu`` of
``nvidia-smi -lms 200`` over those same seconds, per GPU), peak memory per GPU (nvidia-smi's
``memory.used``, and PyTorch's peak allocated per rank from the run's summary), the loss curve
and its largest relative difference from N = 1, start-up seconds (launch to first step).

Writes ``OUT/multi_train.json``, ``OUT/multi_train.png`` (when matplotlib is there) and
``OUT/multi_train_logs.txt`` (the end of each launch's output); prints a compact table. The pack
is decoded once (``$LIPSYNC_PACK_CACHE``, memory-mapped by every process). Launch order, most
telling first: syncnet and unet at 1 and at the most GPUs, fsdp at 1 and the most, then the
counts in between; a launch that would not fit in what is left of ``--budget-s`` is skipped (and
says so), one that overruns ``--cap-s`` is stopped and keeps what it logged.
NVLink multicast stays off in every process (NCCL_NVLS_ENABLE=0,
TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

# NVLink multicast off in this process (set in main(), before torch is imported: every torch
# import here is inside a function) and in every child (child_env).
NO_MULTICAST = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}

REPO = Path(__file__).resolve().parents[1]
for _p in (str(REPO), str(REPO / "benchmarks")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from lipsync.tools.procs import stop_process  # noqa: E402 (no torch: see NO_MULTICAST)

# The demo recipe's VAE architecture (lipsync.train.demo_recipe.DEFAULTS["vae"]).
DEMO_VAE = {"block_out_channels": [32, 64, 96, 96], "layers_per_block": 1, "norm_num_groups": 32,
            "latent_channels": 4}  # fmt: skip
DEMO_UNET = "train/unet_demo_256_config.json"

# --smoke: tiny models for a CPU run (shapes of tests/train_fixtures.py).
TINY_UNET = {
    "in_channels": 13, "out_channels": 4, "block_out_channels": [32, 64],
    "down_block_types": ["CrossAttnDownBlock3D", "DownBlock3D"],
    "up_block_types": ["UpBlock3D", "CrossAttnUpBlock3D"], "layers_per_block": 1,
    "attention_head_dim": 8, "cross_attention_dim": 384, "norm_num_groups": 32,
    "use_motion_module": True, "motion_module_resolutions": [1, 2],
    "motion_module_kwargs": {"num_attention_heads": 8, "temporal_position_encoding_max_len": 24},
}  # fmt: skip
TINY_VAE = {"block_out_channels": [8, 16, 16, 16], "layers_per_block": 1, "norm_num_groups": 8,
            "latent_channels": 4, "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4}  # fmt: skip
TINY_SYNCNET_64 = {
    "num_frames": 16, "resolution": 64,
    "audio_encoder": {"in_channels": 1, "block_out_channels": [32, 32, 32, 32, 64, 64],
                      "downsample_factors": [[2, 1], 2, 2, 2, [5, 2], [1, 2]],
                      "attn_blocks": [0, 0, 0, 0, 0, 0]},
    "visual_encoder": {"in_channels": 48, "block_out_channels": [32, 32, 32, 32, 64, 64],
                       "downsample_factors": [[1, 2], 2, 2, 2, 2, 2],
                       "attn_blocks": [0, 0, 0, 0, 0, 0]},
}  # fmt: skip
SMOKE = {
    "syncnet_model": "syncnet_tiny_config.json", "syncnet_batch": 4, "syncnet_steps": 4,
    "syncnet_workers": 0, "warmup": 1,
    "unet_config": json.dumps(TINY_UNET), "vae_config": json.dumps(TINY_VAE),
    "sync_syncnet_config": "syncnet_tiny_config.json", "unet_batch": 2, "unet_steps": 3,
    "unet_workers": 0, "unet_warmup": 1,
    "fsdp_unet_config": json.dumps(TINY_UNET), "fsdp_vae_config": json.dumps(TINY_VAE),
    "fsdp_syncnet_config": json.dumps(TINY_SYNCNET_64), "fsdp_resolution": 64,
    "fsdp_lpips": False, "fsdp_trepa": False, "fsdp_batch": 1, "fsdp_steps": 2,
    "fsdp_warmup": 1, "cap_s": 600.0,
}  # fmt: skip


# --------------------------------------------------------------------------- analysis (pure)


def train_records(path: Path) -> list[dict[str, Any]]:
    """The per-step train records of a run's metrics.jsonl (sorted by step, one per step)."""
    if not path.is_file():
        return []
    out: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line of a stopped run
        if "loss" in rec and "unix_s" in rec and rec.get("split", "train") == "train":
            out[int(rec["step"])] = rec
    return [out[k] for k in sorted(out)]


def steady_rate(records: list[dict[str, Any]], warmup: int, samples_per_step: int) -> dict:
    """Samples/s and s/step between the record of step ``warmup`` (or the first after it) and
    the last record: wall clock, so data loading counts. Empty when too few steps."""
    after = [r for r in records if r["step"] >= max(warmup, 1)]
    if len(after) < 2:
        return {}
    a, b = after[0], after[-1]
    steps, seconds = b["step"] - a["step"], b["unix_s"] - a["unix_s"]
    if steps <= 0 or seconds <= 0:
        return {}
    return {
        "samples_per_s": round(steps * samples_per_step / seconds, 3),
        "step_s": round(seconds / steps, 4),
        "measured_steps": steps,
        "window_unix_s": [a["unix_s"], b["unix_s"]],
    }


def parse_smi(
    text: str, started_unix: float | None = None
) -> list[tuple[float, int, float, float]]:
    """nvidia-smi CSV lines ``timestamp, index, utilization.gpu, memory.used`` -> (unix s, gpu,
    busy %, MiB). nvidia-smi prints local time; a whole-quarter-hour offset from
    ``started_unix`` (another time zone than Python's) is removed."""
    rows = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 4:
            continue
        try:
            ts = datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
            rows.append((ts, int(parts[1]), float(parts[2]), float(parts[3])))
        except ValueError:
            continue
    if rows and started_unix is not None:
        offset = started_unix - rows[0][0]
        if abs(offset) > 600:
            shift = round(offset / 900) * 900
            rows = [(t + shift, g, u, m) for t, g, u, m in rows]
    return rows


def gpu_stats(rows, gpus: int, window: list[float] | None) -> dict:
    """Per GPU 0..gpus-1: mean busy % inside ``window`` (all samples without one) and the peak
    memory used over the whole launch (GiB)."""
    busy, peak = [], []
    for g in range(gpus):
        mine = [r for r in rows if r[1] == g]
        inside = [r[2] for r in mine if window is None or window[0] <= r[0] <= window[1]]
        busy.append(round(sum(inside) / len(inside), 1) if inside else None)
        peak.append(round(max(r[3] for r in mine) / 1024, 2) if mine else None)
    known = [b for b in busy if b is not None]
    return {
        "busy_pct_per_gpu": busy,
        "busy_share": round(sum(known) / len(known) / 100, 3) if known else None,
        "smi_peak_gib_per_gpu": peak,
    }


def loss_difference(base: list[dict[str, Any]], other: list[dict[str, Any]]) -> float | None:
    """Largest relative difference of the train loss at the steps both runs logged."""
    a = {r["step"]: r["loss"] for r in base}
    diffs = [abs(r["loss"] - a[r["step"]]) / max(abs(a[r["step"]]), 1e-12)
             for r in other if r["step"] in a]  # fmt: skip
    return round(max(diffs), 6) if diffs else None


def add_efficiency(runs: list[dict[str, Any]]) -> None:
    """``efficiency`` = rate_N / (N · rate_1) per phase (strong scaling, same global batch)."""
    for phase in {r["phase"] for r in runs}:
        base = next((r for r in runs if r["phase"] == phase and r["n"] == 1), None)
        rate1 = (base or {}).get("samples_per_s")
        for r in runs:
            if r["phase"] == phase and rate1 and r.get("samples_per_s"):
                r["speedup"] = round(r["samples_per_s"] / rate1, 3)
                r["efficiency"] = round(r["samples_per_s"] / (r["n"] * rate1), 3)


# --------------------------------------------------------------------------- launching


class GpuSampler:
    """``nvidia-smi --query-gpu=… -lms 200`` into a file while a launch runs."""

    QUERY = "timestamp,index,utilization.gpu,memory.used"

    def __init__(self, path: Path, interval_ms: int = 200):
        self.path, self.proc, self.started = path, None, time.time()
        exe = shutil.which("nvidia-smi")
        if exe is None:
            return
        self.file = open(path, "w")
        self.proc = subprocess.Popen(
            [exe, f"--query-gpu={self.QUERY}", "--format=csv,noheader,nounits",
             "-lms", str(interval_ms)],
            stdout=self.file, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def stop(self) -> list[tuple[float, int, float, float]]:
        if self.proc is None:
            return []
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.file.close()
        return parse_smi(self.path.read_text(), self.started)


def child_env(args, n: int) -> dict[str, str]:
    cpus = os.cpu_count() or 1
    path = os.pathsep.join(p for p in [str(REPO), os.environ.get("PYTHONPATH", "")] if p)
    return {
        **os.environ,
        **NO_MULTICAST,
        "PYTHONPATH": path,
        "PYTHONUNBUFFERED": "1",
        "LIPSYNC_PROGRESS": "0",
        "LIPSYNC_PACK_CACHE": str(args.work / "pack-cache"),
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",  # rank r on the GPU nvidia-smi calls r
        "OMP_NUM_THREADS": str(max(1, min(8, cpus // n))),
    }


def launch(args, name: str, n: int, argv: list[str], timeout: float) -> dict[str, Any]:
    """One ``torchrun`` launch (its own process group, stopped at ``timeout``)."""
    log_path = args.work / f"{name}.log"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node", str(n), *argv]  # fmt: skip
    sampler = GpuSampler(args.work / f"{name}.smi") if args.device == "cuda" else None
    t0 = time.time()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                env=child_env(args, n), start_new_session=True)  # fmt: skip
        try:
            rc = proc.wait(timeout=timeout)
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            status = f"stopped at its {timeout:.0f} s share of the budget"
            stop_process(proc, timeout=15, group=True)
    wall = time.time() - t0
    smi = sampler.stop() if sampler is not None else []
    return {"status": status, "wall_s": round(wall, 2), "started_unix": t0, "smi": smi,
            "log": log_path, "command": " ".join(cmd)}  # fmt: skip


def read_json_arg(value: str) -> Any:
    """A JSON string, a JSON file, or a packaged config name."""
    from lipsync.config import load_packaged_config

    if value.strip().startswith("{"):
        return json.loads(value)
    path = Path(value)
    return json.loads(path.read_text()) if path.is_file() else load_packaged_config(value)


# --------------------------------------------------------------------------- the phases


def syncnet_argv(args, n: int, run: Path, cap_s: float) -> list[str]:
    base = read_json_arg(args.syncnet_config)
    train = {**base.get("train", {}), "batch_size": args.syncnet_batch,
             "max_steps": args.syncnet_steps, "max_minutes": cap_s / 60, "log_every": 1,
             "checkpoint_every": 10**6, "val_every": 10**6}  # fmt: skip
    model = read_json_arg(args.syncnet_model) if args.syncnet_model else base["model"]
    what = args.syncnet_model or (base["model"] if isinstance(base["model"], str) else "custom")
    config = {
        "name": f"multi-GPU benchmark SyncNet ({what}, random start)",
        "model": model,
        "data": {
            "root": f"pack:{args.pack}",
            "train_split": "train",
            "val_split": None,
            "test_split": None,
            "num_workers": args.syncnet_workers,
        },
        "train": train,
    }
    path = args.work / f"syncnet-n{n}.json"
    path.write_text(json.dumps(config, indent=1))
    return ["-m", "lipsync.cli", "train", "syncnet", str(path), "--out", str(run), "--quiet",
            "--json", "--device", args.device]  # fmt: skip


def unet_argv(args, n: int, run: Path, cap_s: float) -> list[str]:
    from lipsync.train.vae import full_vae_config

    unet = dict(read_json_arg(args.unet_config), use_motion_module=True)
    vae = full_vae_config(read_json_arg(args.vae_config), args.resolution)
    config = {
        "schema": "lipsync.train.unet/1",
        "stage": 2,
        "output_dir": str(run),
        "model": {"unet_config": unet, "resolution": args.resolution, "num_frames": 16},
        "init": {"source": "scratch", "seed": 0},
        "vae": {"kind": "tiny-random", "config": vae},
        "audio": {"kind": "seeded", "seed": 0},
        "syncnet": {"path": str(args.work / "sync-syncnet.safetensors")},
        "data": {
            "pack": str(args.pack),
            "batch_size": args.unet_batch // n,
            "num_workers": args.unet_workers,
        },
        "losses": {"recon": 1.0, "sync": 0.05, "pixel_space": True},
        "noise": {"mixed": True, "alpha": 1.0},
        "train": {
            "trainable": [],
            "max_steps": args.unet_steps,
            "max_minutes": cap_s / 60,
            "precision": "bf16" if args.device == "cuda" else "fp32",
            "gradient_checkpointing": False,
            "seed": 13,
            "log_every": 1,
        },
        "optimizer": {"lr": 5e-5, "weight_decay": 0.01},
        "checkpoint": {
            "every": 10**6,
            "keep": 1,
            "weights_dtype": "fp16",
            "save_optimizer": False,
        },
        "validation": {"every": 0, "videos": 0},
    }
    path = args.work / f"unet-n{n}.json"
    path.write_text(json.dumps(config, indent=1))
    return ["-m", "lipsync.cli", "train", "unet", str(path), "--out", str(run), "--quiet",
            "--no-resume", "--device", args.device]  # fmt: skip


def fsdp_argv(args, n: int, result: Path) -> list[str]:
    argv = [str(Path(__file__).resolve()), "--worker", "fsdp", "--result", str(result),
            "--pack", str(args.pack), "--device", args.device, "--work", str(args.work),
            "--fsdp-batch", str(args.fsdp_batch), "--fsdp-steps", str(args.fsdp_steps),
            "--fsdp-warmup", str(args.fsdp_warmup),
            "--fsdp-resolution", str(args.fsdp_resolution)]  # fmt: skip
    for key in ("fsdp_unet_config", "fsdp_vae_config", "fsdp_syncnet_config"):
        value = getattr(args, key)
        if value:
            argv += [f"--{key.replace('_', '-')}", value]
    argv.append("--fsdp-lpips" if args.fsdp_lpips else "--no-fsdp-lpips")
    argv.append("--fsdp-trepa" if args.fsdp_trepa else "--no-fsdp-trepa")
    return argv


def prepare(args) -> dict[str, Any]:
    """Decode the pack once into the shared cache; write the seeded SyncNet the U-Net's sync
    loss uses."""
    import torch

    from lipsync.checkpoints import save_syncnet
    from lipsync.models.syncnet import StableSyncNet
    from lipsync.train.pack import read_pack

    t0 = time.time()
    pack = read_pack(args.pack, ("train",), cache=args.work / "pack-cache")
    decoded = time.time() - t0
    frames = pack.frames["train"]
    torch.manual_seed(0)
    syncnet = StableSyncNet.from_config(read_json_arg(args.sync_syncnet_config))
    save_syncnet(syncnet, args.work / "sync-syncnet.safetensors", "seeded small SyncNet")
    return {"pack_train_frames": int(frames.shape[0]), "resolution": int(frames.shape[1]),
            "pack_decode_s": round(decoded, 2)}  # fmt: skip


def measure_run(args, phase: str, n: int, budget_end: float) -> dict[str, Any]:
    """One (a)/(b) launch and its numbers."""
    batch = args.syncnet_batch if phase == "syncnet" else args.unet_batch
    record: dict[str, Any] = {"phase": phase, "n": n, "global_batch": batch,
                              "per_gpu_batch": batch // n}  # fmt: skip
    if batch % n:
        return {**record, "status": f"skipped: global batch {batch} not divisible by {n}"}
    left = budget_end - time.time()
    timeout = min(args.cap_s, left - 5)
    if timeout < args.min_launch_s:
        return {**record, "status": f"skipped: {left:.0f} s of the budget left"}
    run = args.work / f"{phase}-n{n}"
    shutil.rmtree(run, ignore_errors=True)
    cap = max(timeout - args.startup_allowance_s, 5.0)  # the trainer's own max_minutes
    make = syncnet_argv if phase == "syncnet" else unet_argv
    out = launch(args, f"{phase}-n{n}", n, make(args, n, run, cap), timeout)
    records = train_records(run / "metrics.jsonl")
    warmup = args.warmup if phase == "syncnet" else args.unet_warmup
    rate = steady_rate(records, warmup, batch)
    summary_file = run / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    record.update(
        status=out["status"],
        wall_s=out["wall_s"],
        startup_s=round(records[0]["unix_s"] - out["started_unix"], 2) if records else None,
        steps=records[-1]["step"] if records else 0,
        **{k: v for k, v in rate.items() if k != "window_unix_s"},
        **gpu_stats(out["smi"], n, rate.get("window_unix_s")) if out["smi"] else {},
        torch_peak_gib_per_rank=summary.get("peak_memory_gib"),
        loss=[round(r["loss"], 6) for r in records],
        log=str(out["log"]),
    )
    return record


def measure_fsdp(args, n: int, budget_end: float) -> dict[str, Any]:
    record: dict[str, Any] = {"phase": "fsdp", "n": n, "per_gpu_batch": args.fsdp_batch,
                              "strategy": "fsdp" if n > 1 else "single"}  # fmt: skip
    left = budget_end - time.time()
    timeout = min(args.cap_s, left - 5)
    if timeout < args.min_launch_s:
        return {**record, "status": f"skipped: {left:.0f} s of the budget left"}
    result = args.work / f"fsdp-n{n}.json"
    result.unlink(missing_ok=True)
    out = launch(args, f"fsdp-n{n}", n, fsdp_argv(args, n, result), timeout)
    record.update(status=out["status"], wall_s=out["wall_s"], log=str(out["log"]))
    if result.is_file():
        record.update(json.loads(result.read_text()))
    if out["smi"]:
        record.update({k: v for k, v in gpu_stats(out["smi"], n, None).items()
                       if k == "smi_peak_gib_per_gpu"})  # fmt: skip
    return record


# --------------------------------------------------------------------------- the FSDP worker


def fsdp_worker(args) -> None:
    """One rank of (c): build the 512 px stage-2 models, shard the U-Net, run a few steps."""
    import gpu_train_stage2 as stage2
    import torch

    from lipsync.train.building import wrap_model
    from lipsync.train.distributed import DistContext
    from lipsync.train.loop import LoopSettings, MicroBatch, TrainLoop

    dist = DistContext.from_env(args.device)
    dev = dist.device
    ns = argparse.Namespace(
        unet_config=args.fsdp_unet_config, resolution=args.fsdp_resolution,
        trainable="motion_modules.,attentions.", no_checkpointing=False,
        vae_config=args.fsdp_vae_config, syncnet_config=args.fsdp_syncnet_config,
        lpips=args.fsdp_lpips, trepa=args.fsdp_trepa, trepa_dims=None,
    )  # fmt: skip
    t0 = time.time()
    torch.manual_seed(0)
    try:
        with dev:  # initialise on the device (fast, no host memory); build() moves it all there
            unet, _, objective, _, sizes = stage2.build(ns, dev)
    except RuntimeError as e:  # something that insists on host tensors: build on the CPU
        print(f"rank {dist.rank}: building on {dev} failed ({e}); building on the CPU")
        torch.manual_seed(0)
        unet, _, objective, _, sizes = stage2.build(ns, dev)
    model = wrap_model(unet, dist, "fsdp")
    trainable = [(k, p) for k, p in unet.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([p for _, p in trainable], lr=1e-5,
                                  fused=dev.type == "cuda" or None)  # fmt: skip
    objective.model = model
    precision = "bf16" if dev.type == "cuda" else "fp32"
    loop = TrainLoop(name="fsdp-measure", model=model, optimizer=optimizer,
                     settings=LoopSettings(max_steps=10**6, precision=precision, lr=1e-5),
                     dist=dist, out_dir=args.work / f"fsdp-loop-{dist.world_size}",
                     loss_fn=objective, batches=None, trainable=trainable,
                     show_progress=False)  # fmt: skip
    b = args.fsdp_batch
    micro = [MicroBatch(stage2.make_batch(b, args.fsdp_resolution, dev),
                        torch.arange(dist.rank * b, (dist.rank + 1) * b))]  # fmt: skip
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    resident = torch.cuda.memory_allocated(dev) / 2**30 if dev.type == "cuda" else 0.0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    built = time.time() - t0
    times, losses = [], []
    for i in range(args.fsdp_warmup + args.fsdp_steps):
        dist.barrier()
        t = time.perf_counter()
        numbers = loop.train_step(micro)
        sync()
        if i >= args.fsdp_warmup:
            times.append(time.perf_counter() - t)
        losses.append(round(numbers["loss"], 6))
    step = sum(times) / max(len(times), 1)
    peak_alloc = dist.peak_memory_gib()
    peak_reserved = None
    if dev.type == "cuda":
        gathered = dist.gather_float(torch.cuda.max_memory_reserved(dev) / 2**30)
        peak_reserved = [round(v, 3) for v in gathered]
    resident_all = [round(v, 3) for v in dist.gather_float(resident)]
    if dist.is_main:
        report = {
            "resolution": args.fsdp_resolution,
            "step_s": round(step, 4),
            "samples_per_s": round(b * dist.world_size / step, 3) if step else None,
            "loss": losses,
            "build_s": round(built, 2),
            "torch_peak_gib_per_rank": peak_alloc,
            "torch_peak_reserved_gib_per_rank": peak_reserved,
            "resident_after_wrap_gib_per_rank": resident_all if dev.type == "cuda" else None,
            "lpips": args.fsdp_lpips,
            "trepa": args.fsdp_trepa,
            **sizes,
        }
        args.result.write_text(json.dumps(report, indent=1) + "\n")
    dist.close()


# --------------------------------------------------------------------------- report


def chart(report: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    runs = report["runs"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    ax = axes[0][0]
    top = 1
    for phase in ("syncnet", "unet"):
        pts = [(r["n"], r["speedup"]) for r in runs if r["phase"] == phase and r.get("speedup")]
        if pts:
            ns, speedups = zip(*pts, strict=True)
            ax.plot(ns, speedups, "o-", label=phase)
            top = max(top, *ns)
    ax.plot([1, top], [1, top], ":", color="grey", label="linear")
    ax.set(xlabel="GPUs (processes)", ylabel="samples/s ÷ samples/s on 1",
           title="speed-up at a fixed global batch")  # fmt: skip
    ax.legend()
    for ax, phase in ((axes[0][1], "syncnet"), (axes[1][0], "unet")):
        for r in runs:
            if r["phase"] == phase and r.get("loss"):
                ax.plot(range(1, len(r["loss"]) + 1), r["loss"], label=f"N={r['n']}")
        ax.set(xlabel="step", ylabel="train loss", title=f"{phase}: same global batch")
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    ax = axes[1][1]
    fsdp = [r for r in report["fsdp"] if r.get("torch_peak_gib_per_rank")]
    for k, r in enumerate(fsdp):
        values = r["torch_peak_gib_per_rank"]
        ax.bar([k + 0.8 * i / len(values) for i in range(len(values))], values,
               width=0.8 / len(values), align="edge",
               label=f"N={r['n']} ({r['strategy']})")  # fmt: skip
    ax.set(ylabel="GiB (one bar per GPU)", title="512 px stage 2: peak allocated per GPU")
    if fsdp:
        ax.set_xticks([])
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no CUDA memory measured", ha="center", transform=ax.transAxes)
    fig.suptitle(f"lipsync multi-GPU training, {report['machine']['device_name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def print_table(report: dict[str, Any]) -> None:
    print(f"{'phase':8} {'N':>2} {'batch/GPU':>9} {'samples/s':>10} {'eff':>6} {'busy':>6} "
          f"{'GiB/GPU':>8} {'loss diff':>10}  status")  # fmt: skip
    for r in report["runs"] + report["fsdp"]:
        gib = r.get("torch_peak_gib_per_rank") or []
        busy = r.get("busy_share")
        print(
            f"{r['phase']:8} {r['n']:>2} {r.get('per_gpu_batch', ''):>9} "
            f"{r.get('samples_per_s') or '-':>10} {r.get('efficiency') or '-':>6} "
            f"{busy if busy is not None else '-':>6} {max(gib) if gib else '-':>8} "
            f"{r.get('loss_max_rel_diff_vs_1', '-') if r['phase'] != 'fsdp' else '-':>10}  "
            f"{r['status']}"
        )


def write_report(report: dict[str, Any], path: Path) -> None:
    """Derived numbers (loss difference from N = 1, speed-up, efficiency), runs in order, and the
    JSON written atomically."""
    runs = report["runs"]
    runs.sort(key=lambda r: (r["phase"] != "syncnet", r["n"]))
    report["fsdp"].sort(key=lambda r: r["n"])
    for phase in ("syncnet", "unet"):
        base = next((r for r in runs if r["phase"] == phase and r["n"] == 1), None)
        for r in runs:
            if r["phase"] == phase and base and r.get("loss") and base.get("loss"):
                a = [{"step": i + 1, "loss": v} for i, v in enumerate(base["loss"])]
                b = [{"step": i + 1, "loss": v} for i, v in enumerate(r["loss"])]
                r["loss_max_rel_diff_vs_1"] = loss_difference(a, b)
    add_efficiency(runs)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, path)


def launch_plan(phases: list[str], counts: list[int]) -> list[tuple[str, int]]:
    """The launches, most telling first (the budget may cut the tail): each phase at 1 and at
    the most GPUs, then FSDP at 1 and the most, then the counts in between."""
    ends = sorted({counts[0], counts[-1]})
    plan = [(p, n) for p in ("syncnet", "unet") if p in phases for n in ends]
    if "fsdp" in phases:
        plan += [("fsdp", n) for n in ends]
    plan += [(p, n) for p in ("syncnet", "unet") if p in phases for n in counts if n not in ends]
    return plan


def gpu_name() -> str:
    """The first GPU's name from nvidia-smi (no CUDA context in this process)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return "unknown GPU"
    out = subprocess.run([exe, "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                         text=True, timeout=30)  # fmt: skip
    names = out.stdout.strip().splitlines()
    return f"{len(names)} x {names[0]}" if names else "unknown GPU"


def orchestrate(args) -> None:
    import torch

    started = time.time()
    budget_end = started + args.budget_s
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.device == "cuda":
        available = torch.cuda.device_count()
        if available < 1:
            raise SystemExit("error: --device cuda but no GPU is visible")
    else:
        available = args.cpu_procs
    if args.gpus:
        counts = [int(x) for x in args.gpus.split(",")]
    else:
        counts = [n for n in (1, 2, 4, 8) if n <= available]
        if available not in counts:
            counts.append(available)
    counts = sorted({n for n in counts if 1 <= n <= available})
    phases = args.phases.split(",")
    shm = shutil.disk_usage("/dev/shm").total if Path("/dev/shm").is_dir() else 0
    machine = {
        "device_name": gpu_name() if args.device == "cuda" else "cpu",
        "gpus_visible": available if args.device == "cuda" else 0,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "dev_shm_gib": round(shm / 2**30, 1),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if shm < 2 * 2**30 and (args.syncnet_workers or args.unet_workers):
        # DataLoader workers pass batches through /dev/shm: too little of it crashes them
        args.syncnet_workers = args.unet_workers = 0
        machine["note"] = "/dev/shm under 2 GiB: DataLoader workers off"
    print(json.dumps(machine), flush=True)
    prepared = prepare(args)
    print(json.dumps(prepared), flush=True)
    report: dict[str, Any] = {
        "what": "multi-GPU training: syncnet and unet (torchrun, DDP) at a fixed global batch; "
        "fsdp: 512 px stage-2 memory per GPU",
        "machine": machine,
        "prepared": prepared,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "runs": [],
        "fsdp": [],
    }
    logs = out / "multi_train_logs.txt"
    logs.write_text("")
    for phase, n in launch_plan(phases, counts):
        if phase == "fsdp":
            record = measure_fsdp(args, n, budget_end)
            report["fsdp"].append(record)
            print(json.dumps(record), flush=True)
        else:
            record = measure_run(args, phase, n, budget_end)
            report["runs"].append(record)
            print(json.dumps({k: v for k, v in record.items() if k != "loss"}), flush=True)
        report["wall_s"] = round(time.time() - started, 1)
        write_report(report, out / "multi_train.json")  # so far: a cut-off call keeps it
        log = Path(record.get("log", ""))
        if log.is_file():
            with open(logs, "a") as f:
                f.write(f"===== {log.name}: {record['status']}\n{log.read_text()[-4000:]}\n")
    drew = chart(report, out / "multi_train.png")
    print_table(report)
    print(f"wall {report['wall_s']} s; wrote {out / 'multi_train.json'}"
          + (", multi_train.png" if drew else " (no matplotlib: no chart)"))  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--pack", required=True, type=Path, help="a training pack (.pack)")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="results folder ($OUT)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/lipsync-multi-train"))
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None)
    ap.add_argument("--gpus", default=None, help="process counts, e.g. 1,2,4 (default: all)")
    ap.add_argument("--cpu-procs", type=int, default=2, help="largest N with --device cpu")
    ap.add_argument("--phases", default="syncnet,unet,fsdp")
    ap.add_argument("--budget-s", type=float, default=240.0, help="wall time for everything")
    ap.add_argument("--cap-s", type=float, default=60.0, help="most seconds for one launch")
    ap.add_argument("--min-launch-s", type=float, default=20.0)
    ap.add_argument("--startup-allowance-s", type=float, default=20.0)
    ap.add_argument("--smoke", action="store_true", help="tiny models and steps (CPU check)")
    ap.add_argument("--syncnet-config",
                    default=str(REPO / "lipsync/configs/syncnet_synth_train.json"))  # fmt: skip
    ap.add_argument("--syncnet-model", default=None, help="SyncNet architecture override")
    ap.add_argument("--syncnet-batch", type=int, default=128)
    ap.add_argument("--syncnet-steps", type=int, default=30)
    ap.add_argument("--syncnet-workers", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=8, help="syncnet steps left out of the rate")
    ap.add_argument("--unet-config", default=DEMO_UNET)
    ap.add_argument("--vae-config", default=json.dumps(DEMO_VAE))
    ap.add_argument("--sync-syncnet-config", default="syncnet_small_config.json")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--unet-batch", type=int, default=16)
    ap.add_argument("--unet-steps", type=int, default=16)
    ap.add_argument("--unet-workers", type=int, default=8)
    ap.add_argument("--unet-warmup", type=int, default=5)
    ap.add_argument("--fsdp-unet-config", default=None, help="default: 512 px stage 2")
    ap.add_argument("--fsdp-vae-config", default=None, help="default: sd-vae-ft-mse's")
    ap.add_argument("--fsdp-syncnet-config", default=None, help="default: the official one")
    ap.add_argument("--fsdp-resolution", type=int, default=512)
    ap.add_argument("--fsdp-batch", type=int, default=1, help="windows per GPU")
    ap.add_argument("--fsdp-steps", type=int, default=2)
    ap.add_argument("--fsdp-warmup", type=int, default=1)
    ap.add_argument("--fsdp-lpips", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--fsdp-trepa", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--worker", choices=["fsdp"], help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    if ap.parse_known_args(argv)[0].smoke:
        ap.set_defaults(**SMOKE)  # options given on the command line still win
    args = ap.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.pack = args.pack.resolve()
    args.work = args.work.resolve()
    return args


def main() -> None:
    os.environ.update(NO_MULTICAST)
    args = parse_args()
    if args.worker == "fsdp":
        fsdp_worker(args)
        return
    if not args.out:
        raise SystemExit("error: --out (or $OUT) is required")
    orchestrate(args)


if __name__ == "__main__":
    main()
