"""Speed and memory of U-Net stage-2 training at full size (LatentSync 1.6: 512 px, the
reference's ``stage2_512`` settings) on one GPU: peak memory, step time, samples/s, and the
share of the GPU's bf16 peak.

Random weights of the real architectures (no official checkpoints on the GPU machine: memory and
time depend on shapes, not values): the U-Net of ``unet_stage2_512_config.json`` (motion modules
and attention layers train, the rest frozen), the SD VAE (frozen; decoder with gradient
checkpointing, as the reference), the official StableSyncNet (frozen; 256 px: the decoded
512 px faces are resized to it for the sync loss, as the reference), LPIPS-VGG and TREPA's
VideoMAE v2 ViT-g (frozen). One step is exactly ``lipsync train unet``'s step
(:meth:`lipsync.train.loop.TrainLoop.train_step` with :class:`lipsync.train.unet.UNetObjective`):
VAE-encode target/masked/reference frames, noise, U-Net (bf16 autocast, gradient
checkpointing), one-step x0, VAE decode, SyncNet + LPIPS (lower half) + TREPA, backward,
clipping, fused AdamW.

    python benchmarks/gpu_train_stage2.py --out stage2_512.json [--batch 1,4] [--steps 5]

FLOPs are counted once per batch size (torch.utils.flop_counter over one whole step, outside
the timed steps); TFLOP/s = FLOPs / mean step time; the share is against ``--peak-tflops``
(790: an 8192³ bf16 matmul measured on the H200, /work/.library/device/KINDS.md).
A CPU smoke test runs it with tiny configs (tests/benchmarks/test_gpu_train_stage2.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from lipsync.config import load_packaged_config  # noqa: E402
from lipsync.models.scheduler import make_scheduler  # noqa: E402
from lipsync.models.syncnet import StableSyncNet  # noqa: E402
from lipsync.models.vae import SD_VAE_FT_MSE_CONFIG, random_vae  # noqa: E402
from lipsync.train.config import InitSection, ModelSection, UNetTrainConfig  # noqa: E402
from lipsync.train.distributed import DistContext  # noqa: E402
from lipsync.train.loop import LoopSettings, MicroBatch, TrainLoop  # noqa: E402
from lipsync.train.losses import (  # noqa: E402
    LossModels,
    LossWeights,
    LpipsVgg,
    TrepaLoss,
    VideoMaeDims,
    VideoMaeEncoder,
)
from lipsync.train.unet import (  # noqa: E402
    UNetObjective,
    build_unet,
    enable_gradient_checkpointing,
    select_trainable,
)


def read_json_arg(value: str | None, default):
    if value is None:
        return default
    if value.strip().startswith("{"):
        return json.loads(value)
    path = Path(value)
    return json.loads(path.read_text()) if path.is_file() else load_packaged_config(value)


def build(args, device):
    unet_config = read_json_arg(
        args.unet_config, load_packaged_config("unet_stage2_512_config.json")
    )
    cfg = UNetTrainConfig()
    cfg.model = ModelSection(unet_config=unet_config, resolution=args.resolution, num_frames=16)
    cfg.init = InitSection(source="scratch", seed=0)
    unet, _ = build_unet(cfg)
    unet.to(device)
    trainable = select_trainable(unet, args.trainable.split(","))
    if not args.no_checkpointing:
        enable_gradient_checkpointing(unet)
    frozen = torch.bfloat16 if device.type == "cuda" else torch.float32
    vae = random_vae(read_json_arg(args.vae_config, SD_VAE_FT_MSE_CONFIG), device=device,
                     dtype=frozen)  # fmt: skip
    vae.autoencoder.enable_gradient_checkpointing()
    syncnet_cfg = read_json_arg(args.syncnet_config, load_packaged_config(
        "syncnet_16_pixel_attn_config.json"))  # fmt: skip
    syncnet = StableSyncNet.from_config(syncnet_cfg).to(device, frozen).eval().requires_grad_(False)
    syncnet.set_gradient_checkpointing(True)
    models = LossModels(decode=vae.decode, syncnet=syncnet, pixel_space=True)
    weights = LossWeights(recon=1.0, sync=0.05)
    sizes = {
        "unet_parameters": sum(p.numel() for p in unet.parameters()),
        "unet_trainable_parameters": sum(p.numel() for _, p in trainable),
        "vae_parameters": sum(p.numel() for p in vae.parameters()),
        "syncnet_parameters": sum(p.numel() for p in syncnet.parameters()),
        "syncnet_resolution": syncnet.config.resolution,
    }
    if args.lpips:
        models.lpips = LpipsVgg().to(device, frozen).eval().requires_grad_(False)
        weights.lpips = 0.1
        sizes["lpips_parameters"] = sum(p.numel() for p in models.lpips.parameters())
    if args.trepa:
        dims = VideoMaeDims.named(read_json_arg(args.trepa_dims, "vit-g")
                                  if args.trepa_dims else "vit-g")  # fmt: skip
        encoder = VideoMaeEncoder(dims, checkpointing=True).to(device, frozen)
        models.trepa = TrepaLoss(encoder.eval().requires_grad_(False))
        weights.trepa = 10.0
        sizes["trepa_parameters"] = sum(p.numel() for p in encoder.parameters())
    optimizer = torch.optim.AdamW([p for _, p in trainable], lr=1e-5,
                                  fused=device.type == "cuda" or None)  # fmt: skip
    objective = UNetObjective(
        model=unet, vae=vae, alphas_cumprod=make_scheduler("ddim").alphas_cumprod.to(device),
        weights=weights, loss_models=models, mixed_noise=True, noise_alpha=1.0, seed=1247,
        num_frames=16,
    )  # fmt: skip
    return unet, optimizer, objective, trainable, sizes


def make_batch(b: int, resolution: int, device) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    r = resolution
    return {
        "frames": torch.rand((b, 16, 3, r, r), generator=g, device=device) * 2 - 1,
        "reference": torch.rand((b, 16, 3, r, r), generator=g, device=device) * 2 - 1,
        "mask": (torch.rand((b, 1, r, r), generator=g, device=device) > 0.5).float(),
        "audio_windows": torch.randn((b, 16, 50, 384), generator=g, device=device),
        "mel": torch.randn((b, 1, 80, 52), generator=g, device=device),
    }


def measure(args, batch: int, device) -> dict:
    torch.manual_seed(0)
    unet, optimizer, objective, trainable, sizes = build(args, device)
    loop = TrainLoop(name="stage2-measure", model=unet, optimizer=optimizer,
                     settings=LoopSettings(max_steps=10**6, precision=args.precision, lr=1e-5),
                     dist=DistContext(0, 1, 0, device), out_dir=Path(args.work),
                     loss_fn=objective, batches=None, trainable=trainable,
                     show_progress=False)  # fmt: skip
    micro = [MicroBatch(make_batch(batch, args.resolution, device), torch.arange(batch))]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        loop.train_step(micro)
    sync()
    with FlopCounterMode(display=False) as counter:
        loop.train_step(micro)
    flops = counter.get_total_flops()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        numbers = loop.train_step(micro)
        sync()
        times.append(time.perf_counter() - t0)
    step = sum(times) / len(times)
    record = {
        "batch": batch,
        "resolution": args.resolution,
        "frames_per_sample": 16,
        "step_s": round(step, 4),
        "step_s_min": round(min(times), 4),
        "samples_per_s": round(batch / step, 3),
        "flops_per_step": flops,
        "tflops": round(flops / step / 1e12, 4),
        "loss": numbers["loss"],
        **sizes,
    }
    record["share_of_bf16_peak"] = round(flops / step / 1e12 / args.peak_tflops, 6)
    if device.type == "cuda":
        record["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        record["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--batch", default="1,4", help="batch sizes (the reference's config: 1, "
                    "its comment: 4)")  # fmt: skip
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--trainable", default="motion_modules.,attentions.")
    ap.add_argument("--no-checkpointing", action="store_true", help="no U-Net checkpointing")
    ap.add_argument("--lpips", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--trepa", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument(
        "--unet-config", help="JSON path/string or packaged name (default: 512 stage 2)"
    )
    ap.add_argument("--vae-config", help="JSON path/string (default: sd-vae-ft-mse's)")
    ap.add_argument("--syncnet-config", help="JSON path/string (default: the official SyncNet)")
    ap.add_argument("--trepa-dims", help="JSON of VideoMaeDims fields (default: ViT-g)")
    ap.add_argument("--peak-tflops", type=float, default=790.0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--work", default="/tmp/lipsync-stage2-measure")
    args = ap.parse_args()
    device = torch.device(args.device)
    results = []
    for b in [int(x) for x in args.batch.split(",")]:
        try:
            results.append(measure(args, b, device))
        except torch.OutOfMemoryError as e:
            results.append({"batch": b, "error": "out of memory", "detail": str(e)[:300]})
        print(json.dumps(results[-1]), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report = {
        "what": "U-Net stage-2 training step, random weights of the real architectures",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "work")},
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
