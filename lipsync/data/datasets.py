"""Training datasets over a processed corpus (``lipsync data process`` output; CONTRACT-data.md 3).

* :class:`ProcessedCorpus` -- the kept segments of ``OUT`` (``manifest.jsonl`` + ``final/*.json``).
* :class:`UNetWindows` -- ``num_frames``-frame windows for the U-Net: target crops, a reference
  window from another time of the same segment, the inpainting mask, Whisper windows exactly as
  at inference (with a :class:`FeatureCache`), the SyncNet mel window, phone / viseme labels of
  synthetic segments.
* :class:`SyncNetPairs` -- lower-half crops + a mel window, in sync (y = 1) or not (y = 0: the
  audio of a window at least ``MIN_NEGATIVE_OFFSET`` frames away in the same segment).

Determinism and scale-out: item ``i`` of epoch ``e`` depends only on ``(seed, e, i)`` (a NumPy
generator seeded with them), never on the worker that builds it, so any number of DataLoader
workers give the same items. ``shard(rank, world_size)`` keeps the items ``i`` with
``i % world_size == rank`` (disjoint; together they cover the dataset). ``set_epoch(e)``
redraws the windows (call it in every process, as with ``DistributedSampler``).

Crops are decoded from the segment's H.264 file per item (one 256 px clip decodes in
milliseconds); pixels map to ``[-1, 1]`` as the inference pipeline maps them
(``(x / 255 - 0.5) / 0.5``).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from lipsync.audio import AudioEncoder, frame_windows, load_audio, syncnet_mel, syncnet_mel_window
from lipsync.data.manifest import read_manifest
from lipsync.errors import ConfigError
from lipsync.face.mask import make_mask
from lipsync.media import read_frames

__all__ = [
    "MIN_NEGATIVE_OFFSET",
    "FeatureCache",
    "ProcessedCorpus",
    "SegmentInfo",
    "SyncNetPairs",
    "UNetWindows",
]

FPS = 25
MIN_NEGATIVE_OFFSET = 5  # frames between an out-of-sync audio window and the video window
_UNIT = (torch.arange(256, dtype=torch.float32) / 255.0 - 0.5) / 0.5  # uint8 -> [-1, 1]


@dataclass(frozen=True)
class SegmentInfo:
    id: str
    split: str
    path: Path  # the segment's mp4 (face crops + AAC audio)
    frames: int
    resolution: int
    record: dict  # final/<id>.json

    @property
    def labels(self) -> dict | None:
        return self.record.get("labels")


class ProcessedCorpus:
    """The kept segments of a processing folder (manifest ``status == "kept"`` with their
    ``final/<id>.json``), sorted by id."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        manifest = self.root / "manifest.jsonl"
        if not manifest.is_file():
            raise ConfigError(f"{self.root} has no manifest.jsonl: run lipsync data process first")
        entries = read_manifest(manifest)
        kept = sorted(e["id"] for e in entries if e["kind"] == "segment" and e["status"] == "kept")
        self._segments: list[SegmentInfo] = []
        for seg_id in kept:
            rec_path = self.root / "final" / f"{seg_id}.json"
            if not rec_path.is_file():
                raise ConfigError(f"{rec_path} is missing (the manifest lists it as kept)")
            rec = json.loads(rec_path.read_text(encoding="utf-8"))
            self._segments.append(
                SegmentInfo(
                    seg_id,
                    rec["split"],
                    self.root / "final" / rec["media"],
                    int(rec["frames"]),
                    int(rec["resolution"]),
                    rec,
                )  # fmt: skip
            )

    def segments(self, split: str | None = None) -> list[SegmentInfo]:
        return [s for s in self._segments if split is None or s.split == split]

    def __len__(self) -> int:
        return len(self._segments)


