"""Our own trained models: the bundle format, read and written with strict checks.

A bundle is one folder holding everything a run needs besides the code::

    manifest.json          format "lipsync.bundle/1": configs, file list, sha256 of every file,
                           the audio encoder's spec, training provenance
    unet*.safetensors      U-Net weights (fp16), possibly split in shards (<= 15 MiB each)
    vae*.safetensors       VAE (diffusers AutoencoderKL) weights (fp16)

The audio encoder is Whisper-tiny's architecture. Either its weights are in the bundle
(``kind: "whisper"``, files listed like the others) or they are **seeded**: made from an integer
seed by :func:`seeded_whisper_state`, a counter-based generator (SplitMix64) written out here, so
the same seed gives bit-identical weights on any machine, numpy and torch version; the manifest
stores their sha256, and loading regenerates and compares them. A seeded encoder costs no file.

Loading (:func:`load_bundle`) checks, in order: the manifest's format and keys; every listed file
exists and has the recorded sha256; each state dict has exactly the keys and shapes its config
builds (:func:`lipsync.checkpoints.check_state_dict`); the seeded encoder's hash. Any failure is a
:class:`~lipsync.errors.CheckpointError` naming the file and the first problem.

The single-file forms ``lipsync run --unet PATH`` can take are also read here
(:func:`load_own_unet`): a bundle folder, a training checkpoint folder (``unet.safetensors`` +
``unet_config.json``), or a ``.safetensors`` file whose metadata carries the config.
"""

from __future__ import annotations

import decimal
import hashlib
import json
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lipsync.audio import AudioEncoder
from lipsync.checkpoints import (
    check_state_dict,
    read_checkpoint,
    read_safetensors_metadata,
    unwrap_state_dict,
)
from lipsync.errors import CheckpointError, CheckpointNotFoundError
from lipsync.models.unet import UNet3D, UNetConfig
from lipsync.models.vae import Vae, build_autoencoder
from lipsync.models.whisper import WhisperDims, WhisperEncoder

BUNDLE_FORMAT = "lipsync.bundle/1"
UNET_FILE_FORMAT = "lipsync.unet/1"
VAE_FILE_FORMAT = "lipsync.vae/1"
SEEDED_INIT = "lipsync.seeded/1"
MANIFEST = "manifest.json"
MAX_SHARD_BYTES = 15 * 2**20  # the GPU machine returns files of at most 16 MiB
_MANIFEST_KEYS = {
    "format", "name", "description", "resolution", "num_frames", "unet", "vae", "audio",
    "mask", "sha256", "training", "created",
}  # fmt: skip
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# --------------------------------------------------------------------------- seeded weights

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(counter: np.ndarray) -> np.ndarray:
    """SplitMix64's output function on a uint64 counter array (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = counter * _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def seeded_uniform(seed: int, name: str, n: int) -> np.ndarray:
    """``n`` float64 numbers uniform in [0, 1) from (seed, tensor name), machine-independent."""
    key = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")
    counter = np.arange(1, n + 1, dtype=np.uint64) + np.uint64(key)
    bits = _splitmix64(counter) >> np.uint64(11)  # 53 random bits
    return bits.astype(np.float64) * (1.0 / 2**53)


def seeded_whisper_state(dims: WhisperDims, seed: int) -> dict[str, torch.Tensor]:
    """Whisper-encoder weights made from ``seed`` (float32), PyTorch's default init laws:
    linear/conv weights and biases uniform in ±1/sqrt(fan_in), LayerNorms 1 and 0, the
    positional table Whisper's sinusoids. (The last few are cached: a few seconds each.)"""
    return {k: v.clone() for k, v in _seeded_state(dims, int(seed)).items()}


@lru_cache(maxsize=2)
def _seeded_state(dims: WhisperDims, seed: int) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in WhisperEncoder(dims).state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    for name, shape in sorted(shapes.items()):
        n = math.prod(shape)
        if name == "positional_embedding":
            state[name] = torch.from_numpy(_sinusoids64(dims.n_audio_ctx, dims.n_audio_state))
            continue
        if "_ln" in name or name.startswith("ln_post"):
            fill = 1.0 if name.endswith("weight") else 0.0
            state[name] = torch.full(shape, fill, dtype=torch.float32)
            continue
        if name.endswith("weight"):
            fan_in = math.prod(shape[1:])
        else:  # a bias: fan_in of its layer's weight
            weight = shapes[name[: -len("bias")] + "weight"]
            fan_in = math.prod(weight[1:])
        bound = 1.0 / math.sqrt(fan_in)
        u = seeded_uniform(seed, name, n)
        values = ((2.0 * u - 1.0) * bound).astype(np.float32).reshape(shape)
        state[name] = torch.from_numpy(values)
    return state


