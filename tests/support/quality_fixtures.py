"""Small stand-ins for the quality work's tests (issue 16): toy windows with phone labels, a toy
processed corpus whose phones follow its mouths, its training pack, and a tiny random teacher
bundle. Nothing here claims to look like real data: it exercises the real code paths fast."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from lipsync.data.synth.phones import PHONES
from lipsync.models.unet import random_unet
from lipsync.models.vae import random_vae
from lipsync.own_checkpoints import seeded_audio_spec, write_bundle
from lipsync.train.pack import write_pack
from tests.support.train_fixtures import (
    FRAMES,
    RES,
    TINY_UNET,
    TINY_VAE,
    ToyWindows,
    make_processed_corpus,
)

OPEN, CLOSED = PHONES.index("AA"), PHONES.index("M")


class PhonedToyWindows(ToyWindows):
    """Toy windows whose phone follows the mouth: AA where the toy mouth is open, M else."""

    def __getitem__(self, i: int) -> dict:
        item = super().__getitem__(i)
        # the toy face's mouth is the dark ellipse: its size is the opening
        dark = (item["frames"][:, 0] < -0.7).float().mean(dim=(1, 2))  # (F,)
        item["phones"] = torch.where(dark > dark.median(), OPEN, CLOSED).long()
        return item


def phoned_toy_windows(cfg, split: str, seed: int) -> PhonedToyWindows:
    """``data.factory`` entry point: ``quality_fixtures:phoned_toy_windows``."""
    return PhonedToyWindows(split, seed, length=8 if split == "train" else 2)


def toy_faces(batch: int, frames: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, frames, 3, RES, RES) faces whose mouth is open (AA) or closed (M) in runs of 2-5
    frames, and their phones (batch, frames)."""
    g = np.random.default_rng(seed)
    y, x = np.mgrid[0:RES, 0:RES] / RES
    faces = np.empty((batch, frames, 3, RES, RES), dtype=np.float32)
    phones = np.empty((batch, frames), dtype=np.int64)
    for b in range(batch):
        state, t = bool(g.integers(2)), 0
        base = g.uniform(-0.4, 0.4, 3)[:, None, None] + 0.3 * (x - 0.5)[None]
        while t < frames:
            run = int(g.integers(2, 6))
            for k in range(t, min(frames, t + run)):
                height = 0.10 if state else 0.015
                mouth = ((x - 0.5) / 0.2) ** 2 + ((y - 0.68) / height) ** 2 < 1.0
                faces[b, k] = np.where(mouth[None], -0.9, base)
                phones[b, k] = OPEN if state else CLOSED
            t += run
            state = not state
    return torch.from_numpy(faces), torch.from_numpy(phones)


def make_phone_corpus(root: Path, splits=(("train", 4), ("val", 2), ("test", 2))) -> Path:
    """:func:`make_processed_corpus` with phones that follow the mouths (AA open, M closed)."""
    make_processed_corpus(root, splits=splits, frames=56)
    for path in sorted((root / "final").glob("*.json")):
        rec = json.loads(path.read_text())
        opening = np.array([row[0] for row in rec["labels"]["visemes"]["per_frame"]])
        labels = np.where(opening > 0.5, "AA", "M")
        spans, start = [], 0
        for k in range(1, len(labels) + 1):
            if k == len(labels) or labels[k] != labels[start]:
                spans.append({"label": str(labels[start]), "start": start / 25, "end": k / 25})
                start = k
        rec["labels"]["phones"] = spans
        path.write_text(json.dumps(rec))
    return root


def make_pack(tmp: Path) -> Path:
    corpus = make_phone_corpus(tmp / "corpus")
    out = tmp / "pack"
    write_pack(corpus, out, max_mb=2.0, log=lambda _: None)
    return out


def make_teacher_bundle(out: Path, seed: int = 0) -> Path:
    """A tiny random-weight bundle at RES px (stage-2 layout: motion modules), seeded audio."""
    unet = random_unet(TINY_UNET, seed=seed)
    vae_config = {**TINY_VAE, "in_channels": 3, "out_channels": 3, "sample_size": RES}
    vae = random_vae(vae_config, seed=seed)
    write_bundle(
        out,
        unet_state=unet.state_dict(),
        unet_config=TINY_UNET,
        vae_state=vae.autoencoder.state_dict(),
        vae_config=vae_config,
        vae_scaling_factor=1.0,
        audio_spec=seeded_audio_spec(0),
        resolution=RES,
        num_frames=16,
        name="tiny-teacher",
        training={"last_stage": "unet2"},
        dtype="fp32",
    )
    return out


__all__ = ["FRAMES", "PhonedToyWindows", "make_pack", "make_teacher_bundle", "toy_faces"]
