"""Typed options of ``lipsync data process`` (one dataclass, validated once)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from typing import Literal

from lipsync.errors import ConfigError

__all__ = ["FPS", "SAMPLE_RATE", "ProcessOptions", "SplitKey"]

FPS = 25
SAMPLE_RATE = 16000
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640

SplitKey = Literal["name", "folder"]


@dataclass(frozen=True)
class ProcessOptions:
    """Everything a processing run depends on.

    Fields listed in :attr:`OUTPUT_FIELDS` shape the outputs: they are stored in
    ``OUT/process.json`` and a re-run on the same folder must use the same values (otherwise
    finished records would mix two settings). The others (workers, Ray address, progress) only
    change how the work is scheduled.
    """

    resolution: Literal[256, 512] = 256
    # step 1
    max_side: int = 3840  # pixels; 8K input is rejected (decoding it needs ~100 MB per frame)
    max_duration_s: float = 7200.0  # 2 hours; everything streams, so raising it is safe
    strict_decode: bool = True  # any damaged packet drops the input (training data)
    # step 3
    scene_threshold: float = 3.0  # PySceneDetect AdaptiveDetector adaptive_threshold
    # step 4
    min_seconds: float = 5.0
    max_seconds: float = 10.0
    # step 5
    min_face_size: int = 128  # short side of the face box, source pixels
    crf: float = 15.0  # face crops: H.264 high quality
    intermediate_crf: float = 12.0  # step 2's resampled video
    # step 6
    syncnet: str | None = None  # checkpoint path; None = step skipped (recorded)
    sync_threshold: float = 3.0  # minimum SyncNet confidence (the reference's)
    # step 7
    hyperiqa: str | None = None  # hyperIQA weights (koniq_pretrained.pkl); None = weight-free score
    quality_threshold: float | None = None  # None = the scorer's default
    quality_frames: int = 8  # frames sampled per segment
    # splits
    split_key: SplitKey = "name"
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    # scheduling (not stored)
    workers: int = 0  # 0 = os.cpu_count()
    ray_address: str | None = None
    progress: bool = True

    SCHEDULING_FIELDS = ("workers", "ray_address", "progress")

    def validate(self) -> ProcessOptions:
        if self.resolution not in (256, 512):
            raise ConfigError(f"--resolution must be 256 or 512, got {self.resolution}")
        if not 0 < self.min_seconds <= self.max_seconds:
            raise ConfigError(
                f"segment length must satisfy 0 < min ({self.min_seconds}) <= max "
                f"({self.max_seconds}) seconds"
            )
        if self.max_seconds < 2 * self.min_seconds - 1 / FPS:
            raise ConfigError("max segment length must be at least twice the minimum")
        if self.workers < 0:
            raise ConfigError(f"--workers must be >= 0, got {self.workers}")
        if self.min_face_size < 1 or self.max_side < 64 or self.max_duration_s <= 0:
            raise ConfigError("min face size, max side and max duration must be positive")
        if not 0 <= self.val_fraction + self.test_fraction < 1:
            raise ConfigError("val + test fractions must be in [0, 1)")
        if self.quality_frames < 1:
            raise ConfigError("--quality-frames must be >= 1")
        for label, path in (("--syncnet", self.syncnet), ("--hyperiqa", self.hyperiqa)):
            if path is not None and not os.path.isfile(path):
                raise ConfigError(f"{label} checkpoint not found: {path}")
        return self

    @property
    def num_workers(self) -> int:
        return self.workers or os.cpu_count() or 1

    def output_settings(self) -> dict:
        """The fields that shape the outputs (stored in ``process.json``)."""
        data = asdict(self)
        for name in self.SCHEDULING_FIELDS:
            data.pop(name)
        for name in ("syncnet", "hyperiqa"):  # which file, not where it lives
            if data[name] is not None:
                data[name] = os.path.basename(data[name])
        return data

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
