"""A toy, procedurally generated audio-visual sync task: a stand-in for ``SyncNetPairs``.

Each toy clip is a drawn mouth (the lower half of a face crop: skin, lips, a dark opening) whose
opening follows a random syllable-like envelope at 25 fps, and a 16 kHz voiced sound (harmonics
of a random pitch, some noise) whose loudness follows the same envelope. Sync is learnable from
it in a few hundred CPU steps; it says nothing about real faces. It exists so SyncNet training,
resumption, DDP and the offset search can be tested without a processed corpus, and it carries
the same item keys as :class:`lipsync.data.datasets.SyncNetPairs` (see ``CONTRACT-data.md``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from lipsync.audio import (
    SAMPLE_RATE,
    syncnet_mel,
    syncnet_mel_start,
    syncnet_mel_window,
    syncnet_mel_window_length,
)

FPS = 25
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640
MIN_NEGATIVE_OFFSET = 5  # frames, as the contract's SyncNetPairs


def _seed(*key: object) -> int:
    """A 63-bit seed from a key (stable across processes, unlike ``hash``)."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _rng(*key: object) -> np.random.Generator:
    return np.random.default_rng(_seed(*key))


@dataclass(frozen=True)
class ToyClip:
    frames: np.ndarray  # (T, R/2, R, 3) uint8: lower halves of face crops
    wav: np.ndarray  # (T * 640,) float32, 16 kHz
    opening: np.ndarray  # (T,) float32 in [0, 1]: the mouth opening per frame


def mouth_opening(rng: np.random.Generator, num_frames: int) -> np.ndarray:
    """(T,) syllable-like opening: random targets every 2-6 frames, linearly blended."""
    knots, values, t = [0], [rng.uniform(0.0, 0.2)], 0
    while t < num_frames:
        t += int(rng.integers(2, 7))
        knots.append(t)
        values.append(rng.uniform(0.0, 0.25) if rng.random() < 0.35 else rng.uniform(0.4, 1.0))
    return np.interp(np.arange(num_frames), knots, values).astype(np.float32)


def voice(rng: np.random.Generator, opening: np.ndarray) -> np.ndarray:
    """A voiced sound whose loudness follows ``opening`` (frame k centred at (k + 0.5) / 25 s)."""
    n = len(opening) * SAMPLES_PER_FRAME
    t = np.arange(n) / SAMPLE_RATE
    f0 = rng.uniform(100.0, 240.0) * (1.0 + 0.03 * np.sin(2 * np.pi * rng.uniform(2, 6) * t))
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    carrier = sum(np.sin(k * phase) / k for k in range(1, 9))
    carrier = carrier + 0.3 * rng.standard_normal(n)
    centres = (np.arange(len(opening)) + 0.5) / FPS
    envelope = np.interp(t, centres, opening) ** 1.5
    return (0.2 * envelope * carrier).astype(np.float32)


def draw_mouths(rng: np.random.Generator, opening: np.ndarray, resolution: int) -> np.ndarray:
    """(T,) openings -> (T, R/2, R, 3) uint8 lower-half crops with a mouth of that opening."""
    h, w = resolution // 2, resolution
    skin = rng.uniform(90, 230, size=3) * np.array([1.0, 0.8, 0.7])
    lips = skin * np.array([0.8, 0.5, 0.5])
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = 0.35 * h, 0.5 * w
    out = np.empty((len(opening), h, w, 3), dtype=np.uint8)
    for k, o in enumerate(opening):
        jx, jy = rng.normal(0, 0.01 * w), rng.normal(0, 0.01 * h)
        half_w = 0.2 * w * (1.0 - 0.15 * o)
        half_h = 0.04 * h + 0.25 * h * o
        r_lips = ((x - cx - jx) / (half_w * 1.25)) ** 2 + ((y - cy - jy) / (half_h + 0.08 * h)) ** 2
        r_open = ((x - cx - jx) / half_w) ** 2 + ((y - cy - jy) / half_h) ** 2
        lip = np.clip((1.0 - r_lips) * 4, 0, 1)[..., None]
        hole = np.clip((1.0 - r_open) * 4, 0, 1)[..., None]
        img = skin * (1 - lip) + lips * lip
        img = img * (1 - hole) + np.array([25.0, 10.0, 10.0]) * hole
        img = img + rng.normal(0, 4.0, size=img.shape)
        out[k] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def toy_clip(seed: int, num_frames: int, resolution: int) -> ToyClip:
    rng = _rng("toy-clip", seed, num_frames, resolution)
    opening = mouth_opening(rng, num_frames)
    return ToyClip(draw_mouths(rng, opening, resolution), voice(rng, opening), opening)


