"""The two transformers of the LatentSync U-Net.

- ``SpatialTransformer`` (checkpoint name ``attentions.N``): per frame, self-attention over the
  h×w positions, then cross-attention to that frame's 50 audio tokens, then a GEGLU feed-forward.
- ``MotionModule`` (checkpoint name ``motion_modules.N``): per spatial position, self-attention
  over the frames of a clip with a sinusoidal frame-position encoding (AnimateDiff's "Vanilla"
  temporal module).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from lipsync.constants import TEMPORAL_ATTENTION_KINDS, TemporalAttentionKind
from lipsync.errors import check_choice
from lipsync.models.dyncond import ConditioningGate, DynamicConditioningConfig
from lipsync.models.layers import Attention, FeedForward, batch_to_frames, frames_to_batch


class AudioContext(NamedTuple):
    """Audio tokens for the cross-attention, with the all-zero rows left out.

    ``null_rows`` leading rows of the (b*f) batch have all-zero audio (the unconditional half of
    classifier-free guidance). Their keys and values would be 0 (the projections have no bias),
    so attention returns 0 and the cross-attention output is exactly its output bias: we add the
    bias instead of computing it. ``tokens`` holds the remaining rows: (b*f - null_rows, 50, C).
    """

    tokens: torch.Tensor | None
    null_rows: int = 0


class SpatialTransformerBlock(nn.Module):
    """norm1 → self-attn, norm2 → audio cross-attn (optional), norm3 → feed-forward (residual).

    With ``gate`` (dynamic conditioning, :mod:`lipsync.models.dyncond`; needs the audio layer) the
    self-attention and cross-attention residuals are scaled by per-frame weights ``cond_gate``
    computes from the block's input and the frame's audio tokens.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        context_dim: int | None,
        gate: DynamicConditioningConfig | None = None,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, dim_head)
        if context_dim is not None:
            self.norm2 = nn.LayerNorm(dim)
            self.attn2 = Attention(dim, heads, dim_head, context_dim=context_dim)
        else:
            self.attn2 = None
        self.ff = FeedForward(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.cond_gate = (
            ConditioningGate(dim, context_dim, gate)
            if gate is not None and gate.enabled and context_dim is not None
            else None
        )

    def forward(self, x: torch.Tensor, context: AudioContext | None) -> torch.Tensor:
        # x: (b*f, h*w, dim); context.tokens: (b*f - null_rows, 50, context_dim)
        # -> (b*f, h*w, dim)
        if self.cond_gate is not None:
            return self._gated(x, context)
        x = x + self.attn1(self.norm1(x))
        if self.attn2 is not None and context is not None:
            n = context.null_rows
            if n == 0:
                x = x + self.attn2(self.norm2(x), context.tokens)
            else:
                out = torch.empty_like(x)
                out[:n] = x[:n] + self.attn2.to_out[0].bias
                if context.tokens is not None:
                    out[n:] = x[n:] + self.attn2(self.norm2(x[n:]), context.tokens)
                else:
                    out[n:] = x[n:]
                x = out
        return x + self.ff(self.norm3(x))

    def _gated(self, x: torch.Tensor, context: AudioContext | None) -> torch.Tensor:
        # as forward, with the residuals weighted: x (b*f, h*w, dim) -> (b*f, h*w, dim)
        tokens = context.tokens if context is not None else None
        n = context.null_rows if context is not None else 0
        w_audio, w_identity = self.cond_gate(x, tokens, n)
        x = x + w_identity * self.attn1(self.norm1(x))
        if self.attn2 is not None and context is not None:
            out = torch.empty_like(x)
            if n:
                out[:n] = x[:n] + w_audio[:n] * self.attn2.to_out[0].bias
            if tokens is not None:
                out[n:] = x[n:] + w_audio[n:] * self.attn2(self.norm2(x[n:]), tokens)
            else:
                out[n:] = x[n:]
            x = out
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm → 1×1 conv in → transformer block(s) → 1×1 conv out, plus the input (per frame)."""

    def __init__(
        self,
        channels: int,
        heads: int,
        groups: int,
        context_dim: int | None,
        num_layers: int = 1,
        gate: DynamicConditioningConfig | None = None,
    ):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6, affine=True)
        self.proj_in = nn.Conv2d(channels, channels, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            SpatialTransformerBlock(channels, heads, channels // heads, context_dim, gate)
            for _ in range(num_layers)
        )
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor, context: AudioContext | None) -> torch.Tensor:
        # x: (b, c, f, h, w); context: audio tokens for the b*f frames -> (b, c, f, h, w)
        b, c, frames, h, w = x.shape
        residual = frames_to_batch(x)  # (b*f, c, h, w)
        y = self.proj_in(self.norm(residual))
        y = y.permute(0, 2, 3, 1).reshape(b * frames, h * w, c)
        for block in self.transformer_blocks:
            y = block(y, context)
        y = y.reshape(b * frames, h, w, c).permute(0, 3, 1, 2)
        y = self.proj_out(y) + residual
        return batch_to_frames(y, frames)


def sinusoidal_positions(max_len: int, dim: int) -> torch.Tensor:
    """(1, max_len, dim) table: sin on even channels, cos on odd ones (Transformer-style)."""
    position = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(1, max_len, dim)
    pe[0, :, 0::2] = torch.sin(position * div_term)
    pe[0, :, 1::2] = torch.cos(position * div_term)
    return pe


class PositionalEncoding(nn.Module):
    """Adds a fixed sinusoidal frame-position table (``pos_encoder.pe``, stored in checkpoints)."""

    def __init__(self, dim: int, max_len: int):
        super().__init__()
        self.register_buffer("pe", sinusoidal_positions(max_len, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (n, f, dim) -> (n, f, dim)
        return x + self.pe[:, : x.shape[1]].to(x.dtype)


class TemporalAttention(Attention):
    """Self-attention across the frames of each spatial position (optional position encoding)."""

    def __init__(self, dim: int, heads: int, dim_head: int, position_encoding_max_len: int | None):
        super().__init__(dim, heads, dim_head)
        self.pos_encoder = (
            PositionalEncoding(dim, position_encoding_max_len)
            if position_encoding_max_len is not None
            else None
        )
        # Sequences here are only f <= 24 frames long but there are b*h*w*heads of them. Fused
        # attention kernels are built for long sequences and run this memory-bound job far
        # slower than its memory traffic (docs/PERFORMANCE.md, "Temporal attention"); plain
        # batched matmuls + softmax, fused by torch.compile, avoid that. True: use
        # scaled_dot_product_attention instead (same result up to rounding); see
        # :func:`set_temporal_attention`.
        self.use_sdpa = False

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        # x: (b*h*w, f, dim) -> (b*h*w, f, dim)
        if self.pos_encoder is not None:
            x = self.pos_encoder(x)
        if self.use_sdpa:
            return super().forward(x)
        n, f, _ = x.shape
        q = self.to_q(x).view(n, f, self.heads, -1).transpose(1, 2)  # (n, heads, f, d)
        k = self.to_k(x).view(n, f, self.heads, -1).transpose(1, 2)
        v = self.to_v(x).view(n, f, self.heads, -1).transpose(1, 2)
        scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)  # (n, heads, f, f)
        out = scores.softmax(dim=-1, dtype=torch.float32).to(v.dtype) @ v
        return self.to_out[0](out.transpose(1, 2).reshape(n, f, -1))


class TemporalTransformerBlock(nn.Module):
    """Pre-norm temporal self-attention blocks (``attention_blocks``/``norms``), then ``ff``."""

    def __init__(self, dim: int, heads: int, num_attention_blocks: int, pe_max_len: int | None):
        super().__init__()
        self.attention_blocks = nn.ModuleList(
            TemporalAttention(dim, heads, dim // heads, pe_max_len)
            for _ in range(num_attention_blocks)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(num_attention_blocks))
        self.ff = FeedForward(dim)
        self.ff_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (b*h*w, f, dim) -> (b*h*w, f, dim)
        for attention, norm in zip(self.attention_blocks, self.norms, strict=True):
            x = x + attention(norm(x))
        return x + self.ff(self.ff_norm(x))


class TemporalTransformer(nn.Module):
    """Per-frame GroupNorm → linear in → temporal blocks → linear out, plus the input."""

    def __init__(
        self,
        channels: int,
        heads: int,
        num_layers: int,
        num_attention_blocks: int,
        pe_max_len: int | None,
        groups: int = 32,
    ):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6, affine=True)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            TemporalTransformerBlock(channels, heads, num_attention_blocks, pe_max_len)
            for _ in range(num_layers)
        )
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (b, c, f, h, w) -> (b, c, f, h, w)
        b, c, frames, h, w = x.shape
        normed = self.norm(frames_to_batch(x))  # per-frame statistics: (b*f, c, h, w)
        # one sequence over the frames for every (clip, position): (b*h*w, f, c)
        y = normed.reshape(b, frames, c, h * w).permute(0, 3, 1, 2).reshape(b * h * w, frames, c)
        y = self.proj_in(y)
        for block in self.transformer_blocks:
            y = block(y)
        y = self.proj_out(y)
        y = y.reshape(b, h, w, frames, c).permute(0, 4, 3, 1, 2)  # (b, c, f, h, w)
        return x + y


class MotionModule(nn.Module):
    """AnimateDiff "Vanilla" temporal module: a wrapper named ``temporal_transformer``."""

    def __init__(
        self,
        channels: int,
        num_attention_heads: int = 8,
        num_transformer_block: int = 1,
        attention_block_types: tuple[str, ...] = ("Temporal_Self", "Temporal_Self"),
        temporal_position_encoding: bool = True,
        temporal_position_encoding_max_len: int = 24,
        temporal_attention_dim_div: int = 1,
        groups: int = 32,
    ):
        super().__init__()
        if any(kind != "Temporal_Self" for kind in attention_block_types):
            raise ValueError(f"unsupported motion attention blocks {attention_block_types}")
        if temporal_attention_dim_div != 1:
            raise ValueError("temporal_attention_dim_div other than 1 is not supported")
        self.temporal_transformer = TemporalTransformer(
            channels,
            num_attention_heads,
            num_transformer_block,
            len(attention_block_types),
            temporal_position_encoding_max_len if temporal_position_encoding else None,
            groups,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (b, c, f, h, w) -> (b, c, f, h, w)
        return self.temporal_transformer(x)


def set_temporal_attention(model: nn.Module, kind: TemporalAttentionKind) -> None:
    """How every :class:`TemporalAttention` of ``model`` computes: ``"matmul"`` (the default:
    batched matmuls + softmax) or ``"sdpa"`` (``scaled_dot_product_attention``)."""
    check_choice("temporal attention", kind, TEMPORAL_ATTENTION_KINDS)
    for module in model.modules():
        if isinstance(module, TemporalAttention):
            module.use_sdpa = kind == "sdpa"
