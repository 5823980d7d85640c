"""A small lip reader: which viseme (and phone) a mouth shows, trained on ground-truth footage.

The judge of the quality protocol (docs/QUALITY.md): it reads generated mouths and scores them
against the phones of the audio that drove them. It must not be what any training arm optimises,
so it differs from the phone CTC head (:mod:`lipsync.train.phone_ctc`) in objective (per-frame
cross-entropy, not CTC), input (5 frames of context around the frame, grey mouth boxes at half
the head's size, pixel-normalised) and architecture, and it is trained separately, from another
seed, on the training split only.

Input: the mouth box (:mod:`lipsync.train.mouth`) of frames t−2 … t+2 (edges repeated), grey,
24 × 40 px, each clip normalised to zero mean and unit variance over its pixels (so brightness
and contrast changes do not matter); output: logits over the 14 viseme classes and the 42 phones
of ``lipsync-phones/1`` for frame t. Trained with cross-entropy on frames with a known phone.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lipsync.data.synth.phones import PHONES, VISEMES
from lipsync.own_checkpoints import load_tagged_state, read_tagged_config, save_tagged_module
from lipsync.train.mouth import mouth_crops
from lipsync.train.optim import optimise
from lipsync.train.phone_ctc import to_units

LIPREADER_FORMAT = "lipsync.lipreader/1"
CONTEXT = 2  # frames each side
SIZE = (24, 40)


@dataclass(frozen=True)
class LipReaderConfig:
    width: int = 32
    context: int = CONTEXT


class LipReader(nn.Module):
    """Frame classifier on mouth boxes (module docstring)."""

    def __init__(self, config: LipReaderConfig = LipReaderConfig()):
        super().__init__()
        self.config = config
        w, k = config.width, 2 * config.context + 1
        self.net = nn.Sequential(
            nn.Conv2d(k, w, 3, padding=1),
            nn.GroupNorm(8, w),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.GroupNorm(8, 2 * w),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1),
            nn.GroupNorm(8, 2 * w),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d((3, 5)),
            nn.Flatten(),
            nn.Linear(2 * w * 15, 4 * w),
            nn.ReLU(),
        )
        self.visemes = nn.Linear(4 * w, len(VISEMES))
        self.phones = nn.Linear(4 * w, len(PHONES))

    def inputs(self, faces: torch.Tensor) -> torch.Tensor:
        """(T, 3, R, R) consecutive faces in [-1, 1] -> (T, 2c+1, 24, 40) normalised grey mouth
        stacks (edge frames repeated)."""
        grey = mouth_crops(faces.float(), SIZE).mean(dim=1)  # (T, h, w)
        c = self.config.context
        padded = torch.cat(
            [grey[:1].expand(c, *grey.shape[1:]), grey, grey[-1:].expand(c, *grey.shape[1:])]
        )
        stacks = padded.unfold(0, 2 * c + 1, 1).permute(0, 3, 1, 2)  # (T, 2c+1, h, w)
        mean = stacks.mean(dim=(1, 2, 3), keepdim=True)
        std = stacks.std(dim=(1, 2, 3), keepdim=True).clamp(min=1e-3)
        return (stacks - mean) / std

    def forward(self, stacks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # stacks: (N, 2c+1, 24, 40) -> (viseme logits (N, 14), phone logits (N, 42))
        h = self.net(stacks)
        return self.visemes(h), self.phones(h)

    @torch.no_grad()
    def predict(self, faces: torch.Tensor, batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, 3, R, R) consecutive frames -> (viseme ids (T,), phone ids (T,))."""
        stacks = self.inputs(faces)
        vis, ph = [], []
        for i in range(0, len(stacks), batch):
            v, p = self(stacks[i : i + batch])
            vis.append(v.argmax(-1))
            ph.append(p.argmax(-1))
        return torch.cat(vis), torch.cat(ph)

    def save(self, path: str | os.PathLike, **extra: str) -> None:
        save_tagged_module(self, path, LIPREADER_FORMAT, asdict(self.config), **extra)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> LipReader:
        config = read_tagged_config(path, LIPREADER_FORMAT, "lip reader")
        return load_tagged_state(cls(LipReaderConfig(**config)), path, "lip reader").eval()


def viseme_ids(phones: torch.Tensor) -> torch.Tensor:
    """Phone ids (-1 unknown) -> viseme class ids (-1 unknown)."""
    return to_units(phones, "viseme")


def accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Share of frames with a known label (>= 0) predicted right, and how many frames count."""
    known = labels >= 0
    n = int(known.sum())
    if not n:
        return float("nan"), 0
    return float((predicted[known] == labels[known].to(predicted.device)).float().mean()), n


def train_lipreader(
    sample: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    config: LipReaderConfig = LipReaderConfig(),
    lr: float = 1e-3,
    seed: int = 0,
    device: torch.device | str = "cpu",
    deadline: Callable[[], bool] | None = None,
) -> tuple[LipReader, list[float]]:
    """Train on ``sample(step)`` -> (faces (N, T, 3, R, R) clips in [-1, 1], phones (N, T)):
    every frame with a known phone is an example (context from its own clip)."""
    dev = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LipReader(config)
    model.to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)

    def loss_of(step: int) -> torch.Tensor:
        faces, phones = sample(step)
        stacks = torch.cat([model.inputs(clip) for clip in faces])
        phones = phones.reshape(-1).to(dev)
        known = phones >= 0
        with torch.autocast(dev.type, torch.bfloat16, enabled=dev.type == "cuda"):
            v, p = model(stacks[known])
        return F.cross_entropy(v.float(), viseme_ids(phones[known])) + F.cross_entropy(
            p.float(), phones[known]
        )

    losses = optimise(loss_of, opt, steps, deadline)
    return model.eval(), losses
