"""U-Net training windows from a training pack: ``lipsync train unet`` with ``data.pack: DIR``.

The GPU machines have no PyAV, so they cannot read a processed corpus through
:class:`lipsync.data.datasets.UNetWindows`; a pack (:mod:`lipsync.train.pack`) they can. This
dataset gives the same items from a pack, on the CPU, for the ordinary DataLoader path of
``lipsync train unet`` (workers, pinned memory, the VAE encoding every step) — unlike
:class:`lipsync.train.pack_data.PackData`, which keeps a pack on the GPU for the demo recipe.

Items (the keys and shapes of ``UNetWindows``, CONTRACT-data.md §3): ``frames`` and
``reference`` (F, 3, R, R) float32 in [-1, 1], ``mask`` (1, R, R), ``audio_windows``
(F, 50, 384) when an encoder is given, ``mel`` (1, 80, ceil(F·16/5)), ``phones`` (F,) (indices
into the pack's ``phone_inventory``, -1 unknown), ``visemes`` (F, 5), ``has_labels``,
``segment``, ``start``. Indexing follows ``UNetWindows``: one item per whole window a segment
holds; item ``i`` of epoch ``e`` draws its start and its reference window (another start of the
same segment at least F frames away when there is one) from a generator seeded with
``(seed, e, i)``, so any number of DataLoader workers or processes give the same items.

Whisper features and SyncNet mels (each (T, 5, 384) / (80, M) per segment, kept on the CPU) are
computed once, up front, in the process that builds the dataset (on the encoder's device), never
in the DataLoader workers.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import Dataset

from lipsync.audio import (
    AudioEncoder,
    frame_windows,
    syncnet_mel,
    syncnet_mel_start,
    syncnet_mel_window,
    syncnet_mel_window_length,
)
from lipsync.errors import ConfigError
from lipsync.face.mask import make_mask
from lipsync.train.pack import FPS, SAMPLES_PER_FRAME, Pack, PackSegment, read_pack


class PackUNetWindows(Dataset):
    """``num_frames``-frame U-Net windows of one split of a pack (module docstring)."""

    def __init__(
        self,
        pack: str | os.PathLike | Pack,
        split: str = "train",
        num_frames: int = 16,
        audio: AudioEncoder | None = None,
        seed: int = 0,
        mel: bool = True,
    ):
        if num_frames < 1:
            raise ConfigError(f"num_frames must be >= 1, got {num_frames}")
        self.pack = pack if isinstance(pack, Pack) else read_pack(pack, (split,))
        self.split, self.num_frames, self.seed, self.epoch = split, int(num_frames), int(seed), 0
        self.with_mel = mel
        self.segments = [s for s in self.pack.split_segments(split) if self._max_start(s) >= 0]
        if not self.segments:
            raise ConfigError(
                f"no {split!r} segment of the pack {self.pack.root} holds {num_frames} frames"
            )
        self._items = [(k, slot) for k, s in enumerate(self.segments)
                       for slot in range(max(1, s.frames // self.num_frames))]  # fmt: skip
        self._index = np.arange(len(self._items))
        self.mask = torch.from_numpy(make_mask(self.pack.resolution))[None]  # (1, R, R)
        wavs = [self._wav(s) for s in self.segments]
        # mels on the encoder's device when there is one (the CPU is the slow place for them)
        dev = audio.device if audio is not None else torch.device("cpu")
        self.mels = [syncnet_mel(torch.from_numpy(w).to(dev)).cpu() for w in wavs] if mel else None
        self.features = [audio.features(w) for w in wavs] if audio is not None else None

    def _wav(self, seg: PackSegment) -> np.ndarray:
        audio = self.pack.audio[self.split]
        lo = seg.start * SAMPLES_PER_FRAME
        return np.ascontiguousarray(audio[lo : lo + seg.frames * SAMPLES_PER_FRAME])

    def _max_start(self, seg: PackSegment) -> int:
        """Last start whose frames (and SyncNet mel window) fit in the segment (-1: none)."""
        last = seg.frames - self.num_frames
        if not self.with_mel:
            return last
        mel_frames = seg.frames * SAMPLES_PER_FRAME // 200 + 1  # syncnet_mel's length
        length = syncnet_mel_window_length(self.num_frames, FPS)
        while last >= 0 and syncnet_mel_start(last, FPS) + length > mel_frames:
            last -= 1
        return last

    def __len__(self) -> int:
        return len(self._index)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def shard(self, rank: int, world_size: int) -> PackUNetWindows:
        """Keep the items ``i`` with ``i % world_size == rank`` (in place)."""
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, {world_size}), got {rank}")
        self._index = np.arange(len(self._items))[rank::world_size]
        return self

    def window(self, i: int) -> tuple[int, int, int]:
        """(segment index, start, reference start) of item ``i`` in the current epoch."""
        rng = np.random.default_rng([self.seed, self.epoch, int(self._index[i])])
        k, _ = self._items[int(self._index[i])]
        seg, f = self.segments[k], self.num_frames
        start = int(rng.integers(0, self._max_start(seg) + 1))
        starts = range(seg.frames - f + 1)
        choices = [s for s in starts if abs(s - start) >= f]
        if not choices:
            choices = [s for s in starts if s != start] or [start]
        return k, start, int(choices[int(rng.integers(len(choices)))])

    def _pixels(self, seg: PackSegment, start: int) -> torch.Tensor:
        first = seg.start + start
        frames = self.pack.frames[self.split][first : first + self.num_frames]  # (F, R, R, 3)
        x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
        return x.float() / 127.5 - 1.0

    def __getitem__(self, i: int) -> dict:
        k, start, ref = self.window(i)
        seg, f = self.segments[k], self.num_frames
        lo = seg.start + start
        visemes = torch.from_numpy(np.array(self.pack.visemes[self.split][lo : lo + f]))
        item = {
            "frames": self._pixels(seg, start),
            "reference": self._pixels(seg, ref),
            "mask": self.mask.clone(),
            "phones": torch.from_numpy(np.array(self.pack.phones[self.split][lo : lo + f])),
            "visemes": visemes.float(),
            "has_labels": bool(torch.isfinite(visemes).any()),
            "segment": seg.id,
            "start": start,
        }
        if self.features is not None:
            item["audio_windows"] = frame_windows(
                self.features[k], FPS, start=start, stop=start + f
            )
        if self.mels is not None:
            item["mel"] = syncnet_mel_window(self.mels[k], start, f, FPS)[None]  # (1, 80, L)
        return item
