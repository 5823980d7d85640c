"""Small, fast stand-ins for the training tests: a toy window dataset with exactly the item keys
of ``lipsync.data.datasets.UNetWindows`` (CONTRACT-data.md §3), tiny model configs, and a tiny
random SyncNet. The toy "faces" are a smooth background with a dark mouth ellipse whose opening
follows a per-frame loudness, and the audio windows and mel encode the same loudness, so the
U-Net has something learnable; nothing here claims to look like real data.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from lipsync.checkpoints import save_syncnet
from lipsync.face.mask import make_mask
from lipsync.models.syncnet import StableSyncNet
from lipsync.train.config import load_unet_config
from lipsync.train.unet import build_unet, export_unet

RES = 64
FRAMES = 4
SEGMENTS = 6
SEGMENT_FRAMES = 20

# 2 resolution levels (latents 8 -> 4), motion modules, 32-channel groups: fast on a CPU.
TINY_UNET = {
    "in_channels": 13,
    "out_channels": 4,
    "block_out_channels": [32, 64],
    "down_block_types": ["CrossAttnDownBlock3D", "DownBlock3D"],
    "up_block_types": ["UpBlock3D", "CrossAttnUpBlock3D"],
    "layers_per_block": 1,
    "attention_head_dim": 8,
    "cross_attention_dim": 384,
    "norm_num_groups": 32,
    "use_motion_module": True,
    "motion_module_resolutions": [1, 2],
    "motion_module_kwargs": {"num_attention_heads": 8, "temporal_position_encoding_max_len": 24},
}
TINY_VAE = {
    "block_out_channels": [8, 16, 16, 16],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}


def tiny_syncnet_config(frames: int, audio_tail: list) -> dict:
    """A SyncNet of ``frames`` 64 px faces, 6 small blocks per encoder; ``audio_tail``: the
    audio encoder's last two downsample factors (they bring the mel to 1x1)."""
    return {
        "num_frames": frames,
        "resolution": RES,
        "audio_encoder": {
            "in_channels": 1,
            "block_out_channels": [32, 32, 32, 32, 64, 64],
            "downsample_factors": [[2, 1], 2, 2, 2, *audio_tail],
            "attn_blocks": [0, 0, 0, 0, 0, 0],
        },
        "visual_encoder": {
            "in_channels": 3 * frames,
            "block_out_channels": [32, 32, 32, 32, 64, 64],
            "downsample_factors": [[1, 2], 2, 2, 2, 2, 2],
            "attn_blocks": [0, 0, 0, 0, 0, 0],
        },
    }


# 4 frames of 64 px faces: image (12, 32, 64) -> 1x1, mel (1, 80, 13) -> 1x1
TINY_SYNCNET = tiny_syncnet_config(FRAMES, [[5, 1], [1, 1]])