class FeatureCache:
    """Whisper features (T, 5, 384) of each segment's audio, computed once by ``encoder`` and
    kept as ``<root>/whisper-<key>/<segment>.npy``; ``key`` is a hash of the encoder's weights,
    so another encoder never reads stale features. Files are written atomically, so DataLoader
    workers (or several training processes) can fill the cache concurrently."""

    def __init__(self, encoder: AudioEncoder, root: str | os.PathLike):
        self.encoder = encoder
        self.key = weights_key(encoder)
        self.dir = Path(root) / f"whisper-{self.key}"

    def features(self, segment: SegmentInfo) -> torch.Tensor:
        path = self.dir / f"{segment.id}.npy"
        if path.is_file():
            return torch.from_numpy(np.load(path))
        feats = self.encoder.features(load_audio(segment.path))
        self.dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=self.dir)
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, feats.numpy())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return feats

    def windows(self, segment: SegmentInfo, start: int, num_frames: int) -> torch.Tensor:
        """(num_frames, 50, 384) windows of frames ``start..`` exactly as inference builds them
        (:func:`lipsync.audio.frame_windows` over the segment's features)."""
        return frame_windows(self.features(segment), FPS, start=start, stop=start + num_frames)

    def fill(self, segments: Sequence[SegmentInfo]) -> None:
        """Compute the missing features up front (e.g. once before training)."""
        for seg in segments:
            self.features(seg)


def weights_key(encoder: AudioEncoder) -> str:
    """16 hex digits of the SHA-256 of the encoder's weights (names, shapes, dtypes, values)."""
    h = hashlib.sha256()
    for name, tensor in sorted(encoder.encoder.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def _unit(frames: np.ndarray) -> torch.Tensor:
    """(n, H, W, 3) uint8 -> (n, 3, H, W) float32 in [-1, 1]."""
    return _UNIT[torch.from_numpy(np.ascontiguousarray(frames)).long()].permute(0, 3, 1, 2)


class _Windows(Dataset):
    """Shared indexing: a flat list of (segment, slot) items, seeded per (seed, epoch, item)."""

    def __init__(
        self,
        corpus: ProcessedCorpus,
        split: str | None = "train",
        num_frames: int = 16,
        seed: int = 0,
    ):
        if num_frames < 1:
            raise ConfigError(f"num_frames must be >= 1, got {num_frames}")
        self.num_frames = int(num_frames)
        self.seed = int(seed)
        self.epoch = 0
        self.segments = [s for s in corpus.segments(split) if s.frames >= self._min_frames()]
        # one item per whole window a segment holds (at least one)
        self._items = [
            (k, slot)
            for k, s in enumerate(self.segments)
            for slot in range(max(1, s.frames // self.num_frames))
        ]
        self._index = np.arange(len(self._items))

    def _min_frames(self) -> int:
        return self.num_frames

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def shard(self, rank: int, world_size: int):
        """This dataset restricted to items ``i`` with ``i % world_size == rank`` (in place)."""
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, {world_size}), got {rank}")
        self._index = np.arange(len(self._items))[rank::world_size]
        return self

    def __len__(self) -> int:
        return len(self._index)

    def _rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, int(self._index[i])])

    def _pick(self, i: int) -> tuple[SegmentInfo, int, np.random.Generator]:
        rng = self._rng(i)
        k, _ = self._items[int(self._index[i])]
        seg = self.segments[k]
        start = int(rng.integers(0, self._max_start(seg) + 1))
        return seg, start, rng

    def _max_start(self, seg: SegmentInfo) -> int:
        return seg.frames - self.num_frames

    def window(self, i: int) -> tuple[str, int]:
        """(segment id, first frame) of item ``i`` in the current epoch, without decoding."""
        seg, start, _ = self._pick(i)
        return seg.id, start

    def _crops(self, seg: SegmentInfo, start: int) -> np.ndarray:
        frames = read_frames(seg.path, fps=FPS, start=start, stop=start + self.num_frames)
        if len(frames) != self.num_frames:
            raise ConfigError(f"{seg.path}: expected {self.num_frames} frames from {start}")
        return frames

    def _mel(self, seg: SegmentInfo, start: int) -> torch.Tensor:
        mel = syncnet_mel(load_audio(seg.path))
        return syncnet_mel_window(mel, start, self.num_frames, FPS)[None]  # (1, 80, L)


def _max_mel_start(frames: int, num_frames: int, mel_frames: int) -> int:
    """Largest video start whose SyncNet mel window fits in ``mel_frames``."""
    start = frames - num_frames
    while start > 0 and int(80 * start / FPS) + int(np.ceil(num_frames / FPS * 80)) > mel_frames:
        start -= 1
    return start


