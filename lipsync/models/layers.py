"""Building blocks of the LatentSync 3D U-Net, in plain torch.

Tensor layout: video tensors are (b, c, f, h, w) like the reference. 2D convolutions are applied
per frame ("inflated"); the ResNet group norms see all frames of a clip at once (the reference uses
``nn.GroupNorm`` on the 5D tensor, so its statistics span frames), the transformer norms see one
frame at a time.

Parameter names match the official checkpoints (``conv1``, ``time_emb_proj``, ``to_q``,
``ff.net.0.proj``…).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def frames_to_batch(x: torch.Tensor) -> torch.Tensor:
    """(b, c, f, h, w) -> (b*f, c, h, w), frame-major within each clip."""
    b, c, f, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)


def batch_to_frames(x: torch.Tensor, frames: int) -> torch.Tensor:
    """(b*f, c, h, w) -> (b, c, f, h, w)."""
    bf, c, h, w = x.shape
    return x.reshape(bf // frames, frames, c, h, w).permute(0, 2, 1, 3, 4)


class InflatedConv3d(nn.Conv2d):
    """A 2D convolution applied to every frame of a (b, c, f, h, w) video."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (b, c_in, f, h, w) -> (b, c_out, f, h', w')
        frames = x.shape[2]
        return batch_to_frames(super().forward(frames_to_batch(x)), frames)


def timestep_embedding(timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float):
    """Sinusoidal embedding of diffusion timesteps, as in DDPM / diffusers' ``Timesteps``.

    timesteps: (b,) -> (b, dim) float32.
    """
    half = dim // 2
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    args = timesteps.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """Two-layer MLP on the sinusoidal timestep embedding (``time_embedding.linear_1/2``)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (b, in_dim) -> (b, out_dim)
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock3D(nn.Module):
    """GroupNorm → SiLU → conv → (+ time embedding) → GroupNorm → SiLU → conv, plus the skip."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        groups: int,
        eps: float,
        output_scale_factor: float = 1.0,
    ):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps, affine=True)
        self.conv1 = InflatedConv3d(in_channels, out_channels, kernel_size=3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps, affine=True)
        self.conv2 = InflatedConv3d(out_channels, out_channels, kernel_size=3, padding=1)
        self.conv_shortcut = (
            InflatedConv3d(in_channels, out_channels, kernel_size=1)
            if in_channels != out_channels
            else None
        )
        self.output_scale_factor = output_scale_factor

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        # x: (b, c_in, f, h, w), temb: (b, temb_channels) -> (b, c_out, f, h, w)
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        out = skip + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Downsample3D(nn.Module):
    """Stride-2 3×3 convolution per frame (``downsamplers.0.conv``)."""

    def __init__(self, channels: int, padding: int = 1):
        super().__init__()
        self.conv = InflatedConv3d(channels, channels, kernel_size=3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (b, c, f, h, w) -> (b, c, f, h/2, w/2)
        return self.conv(x)


class Upsample3D(nn.Module):
    """Nearest-neighbour ×2 in h and w, then a 3×3 convolution per frame (``upsamplers.0.conv``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = InflatedConv3d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        # x: (b, c, f, h, w) -> (b, c, f, 2h, 2w) (or the given (h', w'))
        frames = x.shape[2]
        dtype = x.dtype
        y = frames_to_batch(x)
        if dtype == torch.bfloat16:  # nearest upsampling has no bf16 kernel on some backends
            y = y.float()
        if size is None:
            y = F.interpolate(y, scale_factor=2.0, mode="nearest")
        else:
            y = F.interpolate(y, size=size, mode="nearest")
        return self.conv(batch_to_frames(y.to(dtype), frames))


class Attention(nn.Module):
    """Multi-head attention with the checkpoint's ``to_q/to_k/to_v/to_out.0`` names.

    Self-attention when ``context`` is None, otherwise cross-attention on ``context``.
    ``qkv_bias``: the q/k/v projections have biases (SyncNet's attention; the U-Net's have none).
    ``dropout`` applies to the output (``to_out.1``), as in diffusers.
    """

    def __init__(
        self,
        query_dim: int,
        heads: int,
        dim_head: int,
        context_dim: int | None = None,
        qkv_bias: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim if context_dim is not None else query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim, inner, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim, inner, bias=qkv_bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim), nn.Dropout(dropout)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        # x: (n, L, query_dim); context: (n, S, context_dim) or None -> (n, L, query_dim)
        context = x if context is None else context
        n, length, _ = x.shape
        q = self.to_q(x).view(n, length, self.heads, -1).transpose(1, 2)
        k = self.to_k(context).view(n, context.shape[1], self.heads, -1).transpose(1, 2)
        v = self.to_v(context).view(n, context.shape[1], self.heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # (n, heads, L, dim_head)
        out = out.transpose(1, 2).reshape(n, length, -1)
        return self.to_out[1](self.to_out[0](out))


class GEGLU(nn.Module):
    """Linear to 2×inner, then value × GELU(gate) (``ff.net.0.proj``)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., dim) -> (..., inner)
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward with 4× expansion (``ff.net.0`` GEGLU, ``ff.net.1`` dropout,
    ``ff.net.2`` output linear)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner = dim * mult
        self.net = nn.ModuleList([GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., dim) -> (..., dim)
        return self.net[2](self.net[1](self.net[0](x)))
