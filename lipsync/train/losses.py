"""The U-Net's training losses and the diffusion arithmetic they need.

loss = λ_recon · MSE(predicted noise, noise)
     + λ_sync  · SyncNet loss of the one-step prediction, decoded, lower half of the face
     + λ_lpips · LPIPS-VGG between decoded prediction and target, lower half
     + λ_trepa · TREPA: distance of VideoMAE v2 features of the decoded prediction and the target

as in LatentSync's ``scripts/train_unet.py``. The one-step prediction is the DDIM ``x0`` estimate
``(x_t − sqrt(1 − ᾱ_t) ε̂) / sqrt(ᾱ_t)`` (no clipping: the scheduler has ``clip_sample: false``).

LPIPS and TREPA are small pure-torch re-implementations that load the published weights from a
path (``lpips`` package layout for LPIPS-VGG v0.1; VideoMAE v2's ``vit_g_hybrid_pt_1200e_ssv2_ft
.pth`` for TREPA), strictly: a wrong or partial file is a CheckpointError, never a silent skip.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from lipsync.checkpoints import check_state_dict, read_checkpoint
from lipsync.errors import CheckpointError, ConfigError
from lipsync.models.syncnet import cosine_loss

# --------------------------------------------------------------------------- diffusion


def add_noise(
    alphas_cumprod: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """Forward diffusion q(x_t | x_0): x0, noise (b, c, f, h, w); t (b,) int -> x_t."""
    a = alphas_cumprod.to(x0.device)[t].to(x0.dtype).view(-1, 1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def predict_x0(
    alphas_cumprod: torch.Tensor, x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """One-step estimate of the clean latents from the predicted noise (DDIM eq. 12):
    x_t, eps (b, c, f, h, w); t (b,) -> x0 (b, c, f, h, w)."""
    a = alphas_cumprod.to(x_t.device)[t].to(eps.dtype).view(-1, 1, 1, 1, 1)
    return (x_t - (1 - a).sqrt() * eps) / a.sqrt()


def training_noise(
    shape: tuple[int, ...],
    generators: list[torch.Generator],
    device: torch.device,
    mixed: bool,
    alpha: float,
) -> torch.Tensor:
    """Noise for a batch of windows, one generator per window (so a window's noise does not
    depend on its batch-mates or on how the batch is split across processes).

    shape (b, c, f, h, w). ``mixed``: shared·sqrt(α²/(1+α²)) + independent·sqrt(1/(1+α²)), the
    shared part one draw repeated over the frames (the reference's mixed noise, arXiv 2305.10474);
    else one draw repeated over all frames (arXiv 2308.09716), which is also how inference starts.
    """
    b, c, f, h, w = shape
    if len(generators) != b:
        raise ValueError(f"{len(generators)} generators for {b} windows")
    out = []
    for g in generators:
        shared = torch.randn((c, 1, h, w), generator=g, device=device).expand(c, f, h, w)
        if not mixed:
            out.append(shared)
            continue
        independent = torch.randn((c, f, h, w), generator=g, device=device)
        out.append(
            shared * math.sqrt(alpha**2 / (1 + alpha**2))
            + independent * math.sqrt(1 / (1 + alpha**2))
        )
    return torch.stack(out)


# --------------------------------------------------------------------------- SyncNet loss


class SyncNetLike(Protocol):
    """What the sync loss needs from a SyncNet (LatentSync's ``StableSyncNet`` interface).

    image (B, 3·F, R/2, R): the lower half of F face crops, frame-major RGB in [-1, 1];
    mel (B, 1, 80, 52): the SyncNet mel window of the same F frames
    -> (vision (B, D), audio (B, D)) embeddings, L2-normalised, non-negative.
    """

    def __call__(self, image: torch.Tensor, mel: torch.Tensor) -> tuple[torch.Tensor, ...]: ...


def syncnet_input(
    frames: torch.Tensor, lower_half: bool = True, resolution: int | None = None
) -> torch.Tensor:
    """(b, f, 3, R, R) faces -> (b, 3·f, S/2, S) (lower half) or (b, 3·f, S, S), where S is
    ``resolution`` (the SyncNet's input size; the faces are resized bicubically to it when it
    differs from R, as the reference does for its 512 px stage 2 with the 256 px SyncNet) or R."""
    b, f, c, h, w = frames.shape
    x = frames.reshape(b, f * c, h, w)
    if resolution is not None and (h, w) != (resolution, resolution):
        x = F.interpolate(
            frames.reshape(b * f, c, h, w), size=(resolution, resolution), mode="bicubic",
            align_corners=False,
        ).reshape(b, f * c, resolution, resolution)  # fmt: skip
        h = resolution
    return x[:, :, h // 2 :, :] if lower_half else x


def syncnet_resolution(syncnet: Any) -> int | None:
    """The face size a SyncNet takes (``StableSyncNet.config.resolution``), None if it does not
    say (then the decoded faces go in at the training resolution)."""
    return getattr(getattr(syncnet, "config", None), "resolution", None)


def sync_loss(vision: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
    """The reference's ``cosine_loss`` against label 1 (BCE of the cosine similarity), per
    window: vision, audio (B, D) -> (B,)."""
    ones = torch.ones(vision.shape[0], device=vision.device)
    return cosine_loss(vision, audio, ones)


# --------------------------------------------------------------------------- LPIPS (VGG, v0.1)

# torchvision vgg16.features, cut at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (lpips' slices;
# the layer indices inside each slice are torchvision's, as the lpips package keeps them).
_VGG_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))
_VGG_CONVS = {0: (3, 64), 2: (64, 64), 5: (64, 128), 7: (128, 128), 10: (128, 256),
              12: (256, 256), 14: (256, 256), 17: (256, 512), 19: (512, 512), 21: (512, 512),
              24: (512, 512), 26: (512, 512), 28: (512, 512)}  # fmt: skip
_VGG_POOLS = (4, 9, 16, 23)
_LPIPS_CHANNELS = (64, 128, 256, 512, 512)


class _LinLayer(nn.Module):
    """lpips' ``NetLinLayer``: dropout (inactive in eval) then a 1x1 conv to one channel."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))


class _VggSlices(nn.Module):
    def __init__(self):
        super().__init__()
        for k, (start, stop) in enumerate(_VGG_SLICES, start=1):
            layers = nn.Sequential()
            for i in range(start, stop):
                if i in _VGG_CONVS:
                    layer = nn.Conv2d(*_VGG_CONVS[i], kernel_size=3, padding=1)
                elif i in _VGG_POOLS:
                    layer = nn.MaxPool2d(kernel_size=2, stride=2)
                else:
                    layer = nn.ReLU(inplace=False)
                layers.add_module(str(i), layer)
            self.add_module(f"slice{k}", layers)


class LpipsVgg(nn.Module):
    """LPIPS v0.1 with the VGG16 backbone, state-dict compatible with ``lpips.LPIPS(net="vgg")``.

    Build with :meth:`from_file`; inputs in [-1, 1]. forward(a, b): (N, 3, H, W) -> (N,) distance.
    """

    def __init__(self):
        super().__init__()
        self.scaling_layer = nn.Module()
        self.scaling_layer.register_buffer(
            "shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
        )
        self.scaling_layer.register_buffer(
            "scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
        )
        self.net = _VggSlices()
        for k, ch in enumerate(_LPIPS_CHANNELS):
            self.add_module(f"lin{k}", _LinLayer(ch))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> LpipsVgg:
        """Strictly load an LPIPS-VGG state dict (e.g. ``torch.save(lpips.LPIPS(net="vgg")
        .state_dict(), path)``: backbone and linear layers in one file)."""
        state = _tensors(read_checkpoint(path), path)
        model = cls()
        expected = {k: v.shape for k, v in model.state_dict().items()}
        # the scaling constants are fixed; older files do not store them
        for key in ("scaling_layer.shift", "scaling_layer.scale"):
            state.setdefault(key, model.state_dict()[key])
        check_state_dict(expected, state, "LPIPS-VGG network", path)
        model.load_state_dict(state, strict=True)
        return model.eval().requires_grad_(False)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # a, b: (N, 3, H, W) in [-1, 1] -> (N,)
        shift, scale = self.scaling_layer.shift, self.scaling_layer.scale
        xa, xb = (a - shift) / scale, (b - shift) / scale
        total = 0.0
        for k in range(len(_LPIPS_CHANNELS)):
            layers = getattr(self.net, f"slice{k + 1}")
            xa, xb = layers(xa), layers(xb)
            na = xa / (xa.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            nb = xb / (xb.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            lin = getattr(self, f"lin{k}").model[1]
            total = total + lin((na - nb).pow(2)).mean(dim=(2, 3))
        return total.reshape(-1)


# --------------------------------------------------------------------------- TREPA (VideoMAE v2)


@dataclass(frozen=True)
class VideoMaeDims:
    """VideoMAE v2 ViT dimensions; ``vit-g`` is ``vit_giant_patch14_224`` (the TREPA model)."""

    embed_dim: int = 1408
    depth: int = 40
    num_heads: int = 16
    mlp_hidden: int = 6144  # embed_dim * 48 / 11
    patch_size: int = 14
    tubelet_size: int = 2
    image_size: int = 224
    num_frames: int = 16
    num_classes: int = 174  # the SSv2 head stored in the checkpoint (unused by the loss)

    @classmethod
    def named(cls, spec: str | Mapping[str, Any]) -> VideoMaeDims:
        if isinstance(spec, Mapping):
            try:
                return cls(**dict(spec))
            except TypeError as e:
                raise ConfigError(f"invalid VideoMAE dimensions {dict(spec)}: {e}") from None
        if spec == "vit-g":
            return cls()
        raise ConfigError(f"unknown VideoMAE model {spec!r}; use 'vit-g' or a dict of dimensions")


class _VitAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, N, C) -> (B, N, C)
        b, n, c = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class _VitMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _VitBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _VitAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _VitMlp(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _sinusoid_table(n: int, dim: int) -> torch.Tensor:
    """VideoMAE's fixed position table: angle p / 10000^(2(j//2)/dim), sin even, cos odd."""
    pos = torch.arange(n, dtype=torch.float64)[:, None]
    j = torch.arange(dim, dtype=torch.float64)[None, :]
    angle = pos / torch.pow(10000.0, 2 * torch.div(j, 2, rounding_mode="floor") / dim)
    table = torch.where(j.long() % 2 == 0, torch.sin(angle), torch.cos(angle))
    return table.float()[None]


class VideoMaeEncoder(nn.Module):
    """VideoMAE v2 fine-tuned ViT (mean pooling), key names of the official checkpoints."""

    def __init__(self, dims: VideoMaeDims, checkpointing: bool = False):
        super().__init__()
        self.dims = dims
        self.checkpointing = checkpointing
        d = dims.embed_dim
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv3d(
            3,
            d,
            kernel_size=(dims.tubelet_size, dims.patch_size, dims.patch_size),
            stride=(dims.tubelet_size, dims.patch_size, dims.patch_size),
        )
        n = (dims.num_frames // dims.tubelet_size) * (dims.image_size // dims.patch_size) ** 2
        self.register_buffer("pos_embed", _sinusoid_table(n, d), persistent=False)
        self.blocks = nn.ModuleList(
            _VitBlock(d, dims.num_heads, dims.mlp_hidden) for _ in range(dims.depth)
        )
        self.fc_norm = nn.LayerNorm(d, eps=1e-6)
        self.head = nn.Linear(d, dims.num_classes)

    def forward_tokens(self, video: torch.Tensor) -> torch.Tensor:
        # video: (B, 3, F, S, S) in [0, 1], S = image_size -> (B, N, embed_dim) tokens after the
        # last block, N = (F / tubelet) · (S / patch)², time-major (then rows, then columns)
        x = self.patch_embed.proj(video).flatten(2).transpose(1, 2)  # (B, N, C)
        x = x + self.pos_embed.to(x.dtype)
        for block in self.blocks:
            if self.checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def forward_features(self, video: torch.Tensor) -> torch.Tensor:
        # video: (B, 3, F, S, S) in [0, 1], S = image_size -> (B, embed_dim)
        return self.fc_norm(self.forward_tokens(video).mean(dim=1))


class TrepaLoss(nn.Module):
    """Temporal representation alignment (LatentSync): MSE between the L2-normalised VideoMAE v2
    features of the generated and the target clip, both resized to the model's 224 px."""

    def __init__(self, encoder: VideoMaeEncoder):
        super().__init__()
        self.encoder = encoder

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike,
        dims: str | Mapping[str, Any] = "vit-g",
        checkpointing: bool = True,
    ) -> TrepaLoss:
        """Strictly load a VideoMAE v2 checkpoint (``{"model"|"module": state}`` or bare)."""
        raw = read_checkpoint(path)
        inner = raw
        for key in ("model", "module"):
            if isinstance(raw.get(key), Mapping):
                inner = raw[key]
                break
        state = _tensors(inner, path)
        encoder = VideoMaeEncoder(VideoMaeDims.named(dims), checkpointing)
        expected = {k: v.shape for k, v in encoder.state_dict().items()}
        check_state_dict(expected, state, "VideoMAE v2 encoder (TREPA)", path)
        encoder.load_state_dict(state, strict=True)
        return cls(encoder.eval().requires_grad_(False))

    def forward(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        # fake, real: (b, c, f, h, w) in [-1, 1] -> scalar
        size = self.encoder.dims.image_size
        feats = []
        for video in (fake, real):
            b, c, f, h, w = video.shape
            frames = video.transpose(1, 2).reshape(b * f, c, h, w)
            frames = F.interpolate(frames, size=(size, size), mode="bicubic", align_corners=False)
            clip = frames.reshape(b, f, c, size, size).transpose(1, 2)
            clip = (clip / 2 + 0.5).clamp(0, 1)
            feats.append(F.normalize(self.encoder.forward_features(clip), p=2, dim=1))
        return F.mse_loss(feats[0], feats[1])


def _tensors(state: Mapping[str, Any], path) -> dict[str, torch.Tensor]:
    out = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not out:
        raise CheckpointError(f"{path} contains no tensors")
    return out


# --------------------------------------------------------------------------- the sum


class QualityTerms(Protocol):
    """Extra terms on the decoded frames (:class:`lipsync.train.quality.QualityLosses`):
    (pixels, gt_pixels, phones, alpha_t) -> (weighted sum, parts)."""

    def __call__(
        self,
        pixels: torch.Tensor,
        gt_pixels: torch.Tensor | None,
        phones: torch.Tensor | None,
        alpha_t: torch.Tensor,
    ) -> tuple[Any, dict]: ...


@dataclass
class LossWeights:
    recon: float = 1.0
    sync: float = 0.0
    lpips: float = 0.0
    trepa: float = 0.0


@dataclass
class LossModels:
    """The frozen models the pixel-space losses need (None where the weight is 0)."""

    decode: Callable[[torch.Tensor], torch.Tensor] | None = None  # (n, 4, h, w) -> (n, 3, R, R)
    syncnet: SyncNetLike | None = None
    lpips: LpipsVgg | None = None
    trepa: TrepaLoss | None = None
    sync_lower_half: bool = True
    pixel_space: bool = True
    # the SyncNet's face size; None: its config's resolution (decoded faces are resized to it)
    sync_resolution: int | None = None


def total_loss(
    weights: LossWeights,
    models: LossModels,
    pred_noise: torch.Tensor,
    noise: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    gt_pixels: torch.Tensor | None,
    mel: torch.Tensor | None,
    *,
    quality: QualityTerms | None = None,
    phones: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weighted sum and its parts (detached, for logging), for one micro-batch.

    pred_noise, noise, x_t (b, 4, f, h, w); t (b,); gt_pixels (b, f, 3, R, R) in [-1, 1] (needed
    by LPIPS/TREPA); mel (b, 1, 80, 52) (needed by the sync loss). ``quality``: the enabled
    quality terms (:class:`lipsync.train.quality.QualityLosses`), on the same decoded frames;
    ``phones`` (b, f) their phone labels.
    """
    parts: dict[str, torch.Tensor] = {}
    loss = torch.zeros((), device=pred_noise.device)
    if weights.recon:
        parts["mse"] = F.mse_loss(pred_noise.float(), noise.float())
        loss = loss + weights.recon * parts["mse"]
    need_pixels = bool(
        weights.lpips
        or weights.trepa
        or (weights.sync and models.pixel_space)
        or quality is not None
    )
    if weights.sync or need_pixels:
        b, c, f, h, w = x_t.shape
        x0 = predict_x0(alphas_cumprod, x_t.float(), pred_noise.float(), t)  # (b, 4, f, h, w)
        pixels = None
        if need_pixels:
            flat = x0.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
            pixels = models.decode(flat)  # (b*f, 3, R, R)
            pixels = pixels.reshape(b, f, *pixels.shape[1:]).float()
        if weights.sync:
            if models.pixel_space:  # at the SyncNet's resolution (512 px training: 256)
                size = models.sync_resolution or syncnet_resolution(models.syncnet)
                image = syncnet_input(pixels, models.sync_lower_half, size)
            else:  # latents, as the reference's pixel_space_supervise: false branch
                image = syncnet_input(x0.permute(0, 2, 1, 3, 4), models.sync_lower_half)
            vision, audio = models.syncnet(image.to(_dtype_of(models.syncnet)), mel)[:2]
            parts["sync"] = sync_loss(vision, audio).mean()
            loss = loss + weights.sync * parts["sync"]
        if weights.lpips:
            half = pixels.shape[-2] // 2
            pred = pixels[..., half:, :].reshape(-1, 3, pixels.shape[-2] - half, pixels.shape[-1])
            tgt = gt_pixels.float()[..., half:, :].reshape(pred.shape)
            parts["lpips"] = models.lpips(pred, tgt).mean()
            loss = loss + weights.lpips * parts["lpips"]
        if weights.trepa:
            parts["trepa"] = models.trepa(pixels.transpose(1, 2), gt_pixels.float().transpose(1, 2))
            loss = loss + weights.trepa * parts["trepa"]
        if quality is not None:
            alpha_t = alphas_cumprod.to(t.device)[t]
            extra, extra_parts = quality(pixels, gt_pixels, phones, alpha_t)
            loss = loss + extra
            parts.update(extra_parts)
    return loss, {k: v.detach() for k, v in parts.items()}


def _dtype_of(module: Any) -> torch.dtype:
    try:
        return next(module.parameters()).dtype
    except (AttributeError, StopIteration):
        return torch.float32
