"""LatentSync's StableSyncNet: an audio and a visual encoder whose embeddings agree when the lips
match the audio. State-dict compatible with the official ``stable_syncnet.pt``.

Inputs per call (the official config ``syncnet_16_pixel_attn``, 256 px faces, 16 frames):
  image  (b, 3·F, R/2, R)  lower half of F aligned face crops, frame-major RGB, in [-1, 1]
                           ((b, 48, 128, 256) for F = 16 at 256 px)
  audio  (b, 1, 80, 52)    the SyncNet mel window of those frames (``lipsync.audio.syncnet_mel``)
Output: (vision_embeds, audio_embeds), each (b, C) and L2-normalised (C = 2048 officially).

Each encoder (:class:`DownEncoder`, checkpoint names ``audio_encoder.*`` / ``visual_encoder.*``) is
``conv_in`` → a list ``down_blocks`` of residual blocks, each optionally followed (in the same
list, so it takes the next index) by an attention block → GroupNorm → ReLU. A residual block
downsamples at its end with a 3×3 convolution of stride ``downsample_factors[i]`` (an int or an
(h, w) pair) after a one-sided zero pad: right/bottom by one, plus top and bottom for a stride of
1 along h, left and right for a stride of 1 along w. The strides must bring the input down to 1×1.

The embeddings pass through a ReLU, so their cosine similarity lies in [0, 1]; training uses the
binary cross-entropy of that cosine against the in-sync label (:func:`cosine_loss`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lipsync.errors import ConfigError
from lipsync.models.layers import Attention, FeedForward

NORM_GROUPS = 32
NORM_EPS = 1e-6
ATTENTION_HEADS = 8

Factor = int | tuple[int, int]


def _pair(factor: Factor) -> tuple[int, int]:
    return (factor, factor) if isinstance(factor, int) else (int(factor[0]), int(factor[1]))


@dataclass(frozen=True)
class EncoderConfig:
    """One encoder of the reference config (``audio_encoder`` / ``visual_encoder``)."""

    in_channels: int
    block_out_channels: tuple[int, ...]
    downsample_factors: tuple[Factor, ...]
    attn_blocks: tuple[int, ...]
    dropout: float = 0.0
    norm_num_groups: int = NORM_GROUPS  # not in the reference config (fixed at 32 there)

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], name: str) -> EncoderConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - names)
        if unknown:
            raise ConfigError(f"unknown SyncNet {name} config keys: {', '.join(unknown)}")
        missing = sorted(n for n in names - {"dropout", "norm_num_groups"} if n not in cfg)
        if missing:
            raise ConfigError(f"SyncNet {name} config lacks: {', '.join(missing)}")
        factors = tuple(
            f if isinstance(f, int) else tuple(int(x) for x in f) for f in cfg["downsample_factors"]
        )
        config = cls(
            in_channels=int(cfg["in_channels"]),
            block_out_channels=tuple(int(c) for c in cfg["block_out_channels"]),
            downsample_factors=factors,
            attn_blocks=tuple(int(a) for a in cfg["attn_blocks"]),
            dropout=float(cfg.get("dropout", 0.0)),
            norm_num_groups=int(cfg.get("norm_num_groups", NORM_GROUPS)),
        )
        config.validate(name)
        return config

    def validate(self, name: str) -> None:
        n = len(self.block_out_channels)
        if n == 0 or len(self.downsample_factors) != n or len(self.attn_blocks) != n:
            raise ConfigError(
                f"SyncNet {name}: block_out_channels, downsample_factors and attn_blocks need one "
                f"entry per block (got {n}, {len(self.downsample_factors)}, "
                f"{len(self.attn_blocks)})"
            )
        for ch in self.block_out_channels:
            if ch % self.norm_num_groups or ch % ATTENTION_HEADS:
                raise ConfigError(
                    f"SyncNet {name}: channels {ch} not divisible by the {self.norm_num_groups} "
                    f"norm groups and {ATTENTION_HEADS} attention heads"
                )
        if any(a not in (0, 1) for a in self.attn_blocks):
            raise ConfigError(f"SyncNet {name}: attn_blocks entries must be 0 or 1")
        for f in self.downsample_factors:
            if isinstance(f, tuple) and len(f) != 2 or min(_pair(f)) < 1:
                raise ConfigError(f"SyncNet {name}: bad downsample factor {f!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"SyncNet {name}: dropout must be in [0, 1)")

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """Spatial size after the encoder for an input of ``height`` × ``width``."""
        for f in self.downsample_factors:
            sh, sw = _pair(f)
            if (sh, sw) == (1, 1):
                continue
            ph, pw = _padding(sh, sw)
            height = (height + ph[0] + ph[1] - 3) // sh + 1
            width = (width + pw[0] + pw[1] - 3) // sw + 1
        return height, width

    def to_dict(self) -> dict[str, Any]:
        extra = (
            {} if self.norm_num_groups == NORM_GROUPS else {"norm_num_groups": self.norm_num_groups}
        )
        return {
            **extra,
            "in_channels": self.in_channels,
            "block_out_channels": list(self.block_out_channels),
            "downsample_factors": [
                f if isinstance(f, int) else list(f) for f in self.downsample_factors
            ],
            "attn_blocks": list(self.attn_blocks),
            "dropout": self.dropout,
        }


@dataclass(frozen=True)
class SyncNetConfig:
    """The model part of the reference SyncNet config (``syncnet_16_pixel_attn.yaml``), plus the
    input geometry it expects (not in the reference file; defaults: 16 frames of 256 px faces)."""

    audio_encoder: EncoderConfig
    visual_encoder: EncoderConfig
    num_frames: int = 16
    resolution: int = 256
    mel_window: int = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "mel_window", math.ceil(self.num_frames * 16 / 5))

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> SyncNetConfig:
        known = {"audio_encoder", "visual_encoder", "num_frames", "resolution"}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ConfigError(f"unknown SyncNet config keys: {', '.join(unknown)}")
        for key in ("audio_encoder", "visual_encoder"):
            if not isinstance(cfg.get(key), dict):
                raise ConfigError(f"SyncNet config lacks the {key!r} section")
        config = cls(
            audio_encoder=EncoderConfig.from_dict(cfg["audio_encoder"], "audio_encoder"),
            visual_encoder=EncoderConfig.from_dict(cfg["visual_encoder"], "visual_encoder"),
            num_frames=int(cfg.get("num_frames", 16)),
            resolution=int(cfg.get("resolution", 256)),
        )
        config.validate()
        return config

    def validate(self) -> None:
        a, v = self.audio_encoder, self.visual_encoder
        if a.block_out_channels[-1] != v.block_out_channels[-1]:
            raise ConfigError(
                "SyncNet audio and visual encoders must end with the same channel count "
                f"(got {a.block_out_channels[-1]} and {v.block_out_channels[-1]})"
            )
        if v.in_channels != 3 * self.num_frames:
            raise ConfigError(
                f"SyncNet visual_encoder.in_channels {v.in_channels} != 3 × num_frames "
                f"{self.num_frames}"
            )
        if self.resolution % 2:
            raise ConfigError(f"SyncNet resolution must be even, got {self.resolution}")
        for name, enc, size in (
            ("audio", a, (80, self.mel_window)),
            ("visual", v, self.image_size),
        ):
            out = enc.output_size(*size)
            if out != (1, 1):
                raise ConfigError(
                    f"SyncNet {name} encoder maps {size[0]}×{size[1]} inputs to {out[0]}×{out[1]}, "
                    "not 1×1: change downsample_factors (or num_frames / resolution)"
                )

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of the image input: the lower half of a resolution² crop."""
        return self.resolution // 2, self.resolution

    @property
    def embed_dim(self) -> int:
        return self.visual_encoder.block_out_channels[-1]

    def to_dict(self) -> dict[str, Any]:
        return {
            "audio_encoder": self.audio_encoder.to_dict(),
            "visual_encoder": self.visual_encoder.to_dict(),
            "num_frames": self.num_frames,
            "resolution": self.resolution,
        }