def frames_to_image(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(F, h, w, 3) uint8 -> (3F, h, w) float32 in [-1, 1], frame-major RGB (SyncNet's layout)."""
    t = torch.as_tensor(frames)
    f, h, w, _ = t.shape
    return (t.permute(0, 3, 1, 2).reshape(3 * f, h, w).float() / 127.5) - 1.0


class ToySyncPairs(torch.utils.data.Dataset):
    """SyncNet training pairs from toy clips: the item keys of ``SyncNetPairs``.

    ``image`` (3F, R/2, R) float32 in [-1, 1], ``audio`` (1, 80, 52), ``y`` (1,) 1 = in sync,
    0 = audio from another time of the same clip (>= 5 frames away), ``segment``, ``start``.
    Items depend only on (seed, split, epoch, index); positives and negatives alternate by a
    hash of those.
    """

    def __init__(
        self,
        num_clips: int = 32,
        clip_frames: int = 50,
        resolution: int = 64,
        num_frames: int = 16,
        seed: int = 0,
        split: str = "train",
    ):
        self.num_clips, self.clip_frames = num_clips, clip_frames
        self.resolution, self.num_frames = resolution, num_frames
        self.seed, self.split, self.epoch = seed, split, 0
        self.mel_len = syncnet_mel_window_length(num_frames, FPS)
        mel_frames = clip_frames * SAMPLES_PER_FRAME // 200 + 1
        self.starts = [
            s
            for s in range(clip_frames - num_frames + 1)
            if syncnet_mel_start(s, FPS) + self.mel_len <= mel_frames
        ]
        if len(self.starts) <= 2 * MIN_NEGATIVE_OFFSET:
            raise ValueError(f"toy clips of {clip_frames} frames are too short for negatives")
        self._indices = np.arange(num_clips * len(self.starts))

    def __len__(self) -> int:
        return len(self._indices)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def shard(self, rank: int, world_size: int) -> ToySyncPairs:
        """This dataset restricted to every ``world_size``-th item from ``rank`` (in place)."""
        self._indices = self._indices[rank::world_size]
        return self

    @lru_cache(maxsize=64)  # noqa: B019 - per dataset object and worker; clips are small
    def clip(self, k: int) -> tuple[np.ndarray, torch.Tensor]:
        c = toy_clip(_seed(self.seed, self.split, k), self.clip_frames, self.resolution)
        return c.frames, syncnet_mel(c.wav)

    def __getitem__(self, i: int) -> dict:
        j = int(self._indices[i])
        k, start = divmod(j, len(self.starts))
        start = self.starts[start]
        frames, mel = self.clip(k)
        rng = _rng("toy-pair", self.seed, self.split, self.epoch, j)
        positive = bool(rng.integers(2))
        audio_start = start
        if not positive:
            far = [s for s in self.starts if abs(s - start) >= MIN_NEGATIVE_OFFSET]
            audio_start = int(rng.choice(far))
        window = syncnet_mel_window(mel, audio_start, self.num_frames, FPS)
        return {
            "image": frames_to_image(frames[start : start + self.num_frames]),
            "audio": window[None].clone(),
            "y": torch.tensor([1.0 if positive else 0.0]),
            "segment": f"toy-{self.split}-{k:05d}",
            "start": start,
        }
