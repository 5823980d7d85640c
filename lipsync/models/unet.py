"""LatentSync's 3D U-Net (AnimateDiff-style), state-dict compatible with the official checkpoints.

Inputs per call:
  sample                 (b, 13, f, h, w)  4 noisy + 1 mask + 4 masked-face + 4 reference latents
  timestep               scalar or (b,)    DDPM timestep (0..999)
  encoder_hidden_states  (b*f, 50, 384)    per-frame audio tokens (or (b, f, 50, 384))
  cache                  StepCache or None: DeepCache-style reuse of deep features (below)
Output: predicted noise (b, 4, f, h, w).

Step-feature caching (DeepCache, Ma et al. 2023; the reference LatentSync enables it with
``DeepCacheSDHelper`` at ``cache_interval=3, cache_branch_id=0``). Adjacent denoising steps change
the deep, low-resolution features little. Skip branch ``k`` cuts the U-Net at down block
``B = k // per`` after ``L = k % per`` of its layers, ``per = layers_per_block + 1`` (the layers of
an up block; 3 in every LatentSync config, as in SD). A full call with a :class:`StepCache` stores
the hidden state entering layer ``per - 1 - L`` of up block ``n - 1 - B``; a cached call runs only
``conv_in``, down blocks ``< B`` and the first ``L`` layers of block ``B``, then the up layers from
the cut on, fed the cached state and the fresh skips, then ``conv_out``. For branch 0 that is
``conv_in`` → last layer of the last up block (the cached state, (b, c0, f, h, w) with
c0 = block_out_channels[0], concatenated with the ``conv_in`` skip) → ``conv_out``.

The module tree mirrors the reference so ``load_state_dict(strict=True)`` works on the official
files: ``conv_in``, ``time_embedding``, ``down_blocks.i.{resnets,attentions,motion_modules,
downsamplers}``, ``mid_block``, ``up_blocks.i.{…,upsamplers}``, ``conv_norm_out``, ``conv_out``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lipsync.errors import ConfigError
from lipsync.models.dyncond import DynamicConditioningConfig
from lipsync.models.layers import (
    Downsample3D,
    InflatedConv3d,
    ResnetBlock3D,
    TimestepEmbedding,
    Upsample3D,
    timestep_embedding,
)
from lipsync.models.transformer import AudioContext, MotionModule, SpatialTransformer

DOWN_BLOCKS = ("CrossAttnDownBlock3D", "DownBlock3D")
UP_BLOCKS = ("CrossAttnUpBlock3D", "UpBlock3D")

# Keys of the reference config that do not change the network we build (or only its defaults).
_IGNORED_KEYS = {"sample_size", "act_fn", "_class_name", "_diffusers_version"}


@dataclass(frozen=True)
class MotionModuleConfig:
    num_attention_heads: int = 8
    num_transformer_block: int = 1
    attention_block_types: tuple[str, ...] = ("Temporal_Self", "Temporal_Self")
    temporal_position_encoding: bool = True
    temporal_position_encoding_max_len: int = 24
    temporal_attention_dim_div: int = 1
    zero_initialize: bool = True  # training-time init only; loaded weights override it


@dataclass(frozen=True)
class UNetConfig:
    """The reference ``UNet3DConditionModel`` config (``shared/reference/unet_*_config.json``)."""

    in_channels: int = 13
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock3D",
        "CrossAttnDownBlock3D",
        "CrossAttnDownBlock3D",
        "DownBlock3D",
    )
    up_block_types: tuple[str, ...] = (
        "UpBlock3D",
        "CrossAttnUpBlock3D",
        "CrossAttnUpBlock3D",
        "CrossAttnUpBlock3D",
    )
    mid_block_type: str = "UNetMidBlock3DCrossAttn"
    layers_per_block: int = 2
    attention_head_dim: int = 8  # the reference uses this as the number of heads
    cross_attention_dim: int = 384
    add_audio_layer: bool = True
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    center_input_sample: bool = False
    resnet_time_scale_shift: str = "default"
    use_motion_module: bool = True
    motion_module_resolutions: tuple[int, ...] = (1, 2, 4, 8)
    motion_module_mid_block: bool = False
    motion_module_decoder_only: bool = False
    motion_module_type: str = "Vanilla"
    motion_module_kwargs: MotionModuleConfig = field(default_factory=MotionModuleConfig)
    # ours, not the reference's (lipsync.models.dyncond); omitted from to_dict() while disabled
    dynamic_conditioning: DynamicConditioningConfig = field(
        default_factory=DynamicConditioningConfig
    )

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> UNetConfig:
        """Build from a reference-style dict; unknown or unsupported settings are a ConfigError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - names - _IGNORED_KEYS)
        if unknown:
            raise ConfigError(f"unknown U-Net config keys: {', '.join(unknown)}")
        values: dict[str, Any] = {}
        for key, value in cfg.items():
            if key not in names:
                continue
            if key == "motion_module_kwargs":
                mm_names = {f.name for f in dataclasses.fields(MotionModuleConfig)}
                bad = sorted(set(value) - mm_names)
                if bad:
                    raise ConfigError(f"unknown motion_module_kwargs keys: {', '.join(bad)}")
                value = MotionModuleConfig(
                    **{k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
                )
            elif key == "dynamic_conditioning":
                value = DynamicConditioningConfig.from_dict(value)
            elif isinstance(value, list):
                value = tuple(value)
            values[key] = value
        config = cls(**values)
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        """The config as a dict; ``dynamic_conditioning`` only when enabled, so the configs of
        models without it stay exactly the reference's."""
        out = dataclasses.asdict(self)
        if not self.dynamic_conditioning.enabled:
            out.pop("dynamic_conditioning")
        return out

    def validate(self) -> None:
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ConfigError("down/up block types must have one entry per block_out_channels")
        for kind in self.down_block_types:
            if kind not in DOWN_BLOCKS:
                raise ConfigError(f"unsupported down block type {kind!r}")
        for kind in self.up_block_types:
            if kind not in UP_BLOCKS:
                raise ConfigError(f"unsupported up block type {kind!r}")
        if self.mid_block_type != "UNetMidBlock3DCrossAttn":
            raise ConfigError(f"unsupported mid block type {self.mid_block_type!r}")
        if self.resnet_time_scale_shift != "default":
            raise ConfigError("only resnet_time_scale_shift='default' is supported")
        if self.dynamic_conditioning.enabled and not self.add_audio_layer:
            raise ConfigError(
                "dynamic_conditioning needs the audio cross-attention (add_audio_layer)"
            )
        if self.use_motion_module and self.motion_module_type != "Vanilla":
            raise ConfigError(f"unsupported motion module type {self.motion_module_type!r}")
        for ch in self.block_out_channels:
            if ch % self.norm_num_groups or ch % self.attention_head_dim:
                raise ConfigError(
                    f"channels {ch} not divisible by norm_num_groups {self.norm_num_groups} "
                    f"and attention_head_dim {self.attention_head_dim}"
                )

    def motion_module_at(self, resolution: int, decoder: bool) -> bool:
        """Whether the block at downsampling factor ``resolution`` has motion modules."""
        if not self.use_motion_module or resolution not in self.motion_module_resolutions:
            return False
        return decoder or not self.motion_module_decoder_only


def _motion_module(channels: int, config: UNetConfig) -> MotionModule:
    kw = config.motion_module_kwargs
    return MotionModule(
        channels,
        num_attention_heads=kw.num_attention_heads,
        num_transformer_block=kw.num_transformer_block,
        attention_block_types=kw.attention_block_types,
        temporal_position_encoding=kw.temporal_position_encoding,
        temporal_position_encoding_max_len=kw.temporal_position_encoding_max_len,
        temporal_attention_dim_div=kw.temporal_attention_dim_div,
    )


class UNetBlock(nn.Module):
    """One resolution level: ``resnets[i]`` → ``attentions[i]`` → ``motion_modules[i]`` per layer.

    Used for down blocks (optionally followed by ``downsamplers``) and up blocks (each layer first
    concatenates a skip connection; optionally followed by ``upsamplers``).
    """

    def __init__(
        self,
        resnet_in: list[int],
        out_channels: int,
        config: UNetConfig,
        cross_attention: bool,
        motion: bool,
        downsample: bool = False,
        upsample: bool = False,
    ):
        super().__init__()
        temb = config.block_out_channels[0] * 4
        context_dim = config.cross_attention_dim if config.add_audio_layer else None
        self.resnets = nn.ModuleList(
            ResnetBlock3D(c, out_channels, temb, config.norm_num_groups, config.norm_eps)
            for c in resnet_in
        )
        self.attentions = (
            nn.ModuleList(
                SpatialTransformer(
                    out_channels,
                    config.attention_head_dim,
                    config.norm_num_groups,
                    context_dim,
                    gate=config.dynamic_conditioning,
                )
                for _ in resnet_in
            )
            if cross_attention
            else None
        )
        self.motion_modules = (
            nn.ModuleList(_motion_module(out_channels, config) for _ in resnet_in)
            if motion
            else None
        )
        self.downsamplers = (
            nn.ModuleList([Downsample3D(out_channels, config.downsample_padding)])
            if downsample
            else None
        )
        self.upsamplers = nn.ModuleList([Upsample3D(out_channels)]) if upsample else None

    def layer(self, i: int, x: torch.Tensor, temb: torch.Tensor, context) -> torch.Tensor:
        # x: (b, c, f, h, w) -> (b, out_channels, f, h, w)
        x = self.resnets[i](x, temb)
        if self.attentions is not None:
            x = self.attentions[i](x, context)
        if self.motion_modules is not None:
            x = self.motion_modules[i](x)
        return x

    def down(
        self, x: torch.Tensor, temb: torch.Tensor, context, layers: int | None = None
    ) -> tuple[torch.Tensor, list]:
        # x: (b, c, f, h, w) -> (b, c', f, h', w') and the skip tensors for the decoder.
        # layers = k: only the first k layers, no downsampler (a cached step's partial block).
        skips = []
        for i in range(len(self.resnets) if layers is None else layers):
            x = self.layer(i, x, temb, context)
            skips.append(x)
        if self.downsamplers is not None and layers is None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips

    def up(
        self,
        x: torch.Tensor,
        skips: list,
        temb: torch.Tensor,
        context,
        size=None,
        start: int = 0,
        stop: int | None = None,
    ):
        # x: (b, c, f, h, w); skips consumed from the end -> (b, c', f, 2h, 2w)
        # Layers start..stop-1 only; the upsampler runs when the last layer did.
        stop = len(self.resnets) if stop is None else stop
        for i in range(start, stop):
            x = torch.cat([x, skips.pop()], dim=1)
            x = self.layer(i, x, temb, context)
        if self.upsamplers is not None and stop == len(self.resnets):
            x = self.upsamplers[0](x, size)
        return x


class MidBlock(nn.Module):
    """resnet → (attention → [motion] → resnet); checkpoint name ``mid_block``."""

    def __init__(self, channels: int, config: UNetConfig):
        super().__init__()
        temb = config.block_out_channels[0] * 4
        context_dim = config.cross_attention_dim if config.add_audio_layer else None
        scale = config.mid_block_scale_factor
        groups, eps = config.norm_num_groups, config.norm_eps
        self.resnets = nn.ModuleList(
            ResnetBlock3D(channels, channels, temb, groups, eps, scale) for _ in range(2)
        )
        self.attentions = nn.ModuleList(
            [
                SpatialTransformer(
                    channels,
                    config.attention_head_dim,
                    groups,
                    context_dim,
                    gate=config.dynamic_conditioning,
                )
            ]
        )
        self.motion_modules = (
            nn.ModuleList([_motion_module(channels, config)])
            if config.use_motion_module and config.motion_module_mid_block
            else None
        )

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context) -> torch.Tensor:
        # x: (b, c, f, h, w) -> (b, c, f, h, w)
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context)
        if self.motion_modules is not None:
            x = self.motion_modules[0](x)
        return self.resnets[1](x, temb)