def _rng(*key) -> np.random.Generator:
    digest = hashlib.sha256(repr(key).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _smooth_curve(rng: np.random.Generator, frames: int) -> np.ndarray:
    """(frames,) values in [0, 1]: random knots every 3 frames, linearly interpolated."""
    knots = rng.uniform(0, 1, frames // 3 + 2)
    return np.interp(np.arange(frames) / 3.0, np.arange(len(knots)), knots)


def _loudness(segment: int) -> np.ndarray:
    return _smooth_curve(_rng("loud", segment), SEGMENT_FRAMES)


def _face(segment: int, loud: float) -> np.ndarray:
    """(3, R, R) float32 in [-1, 1]."""
    rng = _rng("face", segment)
    y, x = np.mgrid[0:RES, 0:RES] / RES
    base = rng.uniform(-0.5, 0.5, 3)[:, None, None] + 0.3 * (x - 0.5)[None]
    open_ = 0.04 + 0.12 * loud
    mouth = ((x - 0.5) / 0.18) ** 2 + ((y - 0.72) / open_) ** 2 < 1.0
    img = np.where(mouth[None], -0.8, base)
    return img.astype(np.float32)


class ToyWindows(torch.utils.data.Dataset):
    """Windows of FRAMES frames of SEGMENTS toy segments; deterministic per (seed, epoch, i)."""

    def __init__(self, split: str = "train", seed: int = 0, length: int = 24):
        self.split, self.seed, self.length, self.epoch = split, seed, length, 0
        self.offset = 0 if split == "train" else 1000
        self.mask = torch.from_numpy(make_mask(RES)).float()[None]  # (1, R, R)
        proj = _rng("proj").standard_normal((5, 384)).astype(np.float32)
        self.proj = torch.from_numpy(proj)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        seg = self.offset + i % SEGMENTS
        rng = _rng(self.seed, self.epoch, self.split, i)
        start = int(rng.integers(0, SEGMENT_FRAMES - FRAMES + 1))
        ref_start = (start + FRAMES + int(rng.integers(0, 4))) % (SEGMENT_FRAMES - FRAMES + 1)
        loud = _loudness(seg)
        frames = np.stack([_face(seg, loud[start + k]) for k in range(FRAMES)])
        reference = np.stack([_face(seg, loud[ref_start + k]) for k in range(FRAMES)])
        # audio windows: 10 positions x 5 layers, position p of frame t hears loudness t + p//2 - 2
        windows = []
        for k in range(FRAMES):
            idx = np.clip(start + k + np.arange(10) // 2 - 2, 0, SEGMENT_FRAMES - 1)
            tokens = torch.from_numpy(loud[idx].astype(np.float32))[:, None, None] * self.proj
            windows.append(tokens.reshape(50, 384))
        mel_t = np.interp(np.linspace(start, start + FRAMES - 1, 13), np.arange(SEGMENT_FRAMES),
                          loud)  # fmt: skip
        mel = (np.linspace(-1, 1, 80)[:, None] * mel_t[None]).astype(np.float32)[None]
        return {
            "frames": torch.from_numpy(frames),
            "reference": torch.from_numpy(reference),
            "mask": self.mask,
            "audio_windows": torch.stack(windows),
            "mel": torch.from_numpy(mel),
            "phones": torch.full((FRAMES,), -1, dtype=torch.int64),
            "visemes": torch.full((FRAMES, 5), float("nan")),
            "has_labels": False,
            "segment": f"toy-{seg:03d}",
            "start": start,
        }


TOY_FACTORY = "tests.support.train_fixtures:toy_windows"  # with the repository on sys.path


def toy_windows(cfg, split: str, seed: int) -> ToyWindows:
    """``data.factory`` entry point: :data:`TOY_FACTORY`."""
    return ToyWindows(split, seed, length=24 if split == "train" else 4)


def _write_syncnet(path: Path, config: dict, seed: int, name: str) -> Path:
    torch.manual_seed(seed)
    save_syncnet(StableSyncNet.from_config(config), path, name=name)
    return path


def write_tiny_syncnet(path: Path) -> Path:
    return _write_syncnet(path, TINY_SYNCNET, 0, "tiny test syncnet")


def write_stage1_unet(folder: Path) -> torch.nn.Module:
    """A random stage-1 U-Net of :func:`unet_config_dict`, exported into ``folder`` (created) as
    one of our checkpoints (what stage-2 tests start from); returns the model."""
    model, _ = build_unet(load_unet_config(unet_config_dict(folder, stage=1)))
    folder.mkdir()
    export_unet(folder, dict(TINY_UNET, use_motion_module=False), model.state_dict(), "fp32", 0)
    return model


def unet_config_dict(out: Path, stage: int = 1, **sections) -> dict:
    """A tiny U-Net training config (our layout) writing to ``out``."""
    unet = dict(TINY_UNET, use_motion_module=stage == 2)
    cfg = {
        "schema": "lipsync.train.unet/1",
        "stage": stage,
        "output_dir": str(out),
        "model": {"unet_config": unet, "resolution": RES, "num_frames": FRAMES},
        "init": {"source": "scratch", "seed": 0},
        "vae": {"kind": "tiny-random", "config": TINY_VAE},
        "audio": {"kind": "seeded", "seed": 0},
        "data": {"factory": TOY_FACTORY, "batch_size": 2, "num_workers": 0},
        "losses": {"recon": 1.0},
        "train": {"max_steps": 6, "precision": "fp32", "gradient_checkpointing": False,
                  "log_every": 1, "seed": 3},
        "optimizer": {"lr": 1e-3, "fused": False},
        "checkpoint": {"every": 3, "keep": 2},
        "validation": {"every": 0, "windows": 2, "videos": 0},
    }  # fmt: skip
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(json.dumps(cfg, indent=1))
    return path


# 16 frames of 64 px faces (the demo recipe's window length at test size)
TINY_SYNCNET_16 = tiny_syncnet_config(16, [[5, 2], [1, 2]])


def write_tiny_syncnet_16(path: Path) -> Path:
    return _write_syncnet(path, TINY_SYNCNET_16, 1, "tiny 16-frame syncnet")


def make_processed_corpus(root: Path, splits=(("train", 4), ("val", 2)), frames: int = 56) -> Path:
    """A small processed corpus in the layout of ``lipsync data process`` (manifest.jsonl,
    final/<id>.mp4 with AAC audio, final/<id>.json with split, frames and viseme labels): toy
    faces whose mouth opens with the loudness of a voiced tone."""
    from lipsync.data.manifest import write_manifest
    from lipsync.media import write_video

    final = root / "final"
    final.mkdir(parents=True, exist_ok=True)
    entries: list[dict] = []
    n = 0
    for split, count in splits:
        for _ in range(count):
            loud = _smooth_curve(_rng("corpus", n), frames)
            video = np.stack([((_face(n, v).transpose(1, 2, 0) + 1) * 127.5).round()
                              for v in loud]).astype(np.uint8)  # fmt: skip
            t = np.arange(frames * 640) / 16000.0
            env = np.repeat(loud, 640)
            tone = sum(np.sin(2 * np.pi * f0 * t) / k for k, f0 in enumerate((150, 300, 450), 1))
            wav = (0.3 * env * tone).astype(np.float32)
            seg = f"seg-{n:03d}"
            write_video(final / f"{seg}.mp4", video, fps=25, audio=wav, crf=12)
            visemes = [[float(v), 0.5, 0.0, 0.0, 0.0] for v in loud]
            record = {
                "schema": "lipsync.segment/1", "id": seg, "split": split, "fps": 25,
                "sample_rate": 16000, "resolution": RES, "frames": frames,
                "media": f"{seg}.mp4",
                "labels": {"identity": f"toy{n % 2}", "voice": {"name": "en", "variant": "m1"},
                           "sentence_id": f"s{n:03d}",
                           "phones": [{"label": "AA", "start": 0.1, "end": 0.5}],
                           "visemes": {"names": ["open", "width", "round", "teeth", "tongue"],
                                       "per_frame": visemes}},
            }  # fmt: skip
            (final / f"{seg}.json").write_text(json.dumps(record))
            entries.append({"kind": "segment", "id": seg, "input": seg, "source": f"{seg}.mp4",
                            "split": split, "status": "kept", "step": "quality"})  # fmt: skip
            n += 1
    write_manifest(root / "manifest.jsonl", entries)
    return root