def _padding(sh: int, sw: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((top, bottom), (left, right)) zero padding before a strided 3×3 convolution."""
    if sh == 1:
        return (1, 1), (0, 1)
    if sw == 1:
        return (0, 1), (1, 1)
    return (0, 1), (0, 1)


class ResnetBlock(nn.Module):
    """GroupNorm → SiLU → conv → GroupNorm → SiLU → dropout → conv, plus the (1×1) skip, then
    the optional strided 3×3 downsampling convolution."""

    def __init__(
        self, in_channels: int, out_channels: int, factor: Factor, dropout: float, groups: int
    ):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=NORM_EPS, affine=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=NORM_EPS, affine=True)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.conv_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1)
            if in_channels != out_channels
            else None
        )
        sh, sw = _pair(factor)
        if (sh, sw) == (1, 1):
            self.downsample_conv = None
            self.pad = (0, 0, 0, 0)
        else:
            self.downsample_conv = nn.Conv2d(out_channels, out_channels, 3, stride=(sh, sw))
            (top, bottom), (left, right) = _padding(sh, sw)
            self.pad = (left, right, top, bottom)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (b, c_in, h, w) -> (b, c_out, h', w'), h' = h / stride_h (rounded as the conv does)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        h = h + (self.conv_shortcut(x) if self.conv_shortcut is not None else x)
        if self.downsample_conv is not None:
            h = self.downsample_conv(F.pad(h, self.pad))
        return h


class AttentionBlock(nn.Module):
    """GroupNorm → 1×1 conv in → pre-LayerNorm self-attention and GEGLU feed-forward over the
    h·w positions → 1×1 conv out, plus the input."""

    def __init__(self, channels: int, dropout: float, groups: int):
        super().__init__()
        # registered in the official file's key order
        self.norm1 = nn.GroupNorm(groups, channels, eps=NORM_EPS, affine=True)
        self.norm2 = nn.LayerNorm(channels)
        self.norm3 = nn.LayerNorm(channels)
        self.ff = FeedForward(channels, dropout=dropout)
        self.conv_in = nn.Conv2d(channels, channels, kernel_size=1)
        self.conv_out = nn.Conv2d(channels, channels, kernel_size=1)
        self.attn = Attention(
            channels, ATTENTION_HEADS, channels // ATTENTION_HEADS, qkv_bias=True, dropout=dropout
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (b, c, h, w) -> (b, c, h, w)
        b, c, height, width = x.shape
        h = self.conv_in(self.norm1(x)).flatten(2).transpose(1, 2)  # (b, h*w, c)
        h = h + self.attn(self.norm2(h))
        h = h + self.ff(self.norm3(h))
        h = h.transpose(1, 2).reshape(b, c, height, width)
        return x + self.conv_out(h)


class DownEncoder(nn.Module):
    """conv_in → residual (+ attention) blocks → GroupNorm → ReLU: (b, c_in, h, w) -> (b, C)."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        ch = config.block_out_channels
        self.conv_in = nn.Conv2d(config.in_channels, ch[0], kernel_size=3, padding=1)
        self.down_blocks = nn.ModuleList()
        prev = ch[0]
        for out, factor, attn in zip(
            ch, config.downsample_factors, config.attn_blocks, strict=True
        ):
            groups = config.norm_num_groups
            self.down_blocks.append(ResnetBlock(prev, out, factor, config.dropout, groups))
            if attn:
                self.down_blocks.append(AttentionBlock(out, config.dropout, groups))
            prev = out
        self.norm_out = nn.GroupNorm(config.norm_num_groups, ch[-1], eps=NORM_EPS, affine=True)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (b, c_in, h, w) -> (b, C) (the final map must be 1×1)
        h = self.conv_in(x)
        for block in self.down_blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(block, h, use_reentrant=False)
            else:
                h = block(h)
        h = F.relu(self.norm_out(h))
        if h.shape[-2:] != (1, 1):
            raise ValueError(
                f"encoder output is {h.shape[-2]}×{h.shape[-1]}, not 1×1: input of the wrong size "
                f"{tuple(x.shape[-2:])} for this config"
            )
        return h.flatten(1)


class StableSyncNet(nn.Module):
    """The SyncNet. Build with ``StableSyncNet.from_config(dict)``."""

    def __init__(self, config: SyncNetConfig):
        super().__init__()
        self.config = config
        self.audio_encoder = DownEncoder(config.audio_encoder)
        self.visual_encoder = DownEncoder(config.visual_encoder)

    @classmethod
    def from_config(cls, config: dict[str, Any] | SyncNetConfig) -> StableSyncNet:
        if not isinstance(config, SyncNetConfig):
            config = SyncNetConfig.from_dict(dict(config))
        return cls(config)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in the backward pass (less memory, ~30% slower)."""
        self.audio_encoder.gradient_checkpointing = enabled
        self.visual_encoder.gradient_checkpointing = enabled

    def _check(self, x: torch.Tensor, channels: int, size: tuple[int, int], name: str) -> None:
        expected = (channels, *size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"SyncNet {name} must be (b, {', '.join(map(str, expected))}), got {tuple(x.shape)}"
            )

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """(b, 3·F, R/2, R) lower-half face crops in [-1, 1] -> (b, C) unit vectors."""
        cfg = self.config
        self._check(image, cfg.visual_encoder.in_channels, cfg.image_size, "image")
        return F.normalize(self.visual_encoder(image), p=2, dim=1)

    def encode_audio(self, audio: torch.Tensor) -> torch.Tensor:
        """(b, 1, 80, 52) mel windows -> (b, C) unit vectors."""
        cfg = self.config
        self._check(audio, cfg.audio_encoder.in_channels, (80, cfg.mel_window), "audio")
        return F.normalize(self.audio_encoder(audio), p=2, dim=1)

    def forward(
        self, image: torch.Tensor, audio: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # image: (b, 3·F, R/2, R) in [-1, 1]; audio: (b, 1, 80, ceil(F·16/5))
        # -> vision_embeds (b, C), audio_embeds (b, C), L2-normalised
        return self.encode_image(image), self.encode_audio(audio)


def cosine_similarity(vision_embeds: torch.Tensor, audio_embeds: torch.Tensor) -> torch.Tensor:
    """(b, C), (b, C) -> (b,) cosine similarity in float32 (in [0, 1] for ReLU embeddings)."""
    return F.cosine_similarity(vision_embeds.float(), audio_embeds.float(), dim=1)


def cosine_loss(
    vision_embeds: torch.Tensor, audio_embeds: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """Per-sample binary cross-entropy of the cosine similarity against ``y`` (1 = in sync).

    vision_embeds, audio_embeds: (b, C); y: (b,) or (b, 1) -> (b,) float32. The cosine is clamped
    to [0, 1] (it is already there up to rounding); log terms are floored at -100 like
    ``nn.BCELoss``.
    """
    with torch.autocast(vision_embeds.device.type, enabled=False):  # BCE is fp32-only
        sims = cosine_similarity(vision_embeds, audio_embeds).clamp(0.0, 1.0)
        return F.binary_cross_entropy(sims, y.reshape(-1).float(), reduction="none")
