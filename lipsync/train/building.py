"""Pieces the U-Net and VAE trainers share: datasets, batching, optimiser, process wrapping."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lipsync.audio import AudioEncoder
from lipsync.data.synth.phones import PHONES
from lipsync.errors import ConfigError
from lipsync.models.layers import ResnetBlock3D
from lipsync.models.transformer import MotionModule, SpatialTransformer
from lipsync.train.distributed import DistContext
from lipsync.train.pack import read_pack
from lipsync.train.pack_windows import PackUNetWindows

# The blocks that gradient checkpointing recomputes and FSDP shards one by one.
UNET_BLOCKS = (ResnetBlock3D, SpatialTransformer, MotionModule)


def import_factory(spec: str) -> Callable[..., Any]:
    """``package.module:function`` -> the function (ConfigError if it cannot be imported)."""
    module, sep, func = spec.partition(":")
    if not sep:
        raise ConfigError(f"data.factory {spec!r} must look like package.module:function")
    try:
        return getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"cannot import data.factory {spec!r}: {e}") from None


def make_dataset(cfg, split: str, seed: int, num_frames: int, audio: AudioEncoder | None):
    """Training/validation windows: ``cfg.data.factory(cfg, split, seed)``, the training pack at
    ``cfg.data.pack`` (:class:`lipsync.train.pack_windows.PackUNetWindows`), or the processed
    corpus at ``cfg.data.root`` through :class:`lipsync.data.datasets.UNetWindows` (item keys
    of CONTRACT-data.md §3). ``audio`` computes the Whisper windows, cached per segment under
    ``data.feature_cache`` (default ``<root>/cache``; the cache is keyed by the encoder's
    weights, so the official and the seeded encoder never mix)."""
    if cfg.data.factory:
        return import_factory(cfg.data.factory)(cfg, split, seed)
    if getattr(cfg.data, "pack", None):  # the VAE's data section has no pack
        return PackUNetWindows(read_pack(cfg.data.pack, (split,)), split, num_frames, audio, seed)
    # lazily: the datasets decode through PyAV, which the GPU image (demo recipe) lacks
    from lipsync.data.datasets import FeatureCache, ProcessedCorpus, UNetWindows

    corpus = ProcessedCorpus(cfg.data.root)
    if not corpus.segments(split):
        raise ConfigError(f"no {split!r} segments in the processed corpus {cfg.data.root}")
    features = None
    if audio is not None:
        cache = getattr(cfg.data, "feature_cache", None) or Path(cfg.data.root) / "cache"
        features = FeatureCache(audio, cache)
    return UNetWindows(
        corpus, split=split, num_frames=num_frames, audio_features=features, seed=seed,
        phones=PHONES,
    )  # fmt: skip


def collate_windows(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the tensors of window items; keep everything else as lists."""
    out: dict[str, Any] = {}
    for key in items[0]:
        values = [it[key] for it in items]
        if isinstance(values[0], torch.Tensor):
            out[key] = torch.stack(values)
        elif isinstance(values[0], np.ndarray):
            out[key] = torch.from_numpy(np.stack(values))
        else:
            out[key] = values
    return out


def make_optimizer(params: list[nn.Parameter], cfg, device: torch.device, world: int):
    """AdamW as the reference builds it (one group, ``weight_decay`` on every parameter), fused
    on CUDA; ``adamw8bit`` through bitsandbytes."""
    o = cfg.optimizer
    lr = o.lr * (world if o.scale_lr else 1)
    if o.kind == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError(
                "optimizer.kind 'adamw8bit' needs bitsandbytes (CUDA): pip install bitsandbytes, "
                "or use kind: adamw"
            ) from None
        return bnb.optim.AdamW8bit(params, lr=lr, betas=tuple(o.betas), eps=o.eps,
                                   weight_decay=o.weight_decay)  # fmt: skip
    fused = o.fused if o.fused is not None else device.type == "cuda"
    return torch.optim.AdamW(params, lr=lr, betas=tuple(o.betas), eps=o.eps,
                             weight_decay=o.weight_decay, fused=fused or None)  # fmt: skip


def wrap_model(
    model: nn.Module,
    dist: DistContext,
    strategy: str = "ddp",
    blocks: tuple[type[nn.Module], ...] = UNET_BLOCKS,
) -> nn.Module:
    """DDP, or FSDP2 (``fully_shard`` on each block of type ``blocks``, then the root), across
    processes; the model itself in a single process."""
    if not dist.distributed:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # FSDP2 warns when a wrapped block returns a view (the U-Net's blocks do, via reshapes);
        # only an in-place op on that output would be wrong, and the U-Net applies none.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view")
        for module in model.modules():
            if isinstance(module, blocks):
                fully_shard(module)
        return fully_shard(model)
    from torch.nn.parallel import DistributedDataParallel

    ids = [dist.device.index] if dist.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)
