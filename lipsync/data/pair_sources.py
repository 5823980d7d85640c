"""Open SyncNet training / evaluation pairs from a data spec.

* a folder: a processed corpus (``lipsync data process`` output) read by
  :class:`lipsync.data.datasets.SyncNetPairs` (``CONTRACT-data.md`` §3);
* ``toy`` or ``toy:clips=32,frames=50,resolution=64``: the procedural stand-in
  :class:`lipsync.data.toy_sync.ToySyncPairs` (tests and smoke runs only);
* ``pack:DIR``: a training pack (:mod:`lipsync.train.pack`, what the GPU machine can read
  without PyAV) through :class:`lipsync.train.pack.PackSyncPairs`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lipsync.data.datasets import ProcessedCorpus, SyncNetPairs
from lipsync.data.toy_sync import ToySyncPairs
from lipsync.errors import ConfigError, MediaError
from lipsync.train.pack import PackSyncPairs

_TOY_KEYS = {"clips": "num_clips", "frames": "clip_frames", "resolution": "resolution"}


def parse_toy_spec(spec: str) -> dict[str, int]:
    """``toy:clips=8,frames=40`` -> ToySyncPairs keyword arguments."""
    _, _, rest = spec.partition(":")
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, _, value = part.partition("=")
        if key not in _TOY_KEYS or not value.isdigit():
            raise ConfigError(f"bad toy data spec {spec!r}: use toy:clips=N,frames=N,resolution=N")
        out[_TOY_KEYS[key]] = int(value)
    return out


def open_syncnet_pairs(
    spec: str | Path, split: str, num_frames: int = 16, seed: int = 0
) -> torch.utils.data.Dataset:
    """SyncNet pairs of ``split`` from ``spec`` (see the module docstring)."""
    text = str(spec)
    if text.startswith("pack:"):
        return PackSyncPairs(Path(text[5:]).expanduser(), split, num_frames, seed)
    if text == "toy" or text.startswith("toy:"):
        return ToySyncPairs(num_frames=num_frames, seed=seed, split=split, **parse_toy_spec(text))
    root = Path(spec).expanduser()
    if not root.is_dir():
        raise MediaError(f"data folder not found: {root} (a processed corpus, or 'toy')")
    corpus = ProcessedCorpus(root)
    if not corpus.segments(split=split):
        raise MediaError(f"no {split!r} segments in the processed corpus {root}")
    return SyncNetPairs(corpus, split=split, num_frames=num_frames, seed=seed)
