"""Typed training configs, loaded from YAML or JSON with strict checks.

Every field has a type; a config file is read into nested dataclasses by :func:`from_dict`, which
rejects unknown keys (naming the closest known one), wrong types and out-of-range values with one
:class:`~lipsync.errors.ConfigError` line. ``--set a.b=value`` overrides (the CLI) are applied to
the plain dict before the check, so they are checked like the file.

Two kinds of config:

* :class:`UNetTrainConfig` (``lipsync train unet``): the LatentSync U-Net, stage 1 (no motion
  modules, every parameter trains, noise MSE only) or stage 2 (motion modules, the listed modules
  train, SyncNet loss on the decoded lower half of the one-step prediction, optional LPIPS/TREPA).
  The reference's YAML files (``configs/unet/stage*.yaml`` of ByteDance's repository) load too:
  :func:`from_reference` translates them field by field (docs/TRAINING.md has the table).
* :class:`VaeTrainConfig` (``lipsync train vae``): a small ``AutoencoderKL`` on face crops.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from lipsync.errors import ConfigError

Precision = Literal["bf16", "fp16", "fp32"]
InitFrom = Literal["official", "own", "scratch"]
OptimizerKind = Literal["adamw", "adamw8bit"]
Schedule = Literal["constant", "cosine"]
Strategy = Literal["ddp", "fsdp"]
AudioKind = Literal["official", "seeded"]
VaeKind = Literal["sd", "own", "tiny-random"]
CtcUnits = Literal["phone", "viseme"]
TimestepWeighting = Literal["none", "alpha"]
VideoEncoderKind = Literal["tiny3d", "videomae"]

UNET_SCHEMA = "lipsync.train.unet/1"
VAE_SCHEMA = "lipsync.train.vae/1"


# --------------------------------------------------------------------------- U-Net training


@dataclass
class ModelSection:
    """The U-Net architecture: a packaged config name (``unet_stage2_config.json``), a path to a
    JSON file, or the config dict itself (the reference's ``model:`` block)."""

    unet_config: str | dict[str, Any] = "unet_stage2_config.json"
    resolution: int = 256  # face crop size in pixels; latents are resolution / 8
    num_frames: int = 16  # frames per training window (the motion modules take at most 24)


@dataclass
class InitSection:
    """Where the U-Net's weights come from.

    ``official``: a LatentSync ``latentsync_unet.pt`` (or any file in its key layout); ``own``: one
    of our checkpoints (a checkpoint folder, a bundle, or a weights file); ``scratch``: random.
    Loading is strict: every key must fit, except the patterns listed here, which are reported.
    ``allow_missing``: model keys that may be absent from the file (new layers: they keep their
    fresh initialisation; motion modules start as identity, their output projection zeroed).
    ``allow_unexpected``: file keys that may be dropped (e.g. the motion modules of a stage-2 file
    used for a stage-1 run).
    """

    source: InitFrom = "official"
    path: str | None = None
    allow_missing: list[str] = field(default_factory=list)
    allow_unexpected: list[str] = field(default_factory=list)
    seed: int = 0  # scratch / new-layer initialisation


@dataclass
class VaeSection:
    """The frozen VAE: ``sd`` = the sd-vae-ft-mse folder (``lipsync download``), ``own`` = one of
    our trained VAEs (a ``lipsync train vae`` checkpoint or a bundle), ``tiny-random`` = seeded
    random weights (tests only)."""

    kind: VaeKind = "sd"
    path: str | None = None
    config: dict[str, Any] | None = None  # tiny-random only: the AutoencoderKL config
    scaling_factor: float | None = None  # None: the checkpoint's (0.18215 for sd)
    sample_posterior: bool = True  # the reference samples the latent distribution


@dataclass
class AudioSection:
    """Whisper-tiny features: ``official`` = an OpenAI checkpoint (``whisper/tiny.pt``);
    ``seeded`` = the architecture with fixed weights made from ``seed`` (our demo bundle)."""

    kind: AudioKind = "official"
    path: str | None = None
    seed: int = 0


@dataclass
class SyncNetSection:
    """The frozen SyncNet that supervises stage 2 (``stable_syncnet.pt`` or one of ours)."""

    path: str | None = None
    config: str | dict[str, Any] | None = None  # architecture; None: read from the checkpoint


@dataclass
class DataSection:
    root: str | None = None  # a processed corpus (``lipsync data process`` output)
    # or a training pack (``python -m lipsync.train.demo_recipe pack``): what the GPU machines
    # read without PyAV (lipsync.train.pack_windows); features computed at start, not cached
    pack: str | None = None
    feature_cache: str | None = None  # Whisper features per segment; default <root>/cache
    train_split: str = "train"
    val_split: str = "val"
    batch_size: int = 1  # per process and micro-batch
    num_workers: int = 4
    # "package.module:function" returning a torch Dataset with the UNetWindows item keys; called
    # as factory(config, split, seed). For custom data (and tests).
    factory: str | None = None


@dataclass
class LossSection:
    """loss = recon · MSE(noise) + sync · SyncNet + lpips · LPIPS + trepa · TREPA.

    SyncNet, LPIPS and TREPA see the one-step prediction of the clean latents, decoded by the VAE
    (``pixel_space``; SyncNet on latents otherwise, as the reference allows). A weight > 0 needs
    its model: a missing SyncNet / LPIPS / TREPA file stops the run at start.
    """

    recon: float = 1.0
    sync: float = 0.0
    lpips: float = 0.0
    trepa: float = 0.0
    pixel_space: bool = False
    lpips_weights: str | None = None  # LPIPS-VGG state dict (the ``lpips`` package's layout)
    trepa_weights: str | None = None  # VideoMAE v2 checkpoint (vit_g_hybrid_pt_1200e_ssv2_ft.pth)
    trepa_config: str | dict[str, Any] = "vit-g"  # "vit-g" or a dict of VideoMAE dimensions
    sync_lower_half: bool = True  # SyncNet sees the lower half of the face (the reference's)


@dataclass
class NoiseSection:
    """Training noise: ``mixed`` = the reference's mixture of one draw shared by all frames of a
    window and per-frame draws (``alpha``: shared / independent standard deviation ratio);
    otherwise one draw repeated over the frames."""

    mixed: bool = True
    alpha: float = 1.0


@dataclass
class TrainSection:
    # Parameter-name substrings that train (stage 2's "motion_modules.", "attentions."); empty:
    # every parameter (stage 1).
    trainable: list[str] = field(default_factory=list)
    max_steps: int = 1000
    max_minutes: float | None = None  # stop (with a checkpoint) after this much wall time
    precision: Precision = "bf16"
    gradient_checkpointing: bool = True
    grad_accumulation: int = 1
    seed: int = 1247
    log_every: int = 10


@dataclass
class OptimizerSection:
    kind: OptimizerKind = "adamw"
    lr: float = 1e-5
    scale_lr: bool = False  # multiply lr by the number of processes
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.01  # torch.optim.AdamW's default, which the reference keeps
    eps: float = 1e-8
    fused: bool | None = None  # None: fused on CUDA
    max_grad_norm: float = 1.0
    schedule: Schedule = "constant"
    warmup_steps: int = 0


@dataclass
class EmaSection:
    enabled: bool = False
    decay: float = 0.9999
    export: bool = True  # exported weights (unet.safetensors) are the EMA ones


@dataclass
class CheckpointSection:
    every: int = 1000  # steps; a checkpoint is also written at the end and on SIGTERM / Ctrl-C
    keep: int = 3  # most recent checkpoint folders kept (0: all)
    weights_dtype: Precision = "fp32"  # exported unet.safetensors; the resumable state stays fp32
    save_optimizer: bool = True


@dataclass
class ValidationSection:
    every: int = 1000  # steps (0: never); validation loss on fixed held-out windows
    at_start: bool = False  # also before the first step (the starting point of the val curve)
    windows: int = 8
    videos: int = 1  # held-out windows rendered to mp4 with a short real inference (0: none)
    video_every: int | None = None  # steps; None: same as ``every``
    inference_steps: int = 20
    guidance: float = 1.5


@dataclass
class DistributedSection:
    strategy: Strategy = "ddp"  # fsdp: parameters/gradients/optimizer sharded (512 px configs)


@dataclass
class PhoneCtcSection:
    weight: float = 0.0  # λ_ctc; 0 = off
    units: CtcUnits = "phone"  # CTC over the 42 phones or the 14 viseme classes
    head_init: str | None = None  # a pretrained head (MouthCtcHead file); None: random start
    head_width: int = 32
    head_lr: float = 3e-4  # the head's own AdamW, on ground-truth mouths
    timestep_weighting: TimestepWeighting = "alpha"  # per-window weight ᾱ_t, or none


@dataclass
class MouthTrepaSection:
    weight: float = 0.0  # λ_mtrepa; 0 = off
    mouth_weight: float = 4.0  # lips' weight relative to the rest of the face (1: uniform)
    delta: float = 1.0  # weight of the frame-to-frame feature-change term (0: off)
    encoder: VideoEncoderKind = "tiny3d"
    encoder_path: str | None = None
    videomae_config: str | dict[str, Any] = "vit-g"


@dataclass
class DynamicConditioningSection:
    enabled: bool = False
    per_region: bool = False
    hidden: int = 64
    max_delta: float = 1.0


@dataclass
class QualitySection:
    """Issue 16's options (:mod:`lipsync.train.quality`), each off by default."""

    phone_ctc: PhoneCtcSection = field(default_factory=PhoneCtcSection)
    mouth_trepa: MouthTrepaSection = field(default_factory=MouthTrepaSection)
    dynamic_conditioning: DynamicConditioningSection = field(
        default_factory=DynamicConditioningSection
    )

    def validate(self) -> None:
        if self.phone_ctc.weight < 0 or self.mouth_trepa.weight < 0:
            raise ConfigError("quality loss weights must be >= 0")
        if self.phone_ctc.head_lr <= 0:
            raise ConfigError(
                f"quality.phone_ctc.head_lr must be > 0, got {self.phone_ctc.head_lr}"
            )
        if self.mouth_trepa.mouth_weight < 1:
            raise ConfigError(
                "quality.mouth_trepa.mouth_weight must be >= 1, got "
                f"{self.mouth_trepa.mouth_weight}"
            )
        if self.mouth_trepa.weight and not self.mouth_trepa.encoder_path:
            raise ConfigError(
                "quality.mouth_trepa.weight > 0 needs quality.mouth_trepa.encoder_path (a tiny3d "
                "video encoder trained on your corpus, or VideoMAE v2 with encoder: videomae)"
            )

    @property
    def needs_pixels(self) -> bool:
        """Whether a loss of this section reads decoded frames (and ground-truth frames)."""
        return bool(self.phone_ctc.weight or self.mouth_trepa.weight)

    @property
    def needs_phones(self) -> bool:
        return bool(self.phone_ctc.weight)


@dataclass
class UNetTrainConfig:
    stage: Literal[1, 2] = 2
    output_dir: str = "runs/unet"
    model: ModelSection = field(default_factory=ModelSection)
    init: InitSection = field(default_factory=InitSection)
    vae: VaeSection = field(default_factory=VaeSection)
    audio: AudioSection = field(default_factory=AudioSection)
    syncnet: SyncNetSection = field(default_factory=SyncNetSection)
    data: DataSection = field(default_factory=DataSection)
    losses: LossSection = field(default_factory=LossSection)
    noise: NoiseSection = field(default_factory=NoiseSection)
    train: TrainSection = field(default_factory=TrainSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    ema: EmaSection = field(default_factory=EmaSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    validation: ValidationSection = field(default_factory=ValidationSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)
    quality: QualitySection = field(default_factory=QualitySection)
    schema: str = UNET_SCHEMA

    def validate(self) -> None:
        """Cross-field checks (types and ranges of single fields are checked on load)."""
        _positive("model.resolution", self.model.resolution)
        if self.model.resolution % 8:
            raise ConfigError(
                f"model.resolution must be a multiple of 8, got {self.model.resolution}"
            )
        if not 1 <= self.model.num_frames <= 24:
            raise ConfigError(f"model.num_frames must be 1..24, got {self.model.num_frames}")
        for name in ("data.batch_size", "train.grad_accumulation", "train.max_steps"):
            _positive(name, _get(self, name))
        _non_negative("data.num_workers", self.data.num_workers)
        _non_negative("checkpoint.keep", self.checkpoint.keep)
        _positive("checkpoint.every", self.checkpoint.every)
        _non_negative("validation.every", self.validation.every)
        for name in ("recon", "sync", "lpips", "trepa"):
            _non_negative(f"losses.{name}", getattr(self.losses, name))
        if self.optimizer.lr <= 0:
            raise ConfigError(f"optimizer.lr must be > 0, got {self.optimizer.lr}")
        if len(self.optimizer.betas) != 2 or not all(0 <= b < 1 for b in self.optimizer.betas):
            raise ConfigError(
                f"optimizer.betas must be two numbers in [0, 1), got {self.optimizer.betas}"
            )
        if not 0 < self.ema.decay < 1:
            raise ConfigError(f"ema.decay must be in (0, 1), got {self.ema.decay}")
        if self.init.source != "scratch" and not self.init.path:
            raise ConfigError(f"init.source is {self.init.source!r} but init.path is not set")
        if self.vae.kind != "tiny-random" and not self.vae.path:
            raise ConfigError(f"vae.kind is {self.vae.kind!r} but vae.path is not set")
        if self.audio.kind == "official" and not self.audio.path:
            raise ConfigError(
                "audio.kind is 'official' but audio.path (whisper/tiny.pt) is not set"
            )
        if self.stage == 1 and (self.losses.sync or self.losses.lpips or self.losses.trepa):
            raise ConfigError(
                "stage 1 trains with the noise MSE only: set losses.sync, losses.lpips and "
                "losses.trepa to 0 (or use stage: 2)"
            )
        if (self.losses.lpips or self.losses.trepa) and not self.losses.pixel_space:
            raise ConfigError("losses.lpips and losses.trepa need losses.pixel_space: true")
        # Pretrained loss models: a weight without its file fails here, at start, never silently.
        if self.losses.sync and not self.syncnet.path:
            raise ConfigError("losses.sync > 0 needs syncnet.path (a SyncNet checkpoint)")
        if self.losses.lpips and not self.losses.lpips_weights:
            raise ConfigError(
                "losses.lpips > 0 needs losses.lpips_weights (an LPIPS-VGG state dict); set "
                "losses.lpips: 0 to train without it"
            )
        if self.losses.trepa and not self.losses.trepa_weights:
            raise ConfigError(
                "losses.trepa > 0 needs losses.trepa_weights (a VideoMAE v2 checkpoint); set "
                "losses.trepa: 0 to train without it"
            )
        sources = [k for k in ("root", "pack", "factory") if getattr(self.data, k) is not None]
        if not sources:
            raise ConfigError("data.root (a processed corpus) is not set (or data.pack)")
        if self.data.pack is not None and len(sources) > 1:
            raise ConfigError(f"data.pack and data.{sources[0]} are both set: choose one")
        self.quality.validate()
        if self.quality.needs_pixels and self.stage == 1:
            raise ConfigError("the quality losses belong to stage 2 (stage: 2)")


# --------------------------------------------------------------------------- VAE training


@dataclass
class VaeDataSection:
    root: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    batch_size: int = 4  # windows per process and micro-batch (all their frames are used)
    frames_per_window: int = 8
    feature_cache: str | None = None  # unused by the VAE (no audio)
    num_workers: int = 4
    factory: str | None = None  # like DataSection.factory; items need "frames" (F, 3, R, R)


@dataclass
class VaeLossSection:
    l1: float = 1.0
    mse: float = 1.0
    kl: float = 1e-6
    lpips: float = 0.0
    lpips_weights: str | None = None
    mouth_weight: float = 1.0  # extra weight of the pixels the U-Net regenerates (mask == 0)


@dataclass
class VaeTrainConfig:
    output_dir: str = "runs/vae"
    resolution: int = 256
    # diffusers AutoencoderKL fields; 8x downsampling and 4 latent channels keep the U-Net layout
    autoencoder: dict[str, Any] = field(
        default_factory=lambda: {
            "block_out_channels": [32, 64, 128, 128],
            "layers_per_block": 1,
            "norm_num_groups": 32,
            "latent_channels": 4,
        }
    )
    init_path: str | None = None  # continue from one of our VAE checkpoints / bundles
    data: VaeDataSection = field(default_factory=VaeDataSection)
    losses: VaeLossSection = field(default_factory=VaeLossSection)
    train: TrainSection = field(default_factory=lambda: TrainSection(max_steps=2000))
    optimizer: OptimizerSection = field(
        default_factory=lambda: OptimizerSection(lr=2e-4, weight_decay=0.0)
    )
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    validation: ValidationSection = field(
        default_factory=lambda: ValidationSection(every=500, windows=64, videos=0)
    )
    distributed: DistributedSection = field(default_factory=DistributedSection)
    schema: str = VAE_SCHEMA

    def validate(self) -> None:
        _positive("resolution", self.resolution)
        blocks = self.autoencoder.get("block_out_channels", [])
        if self.resolution % 8 or len(blocks) != 4:
            raise ConfigError(
                "the VAE must downsample 8x (4 entries in autoencoder.block_out_channels) and "
                "resolution must be a multiple of 8"
            )
        if self.autoencoder.get("latent_channels", 4) != 4:
            raise ConfigError("autoencoder.latent_channels must be 4 (the U-Net's input layout)")
        _positive("data.batch_size", self.data.batch_size)
        _positive("train.max_steps", self.train.max_steps)
        if self.losses.lpips and not self.losses.lpips_weights:
            raise ConfigError(
                "losses.lpips > 0 needs losses.lpips_weights (an LPIPS-VGG state dict); set "
                "losses.lpips: 0 to train without it"
            )
        if self.data.root is None and self.data.factory is None:
            raise ConfigError("data.root (a processed corpus) is not set")


# --------------------------------------------------------------------------- loading


T = typing.TypeVar("T")


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from ``data`` strictly (unknown keys, wrong types: ConfigError)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown config key {path!r}{hint}")
        values[key] = _coerce(hints[key], value, path)
    return cls(**values)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: invalid value {value!r}")
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{path} must be one of {choices}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path} must be a list, got {value!r}")
        return [_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{path} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config field type {tp!r} at {path}")  # a bug in this module


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def read_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML (``.yaml``/``.yml``) or JSON file as a dict; one ConfigError line on failure."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError("YAML configs need PyYAML: pip install 'lipsync[train]'") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"cannot parse {path}{where}: {getattr(e, 'problem', e)}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"cannot parse {path}: {e.msg} at line {e.lineno}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``["train.max_steps=10", "data.root=/x"]`` applied to a nested dict (values parsed as
    YAML/JSON scalars when possible: numbers, true/false, null, lists)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = _parse_scalar(raw)
    return data


def _parse_scalar(raw: str) -> Any:
    try:
        import yaml

        return yaml.safe_load(raw)
    except ImportError:
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw
    except Exception:  # noqa: BLE001 - anything unparsable is taken as a plain string
        return raw


def is_reference_layout(data: dict[str, Any]) -> bool:
    """A ByteDance ``configs/unet/*.yaml`` file (sections data/ckpt/run/optimizer/model)."""
    return {"run", "ckpt", "model"} <= set(data) and "schema" not in data


def load_unet_config(path: str | Path, overrides: list[str] = ()) -> UNetTrainConfig:
    """Read a U-Net training config (ours or the reference's layout), apply overrides, check."""
    data = read_mapping(path) if not isinstance(path, dict) else dict(path)
    if is_reference_layout(data):
        data = from_reference(data)
    data = apply_overrides(data, list(overrides))
    schema = data.get("schema", UNET_SCHEMA)
    if schema != UNET_SCHEMA:
        raise ConfigError(
            f"{path}: schema {schema!r} is not a U-Net training config ({UNET_SCHEMA})"
        )
    config = from_dict(UNetTrainConfig, data)
    config.validate()
    return config


def load_vae_config(path: str | Path, overrides: list[str] = ()) -> VaeTrainConfig:
    data = read_mapping(path) if not isinstance(path, dict) else dict(path)
    data = apply_overrides(data, list(overrides))
    schema = data.get("schema", VAE_SCHEMA)
    if schema != VAE_SCHEMA:
        raise ConfigError(f"{path}: schema {schema!r} is not a VAE training config ({VAE_SCHEMA})")
    config = from_dict(VaeTrainConfig, data)
    config.validate()
    return config


def packaged_train_config(name: str) -> Path:
    """Path of a config shipped in ``lipsync/configs/train`` (e.g. ``unet_stage2.yaml``)."""
    ref = resources.files("lipsync.configs").joinpath("train", name)
    if not ref.is_file():
        raise ConfigError(f"no packaged training config named {name!r}")
    return Path(str(ref))


def resolve_config_path(name_or_path: str) -> Path:
    """A path as given, else a packaged config by name (``stage2`` → ``unet_stage2.yaml``)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    for candidate in (name_or_path, f"{name_or_path}.yaml", f"unet_{name_or_path}.yaml"):
        ref = resources.files("lipsync.configs").joinpath("train", candidate)
        if ref.is_file():
            return Path(str(ref))
    raise ConfigError(f"config file not found: {name_or_path}")


# --------------------------------------------------------------------------- reference layout


def from_reference(ref: dict[str, Any]) -> dict[str, Any]:
    """Translate a reference ``configs/unet/*.yaml`` (already parsed) into our layout.

    Semantics kept: stage 2 iff ``model.use_motion_module``; stage 1 trains every parameter,
    stage 2 only ``run.trainable_modules``; SyncNet/LPIPS/TREPA count only with
    ``pixel_space_supervise`` (SyncNet also needs ``use_syncnet``); the reference's fp16 autocast
    (``mixed_precision_training``) becomes our default bf16 (same memory, no loss scaling);
    checkpoints and validation both every ``save_ckpt_steps``. The reference loads the initial
    U-Net with ``strict=False``; we load strictly and list the exceptions its stages rely on
    (motion modules missing from a stage-1 file, or present in a file used for stage 1).
    Paths of ByteDance's machines (file lists, caches) have no equivalent: set ``data.root``.
    """
    data, run, ckpt = ref.get("data", {}), ref.get("run", {}), ref.get("ckpt", {})
    opt, model = ref.get("optimizer", {}), dict(ref.get("model", {}))
    stage = 2 if model.get("use_motion_module", False) else 1
    pixel = bool(run.get("pixel_space_supervise", False))
    sync = float(run.get("sync_loss_weight", 0.0)) if pixel or run.get("use_syncnet") else 0.0
    if not run.get("use_syncnet", False):
        sync = 0.0
    every = int(ckpt.get("save_ckpt_steps", 10000))
    resume = ckpt.get("resume_ckpt_path") or None
    out = {
        "schema": UNET_SCHEMA,
        "stage": stage,
        "output_dir": data.get("train_output_dir", "runs/unet"),
        "model": {
            "unet_config": model,
            "resolution": int(data.get("resolution", 256)),
            "num_frames": int(data.get("num_frames", 16)),
        },
        "init": {
            "source": "official" if resume else "scratch",
            "path": resume,
            "allow_missing": ["motion_modules."] if stage == 2 else [],
            "allow_unexpected": ["motion_modules."] if stage == 1 else [],
        },
        "data": {
            "batch_size": int(data.get("batch_size", 1)),
            "num_workers": int(data.get("num_workers", 4)),
        },
        "losses": {
            "recon": float(run.get("recon_loss_weight", 1.0)),
            "sync": sync,
            "lpips": float(run.get("perceptual_loss_weight", 0.0)) if pixel else 0.0,
            "trepa": float(run.get("trepa_loss_weight", 0.0)) if pixel else 0.0,
            "pixel_space": pixel,
        },
        "noise": {
            "mixed": bool(run.get("use_mixed_noise", False)),
            "alpha": float(run.get("mixed_noise_alpha", 1.0)),
        },
        "train": {
            "trainable": list(run.get("trainable_modules", [])) if stage == 2 else [],
            "max_steps": int(run.get("max_train_steps", 1000)),
            "precision": "bf16" if run.get("mixed_precision_training", True) else "fp32",
            "gradient_checkpointing": bool(run.get("enable_gradient_checkpointing", True)),
            "seed": int(run.get("seed", 1247)),
        },
        "optimizer": {
            "lr": float(opt.get("lr", 1e-5)),
            "scale_lr": bool(opt.get("scale_lr", False)),
            "max_grad_norm": float(opt.get("max_grad_norm", 1.0)),
            "schedule": opt.get("lr_scheduler", "constant"),
            "warmup_steps": int(opt.get("lr_warmup_steps", 0)),
        },
        "checkpoint": {"every": every},
        "validation": {
            "every": every,
            "inference_steps": int(run.get("inference_steps", 20)),
            "guidance": float(run.get("guidance_scale", 1.5)),
        },
    }
    return out


# --------------------------------------------------------------------------- helpers


def _get(config: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        config = getattr(config, part)
    return config


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{name} must be > 0, got {value}")


def _non_negative(name: str, value: float) -> None:
    if value < 0:
        raise ConfigError(f"{name} must be >= 0, got {value}")