@dataclass
class StepCache:
    """Deep features kept between the denoising steps of one run (DeepCache, module docstring).

    Set ``refresh`` before each call: True runs the full U-Net and stores ``feature``; False runs
    only the shallow part on the stored ``feature`` (a full call happens anyway while none is
    stored). ``feature``: (b, c, f, h', w'), the hidden state at the branch's cut, for the call's
    whole batch (both CFG halves). One cache per run: it holds one batch's features.
    """

    branch: int = 0
    refresh: bool = True
    feature: torch.Tensor | None = None
    full_calls: int = 0
    cached_calls: int = 0

    def keep_rows(self, start: int, stop: int) -> None:
        """Keep batch rows start..stop-1 of the stored feature (e.g. the conditional half of a
        CFG batch when later steps run without guidance)."""
        if self.feature is not None:
            self.feature = self.feature[start:stop]


@dataclass(frozen=True)
class CachePoint:
    """Where skip branch ``branch`` cuts the network (see the module docstring)."""

    down_block: int  # B: down blocks < B run fully on a cached step ...
    down_layers: int  # L: ... and the first L layers of down block B
    up_block: int  # n - 1 - B: the cached call resumes in this up block ...
    up_layer: int  # per - 1 - L: ... at this layer, on the cached feature


class UNet3D(nn.Module):
    """The LatentSync denoiser. Build with ``UNet3D.from_config(dict)``."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        ch = config.block_out_channels
        n = len(ch)
        time_dim = ch[0] * 4

        self.conv_in = InflatedConv3d(config.in_channels, ch[0], kernel_size=3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], time_dim)

        self.down_blocks = nn.ModuleList()
        out = ch[0]
        for i, kind in enumerate(config.down_block_types):
            prev, out = out, ch[i]
            self.down_blocks.append(
                UNetBlock(
                    [prev] + [out] * (config.layers_per_block - 1),
                    out,
                    config,
                    cross_attention=kind == "CrossAttnDownBlock3D",
                    motion=config.motion_module_at(2**i, decoder=False),
                    downsample=i < n - 1,
                )
            )

        self.mid_block = MidBlock(ch[-1], config)

        self.up_blocks = nn.ModuleList()
        rev = list(reversed(ch))
        out = rev[0]
        for i, kind in enumerate(config.up_block_types):
            prev, out = out, rev[i]
            skip_in = rev[min(i + 1, n - 1)]
            layers = config.layers_per_block + 1
            # first resnet takes the previous level's output, later ones their own; each also
            # takes one skip (the last skip of a level comes from the level above).
            resnet_in = [
                (prev if j == 0 else out) + (skip_in if j == layers - 1 else out)
                for j in range(layers)
            ]
            self.up_blocks.append(
                UNetBlock(
                    resnet_in,
                    out,
                    config,
                    cross_attention=kind == "CrossAttnUpBlock3D",
                    motion=config.motion_module_at(2 ** (n - 1 - i), decoder=True),
                    upsample=i < n - 1,
                )
            )

        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, ch[0], eps=config.norm_eps)
        self.conv_out = InflatedConv3d(ch[0], config.out_channels, kernel_size=3, padding=1)

    @classmethod
    def from_config(cls, cfg: dict[str, Any] | UNetConfig) -> UNet3D:
        config = cfg if isinstance(cfg, UNetConfig) else UNetConfig.from_dict(cfg)
        return cls(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv_in.weight.device

    def cache_point(self, branch: int) -> CachePoint:
        """The cut of DeepCache skip branch ``branch`` (0 = shallowest; ConfigError if none)."""
        n = len(self.down_blocks)
        per = len(self.up_blocks[0].resnets)  # layers_per_block + 1
        if not 0 <= branch < n * per:
            raise ConfigError(
                f"cache branch must be in 0..{n * per - 1} for this U-Net, got {branch}"
            )
        block, layers = divmod(branch, per)
        return CachePoint(block, layers, n - 1 - block, per - 1 - layers)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor | None,
        null_audio_clips: int = 0,
        cache: StepCache | None = None,
    ) -> torch.Tensor:
        # sample: (b, 13, f, h, w); timestep: () or (b,); encoder_hidden_states: (b*f, 50, 384)
        # -> predicted noise (b, 4, f, h, w)
        # With null_audio_clips = k, the first k clips have all-zero audio and
        # encoder_hidden_states holds only the other (b-k)*f rows (same result, less work).
        # cache: None (every layer runs) or a StepCache (full call storing, or cached call
        # reusing, the deep feature; see the module docstring).
        b, _, frames, h, w = sample.shape
        tokens = encoder_hidden_states
        if tokens is not None and tokens.dim() == 4:  # (b, f, 50, 384)
            tokens = tokens.reshape(-1, *tokens.shape[2:])
        if not 0 <= null_audio_clips <= b:
            raise ValueError(f"null_audio_clips must be in 0..{b}, got {null_audio_clips}")
        rows = (b - null_audio_clips) * frames
        if tokens is not None and tokens.shape[0] != rows:
            raise ValueError(
                f"encoder_hidden_states has {tokens.shape[0]} rows; expected "
                f"(b - null_audio_clips)*f = {rows}"
            )
        context = None
        if tokens is not None or null_audio_clips:
            context = AudioContext(
                tokens.to(self.dtype) if tokens is not None and rows else None,
                null_audio_clips * frames,
            )

        t = torch.as_tensor(timestep, device=sample.device)
        t = t.reshape(-1).expand(b) if t.numel() == 1 else t.reshape(b)
        temb = timestep_embedding(
            t,
            self.config.block_out_channels[0],
            self.config.flip_sin_to_cos,
            self.config.freq_shift,
        )
        temb = self.time_embedding(temb.to(self.dtype))  # (b, 4*c0)

        if self.config.center_input_sample:
            sample = 2 * sample - 1.0
        x = self.conv_in(sample.to(self.dtype))

        factor = 2 ** (len(self.up_blocks) - 1)
        force_size = h % factor != 0 or w % factor != 0
        point = self.cache_point(cache.branch) if cache is not None else None
        if cache is not None and not cache.refresh and cache.feature is not None:
            if cache.feature.shape[0] != b or cache.feature.shape[2] != frames:
                raise ValueError(
                    f"cached feature {tuple(cache.feature.shape)} does not fit a batch of {b} "
                    f"clips of {frames} frames"
                )
            cache.cached_calls += 1
            skips: list[torch.Tensor] = [x]
            for block in self.down_blocks[: point.down_block]:
                x, block_skips = block.down(x, temb, context)
                skips.extend(block_skips)
            if point.down_layers:
                _, block_skips = self.down_blocks[point.down_block].down(
                    x, temb, context, layers=point.down_layers
                )
                skips.extend(block_skips)
            x = self._up(cache.feature, skips, temb, context, force_size, point.up_block,
                         point.up_layer)  # fmt: skip
        else:
            skips = [x]
            for block in self.down_blocks:
                x, block_skips = block.down(x, temb, context)
                skips.extend(block_skips)
            x = self.mid_block(x, temb, context)
            if cache is not None:
                cache.full_calls += 1
            x = self._up(x, skips, temb, context, force_size, tap=point, cache=cache)

        x = self.conv_out(F.silu(self.conv_norm_out(x)))
        return x

    def _up(
        self,
        x: torch.Tensor,
        skips: list[torch.Tensor],
        temb: torch.Tensor,
        context,
        force_size: bool,
        first_block: int = 0,
        first_layer: int = 0,
        tap: CachePoint | None = None,
        cache: StepCache | None = None,
    ) -> torch.Tensor:
        # The decoder from up block first_block, layer first_layer on; skips consumed from the
        # end. tap: store the hidden state entering (tap.up_block, tap.up_layer) in cache.
        for i in range(first_block, len(self.up_blocks)):
            block = self.up_blocks[i]
            start = first_layer if i == first_block else 0
            count = len(block.resnets) - start
            level_skips = skips[-count:]
            del skips[-count:]
            size = skips[-1].shape[-2:] if (force_size and skips) else None
            if tap is not None and i == tap.up_block:
                x = block.up(x, level_skips, temb, context, start=start, stop=tap.up_layer)
                cache.feature = x
                start = tap.up_layer
            x = block.up(x, level_skips, temb, context, size, start=start)
        return x


def random_unet(
    config: dict[str, Any] | UNetConfig,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> UNet3D:
    """A U-Net with weights drawn from ``seed``, built directly on ``device`` (the ``tiny``
    preset, ``--random-weights`` timing runs). The global random state is left as it was."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with device:  # initialise in place on the target device (fast for full-size models)
            model = UNet3D.from_config(config if isinstance(config, UNetConfig) else dict(config))
    return model.to(dtype=dtype).eval().requires_grad_(False)