def _sinusoids64(length: int, channels: int) -> np.ndarray:
    """Whisper's positional table, the same bits on any machine: only IEEE-754 basic arithmetic
    (no libm, no SIMD math library: numpy's float64 ``sin`` differs between builds and CPUs, and
    even a last-bit difference survives the rounding to float32 in a few of the 576,000 values).
    The frequencies come from :mod:`decimal` (correctly rounded), the sines and cosines from a
    Cody-Waite reduction and Taylor polynomials in float64 (error about 1e-16), then float32."""
    half = channels // 2
    ctx = decimal.Context(prec=40)
    step = ctx.divide(ctx.ln(decimal.Decimal(10000)), decimal.Decimal(half - 1))
    inv = np.array([float(ctx.exp(ctx.multiply(-step, k))) for k in range(half)], np.float64)
    t = np.arange(length, dtype=np.float64)[:, None] * inv[None, :]
    sin, cos = _sincos(t)
    return np.concatenate([sin, cos], axis=1).astype(np.float32)


# pi/2 in three parts (fdlibm's): the first 33 bits, the next 33, the rest
_PIO2 = (1.57079632673412561417e00, 6.07710050630396597660e-11, 2.02226624879595063154e-21)


def _sincos(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sin and cos of non-negative float64 ``x`` (< 2**20) with basic arithmetic only."""
    k = np.rint(x * (2.0 / math.pi))
    r = ((x - k * _PIO2[0]) - k * _PIO2[1]) - k * _PIO2[2]  # |r| <= pi/4, k * part exact
    r2 = r * r
    s = np.zeros_like(r)
    c = np.zeros_like(r)
    for n in range(10, 0, -1):  # Horner: terms up to r**21 / 21! and r**20 / 20!
        s = 1.0 - s * r2 / ((2 * n) * (2 * n + 1))
        c = 1.0 - c * r2 / ((2 * n - 1) * (2 * n))
    s = s * r
    quadrant = k.astype(np.int64) % 4
    sin = np.choose(quadrant, [s, c, -s, -c])
    cos = np.choose(quadrant, [c, -s, -c, s])
    return sin, cos


def state_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, names sorted."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def seeded_audio_encoder(
    seed: int,
    dims: WhisperDims | None = None,
    device: str | torch.device = "cpu",
    expected_sha256: str | None = None,
) -> AudioEncoder:
    """A frozen Whisper-tiny-shaped encoder with seeded weights (optionally hash-checked)."""
    dims = dims or WhisperDims()
    state = seeded_whisper_state(dims, seed)
    if expected_sha256 is not None:
        got = _seeded_sha256(dims, int(seed))
        if got != expected_sha256:
            raise CheckpointError(
                f"seeded audio encoder (seed {seed}) has sha256 {got[:12]}…, the bundle expects "
                f"{expected_sha256[:12]}…: the seeded generator or the Whisper encoder changed"
            )
    with torch.device("meta"):
        encoder = WhisperEncoder(dims)
    encoder.load_state_dict(state, strict=True, assign=True)
    return AudioEncoder(encoder, device=device)


def seeded_audio_spec(seed: int, dims: WhisperDims | None = None) -> dict[str, Any]:
    """The manifest entry of a seeded encoder (with the hash that loading checks)."""
    dims = dims or WhisperDims()
    return {
        "kind": "whisper-seeded",
        "init": SEEDED_INIT,
        "seed": int(seed),
        "dims": {k: v for k, v in vars(dims).items() if v is not None},
        "sha256": _seeded_sha256(dims, int(seed)),
    }


@lru_cache(maxsize=2)
def _seeded_sha256(dims: WhisperDims, seed: int) -> str:
    return state_sha256(_seeded_state(dims, seed))


# --------------------------------------------------------------------------- files


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_weights(
    state: Mapping[str, torch.Tensor],
    folder: str | os.PathLike,
    stem: str,
    dtype: str = "fp16",
    metadata: Mapping[str, str] | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> list[str]:
    """Write ``state`` as ``stem.safetensors`` (or ``stem-00001-of-0000N.safetensors`` shards of
    at most ``max_shard_bytes``), floating tensors cast to ``dtype``, each file atomically.
    Returns the file names written."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = _DTYPES[dtype]
    tensors = {}
    for k, v in state.items():
        v = v.detach().to("cpu")
        tensors[k] = (v.to(target) if v.is_floating_point() else v).contiguous()
    shards: list[dict[str, torch.Tensor]] = [{}]
    # a file is its tensors plus a JSON header (each entry's name, dtype, shape and offsets, and
    # the metadata): counted generously so that no file passes max_shard_bytes
    header = 8 + len(json.dumps(dict(metadata or {}))) + 64
    size = header
    for k in sorted(tensors):
        nbytes = tensors[k].numel() * tensors[k].element_size() + len(k) + 96
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = header
        shards[-1][k] = tensors[k]
        size += nbytes
    names = (
        [f"{stem}.safetensors"]
        if len(shards) == 1
        else [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for name, shard in zip(names, shards, strict=True):
        tmp = folder / (name + ".part")
        save_file(shard, str(tmp), metadata=dict(metadata or {}))
        os.replace(tmp, folder / name)
    return names


def _read_weights(folder: Path, files: list[str], what: str) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for name in files:
        part = unwrap_state_dict(read_checkpoint(folder / name), folder / name)
        overlap = set(part) & set(state)
        if overlap:
            raise CheckpointError(f"{what}: key {sorted(overlap)[0]!r} appears in two shards")
        state.update(part)
    return state


# --------------------------------------------------------------------------- bundles


@dataclass
class OwnBundle:
    """A loaded bundle: the three models (frozen, eval mode) and what the manifest says."""

    unet: UNet3D
    vae: Vae
    audio: AudioEncoder
    resolution: int
    num_frames: int
    manifest: dict[str, Any]
    path: Path
    load_seconds: float = 0.0
    name: str = field(default="")


def is_bundle(path: str | os.PathLike) -> bool:
    return (Path(path).expanduser() / MANIFEST).is_file()


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of bundle folder ``path``, format- and key-checked."""
    folder = Path(path).expanduser()
    file = folder / MANIFEST
    if not folder.exists():
        raise CheckpointNotFoundError(f"bundle not found: {folder}")
    if not file.is_file():
        raise CheckpointError(f"{folder} is not a lipsync bundle (no {MANIFEST})")
    try:
        manifest = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {file}: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise CheckpointError(f"{file}: format {got!r} is not {BUNDLE_FORMAT!r}")
    unknown = sorted(set(manifest) - _MANIFEST_KEYS)
    if unknown:
        raise CheckpointError(f"{file}: unknown manifest keys {', '.join(unknown)}")
    for key in ("resolution", "num_frames", "unet", "vae", "audio", "sha256"):
        if key not in manifest:
            raise CheckpointError(f"{file}: manifest has no {key!r}")
    return manifest


def verify_files(folder: Path, manifest: Mapping[str, Any]) -> None:
    """Every file the components list exists and has its recorded sha256 (and nothing is
    listed without a hash)."""
    hashes = manifest["sha256"]
    listed = [f for part in ("unet", "vae", "audio") for f in manifest[part].get("files", [])]
    for name in listed:
        if Path(name).name != name:
            raise CheckpointError(f"{folder}: file name {name!r} must not contain a path")
        path = folder / name
        if not path.is_file():
            raise CheckpointNotFoundError(f"bundle {folder} lacks {name}")
        if name not in hashes:
            raise CheckpointError(f"bundle {folder}: no sha256 recorded for {name}")
        got = file_sha256(path)
        if got != hashes[name]:
            raise CheckpointError(
                f"bundle {folder}: {name} has sha256 {got[:12]}…, the manifest says "
                f"{hashes[name][:12]}… (a damaged or replaced file)"
            )


def _unet_from_state(config: Mapping[str, Any], state, device, dtype, where) -> UNet3D:
    with torch.device("meta"):
        model = UNet3D.from_config(dict(config))
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_state_dict(expected, state, "U-Net", where)
    model.load_state_dict(_cast(state, device, dtype), strict=True, assign=True)
    return model.eval().requires_grad_(False)


def _vae_from_state(config: Mapping[str, Any], state, device, dtype, where, scaling) -> Vae:
    with torch.device("meta"):
        model = build_autoencoder(dict(config))
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_state_dict(expected, state, "VAE", where)
    model.load_state_dict(_cast(state, device, dtype), strict=True, assign=True)
    vae = Vae(model.eval().requires_grad_(False))
    vae.scaling_factor = float(scaling)
    return vae


def _cast(state, device, dtype) -> dict[str, torch.Tensor]:
    return {
        k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
        for k, v in state.items()
    }


def load_bundle(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> OwnBundle:
    """Load a bundle strictly (module docstring): U-Net and VAE in ``dtype`` on ``device``, the
    audio encoder in fp32."""
    start = time.perf_counter()
    folder = Path(path).expanduser()
    manifest = read_manifest(folder)
    verify_files(folder, manifest)
    device = torch.device(device)
    u, v, a = manifest["unet"], manifest["vae"], manifest["audio"]
    unet = _unet_from_state(
        u["config"], _read_weights(folder, u["files"], "U-Net"), device, dtype, folder / "unet"
    )
    vae = _vae_from_state(
        v["config"],
        _read_weights(folder, v["files"], "VAE"),
        device,
        dtype,
        folder / "vae",
        v.get("scaling_factor", 0.18215),
    )
    audio = load_audio_spec(a, folder, device)
    return OwnBundle(
        unet=unet,
        vae=vae,
        audio=audio,
        resolution=int(manifest["resolution"]),
        num_frames=int(manifest["num_frames"]),
        manifest=manifest,
        path=folder,
        load_seconds=time.perf_counter() - start,
        name=str(manifest.get("name", folder.name)),
    )


def load_audio_spec(spec: Mapping[str, Any], folder: Path, device) -> AudioEncoder:
    kind = spec.get("kind")
    if kind == "whisper-seeded":
        if spec.get("init") != SEEDED_INIT:
            raise CheckpointError(f"unknown seeded-encoder init {spec.get('init')!r}")
        dims = WhisperDims.from_dict(spec.get("dims", {}))
        return seeded_audio_encoder(int(spec["seed"]), dims, device, spec.get("sha256"))
    if kind == "whisper":
        state = _read_weights(folder, spec["files"], "Whisper encoder")
        dims = spec.get("dims", {})
        prefixed = {k if k.startswith("encoder.") else f"encoder.{k}": t for k, t in state.items()}
        return AudioEncoder.from_state_dict(prefixed, dims, device=device)
    raise CheckpointError(f"unknown audio encoder kind {kind!r} (whisper-seeded or whisper)")


def write_bundle(
    folder: str | os.PathLike,
    *,
    unet_state: Mapping[str, torch.Tensor],
    unet_config: Mapping[str, Any],
    vae_state: Mapping[str, torch.Tensor],
    vae_config: Mapping[str, Any],
    vae_scaling_factor: float,
    audio_spec: Mapping[str, Any],
    resolution: int,
    num_frames: int = 16,
    name: str = "",
    description: str = "",
    training: Mapping[str, Any] | None = None,
    dtype: str = "fp16",
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Write a bundle (weights first, the manifest last and atomically: a folder without a
    manifest is never mistaken for a bundle). The configs are checked against the states."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = UNetConfig.from_dict(dict(unet_config)).to_dict()
    with torch.device("meta"):
        expected = {
            k: v.shape for k, v in UNet3D(UNetConfig.from_dict(config)).state_dict().items()
        }
    check_state_dict(expected, unet_state, "U-Net", "unet state")
    with torch.device("meta"):
        vae_expected = {
            k: v.shape for k, v in build_autoencoder(dict(vae_config)).state_dict().items()
        }
    check_state_dict(vae_expected, vae_state, "VAE", "vae state")
    (folder / MANIFEST).unlink(missing_ok=True)
    unet_files = save_weights(unet_state, folder, "unet", dtype, max_shard_bytes=max_shard_bytes)
    vae_files = save_weights(vae_state, folder, "vae", dtype, max_shard_bytes=max_shard_bytes)
    audio = dict(audio_spec)
    files = unet_files + vae_files + list(audio.get("files", []))
    manifest = {
        "format": BUNDLE_FORMAT,
        "name": name or folder.name,
        "description": description,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "resolution": int(resolution),
        "num_frames": int(num_frames),
        "unet": {"config": _jsonable(config), "files": unet_files, "dtype": dtype,
                 "parameters": int(sum(t.numel() for t in unet_state.values()))},
        "vae": {"config": dict(vae_config), "files": vae_files, "dtype": dtype,
                "scaling_factor": float(vae_scaling_factor), "shift_factor": 0.0,
                "parameters": int(sum(t.numel() for t in vae_state.values()))},
        "audio": audio,
        "mask": "lipsync.face.mask.make_mask",
        "sha256": {f: file_sha256(folder / f) for f in files},
        "training": dict(training or {}),
    }  # fmt: skip
    tmp = folder / (MANIFEST + ".part")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, folder / MANIFEST)
    return folder


def bundle_denoise_defaults(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """Denoising settings a bundle asks for: a few-step student (``training.student``, written
    by the distillation, :mod:`lipsync.train.distill`) runs at its own step count, unguided, with
    its scheduler; other bundles ask for nothing ({}: the run's defaults)."""
    student = (manifest.get("training") or {}).get("student")
    if not student:
        return {}
    return {
        "steps": int(student["steps"]),
        "guidance": float(student.get("guidance", 1.0)),
        "scheduler": str(student.get("scheduler", "ddim")),
    }


def bundle_size_bytes(path: str | os.PathLike) -> int:
    folder = Path(path)
    manifest = read_manifest(folder)
    return (
        sum((folder / f).stat().st_size for f in manifest["sha256"])
        + (folder / MANIFEST).stat().st_size
    )


# --------------------------------------------------------------------------- single models


def unet_file_metadata(config: Mapping[str, Any], **extra: str) -> dict[str, str]:
    """safetensors metadata that makes a U-Net weights file self-describing."""
    return {"format": UNET_FILE_FORMAT, "config": json.dumps(_jsonable(dict(config))), **extra}


@dataclass(frozen=True)
class OwnUNetInfo:
    """What an own U-Net says about itself, read without its weights (:func:`own_unet_info`)."""

    config: dict[str, Any]  # the U-Net config it was built with
    resolution: int | None  # face size it was trained at, when recorded
    denoise: dict[str, Any] = field(default_factory=dict)  # a bundle's bundle_denoise_defaults


def own_unet_info(path: str | os.PathLike) -> OwnUNetInfo:
    """The config and training resolution of an own U-Net (the forms :func:`load_own_unet`
    reads), without loading weights. The resolution comes from a bundle's manifest, a file's
    metadata (``resolution``), or the ``config.json`` of the training run the folder or file is
    in (``model.resolution``); None when none of them records it."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointNotFoundError(f"U-Net checkpoint not found: {path}")
    if path.is_dir() and is_bundle(path):
        manifest = read_manifest(path)
        return OwnUNetInfo(
            dict(manifest["unet"]["config"]),
            int(manifest["resolution"]),
            bundle_denoise_defaults(manifest),
        )
    if path.is_dir():
        config_file = path / "unet_config.json"
        if not config_file.is_file():
            raise CheckpointError(
                f"{path} is neither a bundle nor a U-Net checkpoint folder (needs "
                "unet_config.json and unet.safetensors)"
            )
        return OwnUNetInfo(_read_json(config_file), _run_resolution(path))
    meta = read_safetensors_metadata(path)
    if meta.get("format") != UNET_FILE_FORMAT or "config" not in meta:
        raise CheckpointError(
            f"{path} does not say which U-Net it holds (no lipsync config in its metadata); "
            "load it with the preset's config instead"
        )
    resolution = int(meta["resolution"]) if "resolution" in meta else _run_resolution(path.parent)
    return OwnUNetInfo(json.loads(meta["config"]), resolution)


def _verified_part(
    folder: Path, key: str, what: str
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A bundle's manifest entry ``key`` and its weights, after checking every file's hash."""
    manifest = read_manifest(folder)
    verify_files(folder, manifest)
    part = manifest[key]
    return part, _read_weights(folder, part["files"], what)


def _read_json(file: Path) -> dict[str, Any]:
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {file}: {e}") from e


def _run_resolution(folder: Path) -> int | None:
    """``model.resolution`` of the training run's ``config.json`` in ``folder``, if any."""
    file = folder / "config.json"
    if not file.is_file():
        return None
    model = _read_json(file).get("model")
    resolution = model.get("resolution") if isinstance(model, dict) else None
    return int(resolution) if resolution else None


def load_own_unet(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> UNet3D:
    """A U-Net of ours, strictly: a bundle folder, a training checkpoint folder
    (``unet*.safetensors`` + ``unet_config.json``), or a ``.safetensors`` file whose metadata
    carries its config (:func:`unet_file_metadata`)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointNotFoundError(f"U-Net checkpoint not found: {path}")
    if path.is_dir() and is_bundle(path):
        u, state = _verified_part(path, "unet", "U-Net")
        return _unet_from_state(u["config"], state, device, dtype, path)
    if path.is_dir():
        config_file = path / "unet_config.json"
        files = sorted(p.name for p in path.glob("unet*.safetensors"))
        if not config_file.is_file() or not files:
            raise CheckpointError(
                f"{path} is neither a bundle nor a U-Net checkpoint folder (needs "
                "unet_config.json and unet.safetensors)"
            )
        config = json.loads(config_file.read_text())
        return _unet_from_state(config, _read_weights(path, files, "U-Net"), device, dtype, path)
    meta = read_safetensors_metadata(path)
    if meta.get("format") != UNET_FILE_FORMAT or "config" not in meta:
        raise CheckpointError(
            f"{path} does not say which U-Net it holds (no lipsync config in its metadata); "
            "load it with the preset's config instead"
        )
    state = unwrap_state_dict(read_checkpoint(path), path)
    return _unet_from_state(json.loads(meta["config"]), state, device, dtype, path)


def vae_file_metadata(config: Mapping[str, Any], scaling_factor: float, **extra: str):
    """safetensors metadata that makes a VAE weights file self-describing."""
    return {"format": VAE_FILE_FORMAT, "config": json.dumps(_jsonable(dict(config))),
            "scaling_factor": repr(float(scaling_factor)), **extra}  # fmt: skip


def load_own_vae(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype=torch.float32
) -> Vae:
    """One of our VAEs, strictly: a bundle, a ``lipsync train vae`` run folder
    (``vae.safetensors``), or a ``.safetensors`` file whose metadata carries config and scale
    (:func:`vae_file_metadata`)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointNotFoundError(f"VAE checkpoint not found: {path}")
    if path.is_dir() and is_bundle(path):
        v, state = _verified_part(path, "vae", "VAE")
        return _vae_from_state(v["config"], state, device, dtype, path, v["scaling_factor"])
    file = path / "vae.safetensors" if path.is_dir() else path
    meta = read_safetensors_metadata(file)
    if meta.get("format") != VAE_FILE_FORMAT or "config" not in meta:
        raise CheckpointError(f"{file} is not a lipsync VAE file (format {meta.get('format')!r})")
    state = unwrap_state_dict(read_checkpoint(file), file)
    scale = float(meta.get("scaling_factor", 0.18215))
    return _vae_from_state(json.loads(meta["config"]), state, device, dtype, file, scale)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return obj


# --------------------------------------------------------------------------- small tagged models


def save_tagged_module(
    module: torch.nn.Module,
    path: str | os.PathLike,
    fmt: str,
    config: Mapping[str, Any],
    **extra: str,
) -> None:
    """Write a small model of ours (lip reader, phone head, video encoder) as one safetensors
    file whose metadata holds ``format`` = ``fmt``, its JSON ``config`` and ``extra``; weights as
    they are, on the CPU; atomically (``<path>.part`` + rename). Read back with
    :func:`read_tagged_config` and :func:`load_tagged_state`."""
    from safetensors.torch import save_file

    meta = {"format": fmt, "config": json.dumps(dict(config)), **extra}
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    tmp = f"{path}.part"
    save_file(state, tmp, metadata=meta)
    os.replace(tmp, path)


def read_tagged_config(path: str | os.PathLike, fmt: str, what: str) -> dict[str, Any]:
    """The config stored in a :func:`save_tagged_module` file of format ``fmt``; a missing file
    or another format is a :class:`~lipsync.errors.CheckpointError` naming ``what`` it should
    be."""
    if not os.path.isfile(path):
        raise CheckpointNotFoundError(f"{what} not found: {path}")
    meta = read_safetensors_metadata(path)
    if meta.get("format") != fmt:
        raise CheckpointError(f"{path} is not a {what} file (format {meta.get('format')!r})")
    return json.loads(meta["config"])


def load_tagged_state(
    module: torch.nn.Module, path: str | os.PathLike, what: str
) -> torch.nn.Module:
    """Strictly load the weights of a :func:`save_tagged_module` file into ``module`` (built
    from its :func:`read_tagged_config`); returns ``module``."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    check_state_dict({k: v.shape for k, v in module.state_dict().items()}, state, what, path)
    module.load_state_dict(state, strict=True)
    return module
