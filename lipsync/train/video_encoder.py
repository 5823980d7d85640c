"""Video encoders for temporal representation alignment (TREPA), behind one interface.

TREPA (LatentSync) compares a pretrained video model's features of the generated clip and of
the target clip. The reference uses VideoMAE v2 ViT-g (4 GB of weights, absent here). The mouth-
weighted variant (:mod:`lipsync.train.mouth_trepa`) needs more than the pooled feature vector: a
feature *grid* (channels × time × rows × columns) and where each grid cell lies in the face, so
that it can weight the cells over the lips. :class:`VideoEncoder` is that interface:

* :class:`TinyVideoAutoencoder` (``tiny3d``): ours, trained on the synthetic corpus' ground-truth
  mouths (:func:`train_video_autoencoder`): a 3-layer 3D-convolutional encoder of the mouth box
  (:mod:`lipsync.train.mouth`, 48 × 80 px, 16 frames) into a 64 × 16 × 6 × 10 grid (space
  downsampled 8×, time kept), and the mirror-image decoder that trains it by reconstruction
  (L1). Its 3×3×3 kernels see neighbouring frames and time is not subsampled, so the features
  change when the mouth flickers, even from one frame to the next. 0.47 M parameters (0.17 M in
  the encoder); no pretrained weights involved.
* :class:`VideoMaeGrid` (``videomae``): VideoMAE v2 (:class:`lipsync.train.losses.VideoMaeEncoder`,
  the reference's TREPA network) on the whole face at 224 px: its last block's tokens as a
  1408 × 8 × 16 × 16 grid. For users who have ``vit_g_hybrid_pt_1200e_ssv2_ft.pth``.

:func:`load_video_encoder` reads either from a file, strictly; a missing file is one clear error.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from lipsync.errors import CheckpointNotFoundError, ConfigError
from lipsync.own_checkpoints import load_tagged_state, read_tagged_config, save_tagged_module
from lipsync.train.config import VideoEncoderKind
from lipsync.train.losses import TrepaLoss, VideoMaeEncoder
from lipsync.train.mouth import MOUTH_SIZE, mouth_box, mouth_crops
from lipsync.train.optim import optimise

TINY_FORMAT = "lipsync.tiny_video_ae/1"


class VideoEncoder(Protocol):
    """What the mouth-weighted TREPA needs from a video model."""

    def features(self, video: torch.Tensor) -> torch.Tensor:
        """(B, F, 3, R, R) aligned faces in [-1, 1] -> (B, C, T', H', W') feature grid."""
        ...

    def weight_grid(self, weights: torch.Tensor) -> torch.Tensor:
        """(R, R) per-pixel weights -> (H', W') weights of the grid's cells (area means of the
        pixels each cell covers)."""
        ...


@dataclass(frozen=True)
class TinyVideoConfig:
    width: int = 32
    channels: int = 64  # feature channels of the grid

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> TinyVideoConfig:
        try:
            return cls(**dict(value))
        except TypeError as e:
            raise ConfigError(f"invalid tiny video encoder config {dict(value)}: {e}") from None


class TinyVideoAutoencoder(nn.Module):
    """3D-conv autoencoder of 16-frame mouth clips (module docstring)."""

    def __init__(self, config: TinyVideoConfig = TinyVideoConfig()):
        super().__init__()
        self.config = config
        w, c = config.width, config.channels
        self.encoder = nn.Sequential(
            nn.Conv3d(3, w, 3, stride=(1, 2, 2), padding=1),
            nn.GroupNorm(8, w),
            nn.SiLU(),
            nn.Conv3d(w, 2 * w, 3, stride=(1, 2, 2), padding=1),
            nn.GroupNorm(8, 2 * w),
            nn.SiLU(),
            nn.Conv3d(2 * w, c, 3, stride=(1, 2, 2), padding=1),
        )
        self.decoder = nn.Sequential(
            nn.SiLU(),
            nn.ConvTranspose3d(c, 2 * w, (3, 4, 4), stride=(1, 2, 2), padding=1),
            nn.GroupNorm(8, 2 * w),
            nn.SiLU(),
            nn.ConvTranspose3d(2 * w, w, (3, 4, 4), stride=(1, 2, 2), padding=1),
            nn.GroupNorm(8, w),
            nn.SiLU(),
            nn.ConvTranspose3d(w, 3, (3, 4, 4), stride=(1, 2, 2), padding=1),
        )

    def clips(self, video: torch.Tensor) -> torch.Tensor:
        """(B, F, 3, R, R) faces -> (B, 3, F, h, w) mouth clips."""
        return mouth_crops(video).transpose(1, 2)

    def features(self, video: torch.Tensor) -> torch.Tensor:
        # video: (B, F, 3, R, R) in [-1, 1] -> (B, channels, F, 6, 10)
        return self.encoder(self.clips(video))

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        # video: (B, F, 3, R, R) -> reconstruction of the mouth clips (B, 3, F, 48, 80)
        return self.decoder(self.features(video))

    def weight_grid(self, weights: torch.Tensor) -> torch.Tensor:
        # weights: (R, R) -> (6, 10): the mouth box's pixels, averaged per cell
        t, b, left, right = mouth_box(weights.shape[-1])
        box = weights[t:b, left:right].float()[None, None]
        box = F.interpolate(box, size=MOUTH_SIZE, mode="bilinear", align_corners=False)
        grid = (MOUTH_SIZE[0] // 8, MOUTH_SIZE[1] // 8)
        return F.adaptive_avg_pool2d(box, grid)[0, 0]

    def save(self, path: str | os.PathLike, **extra: str) -> None:
        save_tagged_module(self, path, TINY_FORMAT, asdict(self.config), **extra)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> TinyVideoAutoencoder:
        config = read_tagged_config(path, TINY_FORMAT, "tiny video encoder")
        model = cls(TinyVideoConfig.from_dict(config))
        return load_tagged_state(model, path, "tiny video encoder")


class VideoMaeGrid(nn.Module):
    """VideoMAE v2 as a :class:`VideoEncoder`: whole faces at its image size, last-block tokens
    as a (C, F/tubelet, S/patch, S/patch) grid."""

    def __init__(self, encoder: VideoMaeEncoder):
        super().__init__()
        self.encoder = encoder
        d = encoder.dims
        self.grid = (d.image_size // d.patch_size, d.image_size // d.patch_size)

    def features(self, video: torch.Tensor) -> torch.Tensor:
        # video: (B, F, 3, R, R) in [-1, 1] -> (B, C, F / tubelet, S / patch, S / patch)
        d = self.encoder.dims
        b, f = video.shape[:2]
        frames = video.reshape(b * f, *video.shape[2:]).float()
        frames = F.interpolate(
            frames, size=(d.image_size,) * 2, mode="bicubic", align_corners=False
        )
        clip = frames.reshape(b, f, 3, d.image_size, d.image_size).transpose(1, 2) / 2 + 0.5
        tokens = self.encoder.forward_tokens(clip.clamp(0, 1))  # (B, N, C)
        t = f // d.tubelet_size
        return tokens.reshape(b, t, *self.grid, -1).permute(0, 4, 1, 2, 3)

    def weight_grid(self, weights: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(weights.float()[None, None], self.grid)[0, 0]


def load_video_encoder(
    kind: VideoEncoderKind,
    path: str | os.PathLike | None,
    videomae_config: str | Mapping[str, Any] = "vit-g",
) -> nn.Module:
    """A frozen :class:`VideoEncoder` (eval mode, no gradients) from ``path``."""
    if not path:
        raise ConfigError(
            f"the {kind} video encoder needs a file: train one with the quality protocol "
            "(tiny3d) or give VideoMAE v2's vit_g_hybrid_pt_1200e_ssv2_ft.pth (videomae)"
        )
    if not os.path.isfile(path):
        raise CheckpointNotFoundError(f"video encoder not found: {path}")
    if kind == "tiny3d":
        model: nn.Module = TinyVideoAutoencoder.from_file(path)
    elif kind == "videomae":
        model = VideoMaeGrid(TrepaLoss.from_file(path, videomae_config).encoder)
    else:
        raise ConfigError(f"unknown video encoder kind {kind!r}; use tiny3d or videomae")
    return model.eval().requires_grad_(False)


def train_video_autoencoder(
    sample: Callable[[int], torch.Tensor],
    steps: int,
    config: TinyVideoConfig = TinyVideoConfig(),
    lr: float = 1e-3,
    seed: int = 0,
    device: torch.device | str = "cpu",
    deadline: Callable[[], bool] | None = None,
) -> tuple[TinyVideoAutoencoder, list[float]]:
    """Train :class:`TinyVideoAutoencoder` by reconstruction: ``sample(step)`` -> (B, F, 3, R, R)
    ground-truth faces in [-1, 1]. Stops after ``steps`` or when ``deadline()`` says so."""
    dev = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TinyVideoAutoencoder(config)
    model.to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)

    def loss_of(step: int) -> torch.Tensor:
        video = sample(step)
        with torch.autocast(dev.type, torch.bfloat16, enabled=dev.type == "cuda"):
            target = model.clips(video)
            return F.l1_loss(model.decoder(model.encoder(target)).float(), target.float())

    losses = optimise(loss_of, opt, steps, deadline)
    return model.eval().requires_grad_(False), losses
