"""A small pure-torch Whisper audio encoder (the part of OpenAI Whisper that LatentSync uses).

Only the encoder is implemented: conv stem, sinusoidal positional embedding (stored in the
checkpoint as ``encoder.positional_embedding``) and pre-norm residual attention blocks. Parameter
names follow OpenAI's ``model.py`` so the official ``tiny.pt`` loads key for key (minus the
``encoder.`` prefix); the text decoder is not needed for lip sync and is never built.

LatentSync conditions its U-Net on the *input embedding and every residual block output* (not
on the final ``ln_post`` output); :meth:`WhisperEncoder.forward_layers` returns exactly those.
Loading an official file: :func:`lipsync.checkpoints.read_whisper_checkpoint`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lipsync.errors import CheckpointError


@dataclass(frozen=True)
class WhisperDims:
    """Model dimensions, as stored under ``"dims"`` in an OpenAI Whisper checkpoint.

    Only the ``n_audio_*`` / ``n_mels`` fields matter for the encoder; the text fields are kept
    (optional) so the ``dims`` dict of an official checkpoint maps onto this class as is.
    """

    n_mels: int = 80
    n_audio_ctx: int = 1500
    n_audio_state: int = 384
    n_audio_head: int = 6
    n_audio_layer: int = 4
    n_vocab: int | None = None
    n_text_ctx: int | None = None
    n_text_state: int | None = None
    n_text_head: int | None = None
    n_text_layer: int | None = None

    @classmethod
    def from_dict(cls, dims: Mapping[str, object]) -> WhisperDims:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(dims) - known)
        if unknown:
            raise CheckpointError(f"unknown Whisper dims field(s): {', '.join(unknown)}")
        try:
            return cls(**{k: None if v is None else int(v) for k, v in dims.items()})
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"invalid Whisper dims {dict(dims)!r}: {exc}") from None


class LayerNorm(nn.LayerNorm):
    """LayerNorm that always normalises in float32 (as Whisper does) and returns the input dtype."""

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(
            x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps
        ).to(x.dtype)


class MultiHeadAttention(nn.Module):
    """Self-attention; ``key`` has no bias, as in Whisper."""

    def __init__(self, n_state: int, n_head: int) -> None:
        super().__init__()
        if n_state % n_head:
            raise ValueError(f"n_state {n_state} is not divisible by n_head {n_head}")
        self.n_head = n_head
        self.query = nn.Linear(n_state, n_state)
        self.key = nn.Linear(n_state, n_state, bias=False)
        self.value = nn.Linear(n_state, n_state)
        self.out = nn.Linear(n_state, n_state)

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, T, C) -> (B, T, C)
        b, t, c = x.shape
        h = self.n_head

        def heads(y: Tensor) -> Tensor:  # (B, T, C) -> (B, H, T, C/H)
            return y.view(b, t, h, c // h).transpose(1, 2)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        # Whisper scales q and k by d**-0.25 each, i.e. logits by 1/sqrt(d) overall.
        wv = F.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(c // h))
        return self.out(wv.transpose(1, 2).reshape(b, t, c))


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``."""

    def __init__(self, n_state: int, n_head: int) -> None:
        super().__init__()
        self.attn = MultiHeadAttention(n_state, n_head)
        self.attn_ln = LayerNorm(n_state)
        n_mlp = 4 * n_state
        # indices 0 and 2 give the checkpoint names mlp.0.* / mlp.2.*
        self.mlp = nn.Sequential(nn.Linear(n_state, n_mlp), nn.GELU(), nn.Linear(n_mlp, n_state))
        self.mlp_ln = LayerNorm(n_state)

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, T, C) -> (B, T, C)
        x = x + self.attn(self.attn_ln(x))
        return x + self.mlp(self.mlp_ln(x))


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> Tensor:
    """Whisper's sinusoidal positional embedding, (length, channels).

    Used only to initialise the buffer; the checkpoint's stored copy overrides it on load.
    """
    if channels % 2:
        raise ValueError("channels must be even")
    log_inc = math.log(max_timescale) / (channels // 2 - 1)
    inv = torch.exp(-log_inc * torch.arange(channels // 2, dtype=torch.float32))
    t = torch.arange(length, dtype=torch.float32)[:, None] * inv[None, :]
    return torch.cat([torch.sin(t), torch.cos(t)], dim=1)


class WhisperEncoder(nn.Module):
    """Whisper's ``AudioEncoder``: log-mel (B, n_mels, 2*n_ctx) -> (B, n_ctx, n_state).

    The input length is fixed: 3000 mel frames (30 s) for the official models, because the
    positional embedding has exactly ``n_audio_ctx`` rows.
    """

    def __init__(self, dims: WhisperDims) -> None:
        super().__init__()
        self.dims = dims
        c = dims.n_audio_state
        self.conv1 = nn.Conv1d(dims.n_mels, c, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(c, c, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", sinusoids(dims.n_audio_ctx, c))
        self.blocks = nn.ModuleList(
            [ResidualAttentionBlock(c, dims.n_audio_head) for _ in range(dims.n_audio_layer)]
        )
        self.ln_post = LayerNorm(c)

    @property
    def n_frames(self) -> int:
        """Mel frames per encoder window (3000 for the official models)."""
        return 2 * self.dims.n_audio_ctx

    def embed(self, mel: Tensor) -> Tensor:
        # mel: (B, n_mels, 2*n_ctx) -> (B, n_ctx, C)
        if mel.shape[1:] != (self.dims.n_mels, self.n_frames):
            raise ValueError(
                f"expected mel of shape (B, {self.dims.n_mels}, {self.n_frames}), "
                f"got {tuple(mel.shape)}"
            )
        x = F.gelu(self.conv1(mel))
        x = F.gelu(self.conv2(x))
        return x.transpose(1, 2) + self.positional_embedding.to(x.dtype)

    def forward_layers(self, mel: Tensor) -> Tensor:
        """Input embedding plus every block output, stacked: (B, n_layer+1, n_ctx, C)."""
        # mel: (B, n_mels, 2*n_ctx) -> (B, n_layer+1, n_ctx, C)
        x = self.embed(mel)
        outs = [x]
        for block in self.blocks:
            x = block(x)
            outs.append(x)
        return torch.stack(outs, dim=1)

    def forward(self, mel: Tensor) -> Tensor:
        # mel: (B, n_mels, 2*n_ctx) -> (B, n_ctx, C), the usual Whisper encoder output
        x = self.embed(mel)
        for block in self.blocks:
            x = block(x)
        return self.ln_post(x)


def random_whisper_encoder(seed: int = 0, dims: WhisperDims | None = None) -> WhisperEncoder:
    """A Whisper-tiny-shaped encoder (fp32, CPU) with weights drawn from ``seed`` (smoke tests
    and the ``tiny`` preset). The global random state is left as it was."""
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        return WhisperEncoder(dims or WhisperDims())
    finally:
        torch.random.set_rng_state(state)