class UNetWindows(_Windows):
    """U-Net training windows (see the module docstring for the item keys and shapes)."""

    def __init__(
        self,
        corpus: ProcessedCorpus,
        split: str | None = "train",
        num_frames: int = 16,
        audio_features: FeatureCache | None = None,
        seed: int = 0,
        phones: Sequence[str] | None = None,
        mel: bool = True,
    ):
        super().__init__(corpus, split, num_frames, seed)
        self.features = audio_features
        self.phone_ids = {p: i for i, p in enumerate(phones)} if phones is not None else None
        self.with_mel = mel
        res = {s.resolution for s in self.segments}
        if len(res) > 1:
            raise ConfigError(f"segments of several resolutions in one dataset: {sorted(res)}")
        r = res.pop() if res else 256
        self.mask = torch.from_numpy(make_mask(r))[None]  # (1, R, R), 1 = keep

    def _labels(self, seg: SegmentInfo, start: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
        f = self.num_frames
        phones = torch.full((f,), -1, dtype=torch.int64)
        visemes = torch.full((f, 5), float("nan"), dtype=torch.float32)
        labels = seg.labels
        if not labels:
            return phones, visemes, False
        if self.phone_ids is not None:
            centres = (start + np.arange(f) + 0.5) / FPS
            for p in labels.get("phones") or []:
                inside = (centres >= p["start"]) & (centres < p["end"])
                phones[torch.from_numpy(inside)] = self.phone_ids.get(p["label"], -1)
        rows = (labels.get("visemes") or {}).get("per_frame") or []
        got = rows[start : start + f]
        if got:
            visemes[: len(got)] = torch.tensor(got, dtype=torch.float32)
        return phones, visemes, True

    def __getitem__(self, i: int) -> dict:
        seg, start, rng = self._pick(i)
        f = self.num_frames
        # reference: another window of the same segment, not overlapping the target if possible
        choices = [s for s in range(seg.frames - f + 1) if abs(s - start) >= f]
        if not choices:
            choices = [s for s in range(seg.frames - f + 1) if s != start] or [start]
        ref = int(choices[int(rng.integers(len(choices)))])
        phones, visemes, has_labels = self._labels(seg, start)
        item = {
            "frames": _unit(self._crops(seg, start)),
            "reference": _unit(self._crops(seg, ref)),
            "mask": self.mask.clone(),
            "phones": phones,
            "visemes": visemes,
            "has_labels": has_labels,
            "segment": seg.id,
            "start": start,
        }
        if self.features is not None:
            item["audio_windows"] = self.features.windows(seg, start, f)
        if self.with_mel:
            item["mel"] = self._mel(seg, start)
        return item

    def _max_start(self, seg: SegmentInfo) -> int:
        if not self.with_mel:
            return seg.frames - self.num_frames
        mel_frames = seg.frames * 640 // 200 + 1  # syncnet_mel's length for the segment audio
        return _max_mel_start(seg.frames, self.num_frames, mel_frames)


class SyncNetPairs(_Windows):
    """SyncNet training pairs: ``image`` (3F, R/2, R) lower halves, frame-major RGB in [-1, 1];
    ``audio`` (1, 80, 52) mel window; ``y`` (1,) 1 = in sync, 0 = the mel window of a start at
    least ``MIN_NEGATIVE_OFFSET`` frames away in the same segment. Half the items (by the item's
    generator) are positives."""

    def _min_frames(self) -> int:
        return self.num_frames + MIN_NEGATIVE_OFFSET

    def _max_start(self, seg: SegmentInfo) -> int:
        mel_frames = seg.frames * 640 // 200 + 1
        return _max_mel_start(seg.frames, self.num_frames, mel_frames)

    def __getitem__(self, i: int) -> dict:
        seg, start, rng = self._pick(i)
        positive = bool(rng.integers(2))
        audio_start = start
        if not positive:
            last = self._max_start(seg)
            choices = [s for s in range(last + 1) if abs(s - start) >= MIN_NEGATIVE_OFFSET]
            if not choices:  # pragma: no cover - segments are >= F + 5 frames long
                positive = True
            else:
                audio_start = int(choices[int(rng.integers(len(choices)))])
        crops = self._crops(seg, start)
        r = crops.shape[1]
        lower = _unit(crops[:, r // 2 :])  # (F, 3, R/2, R)
        return {
            "image": lower.reshape(-1, *lower.shape[2:]),  # (3F, R/2, R)
            "audio": self._mel(seg, audio_start),
            "y": torch.tensor([1.0 if positive else 0.0]),
            "segment": seg.id,
            "start": start,
            "audio_start": audio_start,
        }
