"""Find, download and strictly load the official LatentSync checkpoints.

This module reads files, validates them against the models of :mod:`lipsync.models` (which know
nothing about files) and downloads them; building a whole preset is :mod:`lipsync.loading`'s job.

The reference loads the U-Net with ``strict=False`` and so silently runs half-random models when
handed the wrong file. We never do: every key must be present, expected and of the right shape,
or a :class:`~lipsync.errors.CheckpointError` names the first few offending keys, the counts and
the likely cause.

Files (per version, in ``lipsync.config.cache_dir()/<version>/``):
  latentsync_unet.pt   U-Net weights (``{"state_dict": ...}`` or a bare state dict)
  whisper/tiny.pt      OpenAI Whisper-tiny (``{"dims", "model_state_dict"}``)
and ``cache_dir()/sd-vae-ft-mse/`` holds the diffusers VAE (config.json + safetensors).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from lipsync.config import (
    UNET_FILE,
    VAE_FILES,
    VAE_REPO,
    WHISPER_FILE,
    Preset,
    cache_dir,
    get_preset,
)
from lipsync.errors import CheckpointError, CheckpointNotFoundError, one_line
from lipsync.models.unet import UNet3D
from lipsync.models.vae import SD_VAE_FT_MSE_CONFIG, Vae, build_autoencoder
from lipsync.models.whisper import WhisperDims, WhisperEncoder

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_SHOW = 5  # keys named in an error message


# --------------------------------------------------------------------------- reading files


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a ``.safetensors`` or pickle-free ``.pt`` file onto the CPU, memory-mapped if possible.

    Returns the top-level mapping as stored (wrappers such as ``{"state_dict": ...}`` included).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"expected a checkpoint file, got a directory: {path}")
    if path.suffix in SAFETENSORS_SUFFIXES:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {path} as safetensors: {e}") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e) and "zip" not in str(e):
            raise CheckpointError(f"cannot read {path}: {one_line(e)}") from e
        try:  # legacy (non-zip) torch files cannot be memory-mapped
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e2:  # noqa: BLE001 - any failure here means "not a checkpoint"
            raise CheckpointError(f"cannot read {path}: {one_line(e2)}") from e2
    except Exception as e:  # noqa: BLE001 - unpickling errors come in many types
        raise CheckpointError(
            f"cannot read {path} as a PyTorch checkpoint ({one_line(e)}); only weights-only "
            "files (tensors and plain containers) are accepted"
        ) from e
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return dict(obj)


def unwrap_state_dict(obj: Mapping[str, Any], path: str | os.PathLike = "") -> dict[str, Any]:
    """Accept ``{"state_dict": {...}}`` (training checkpoints), OpenAI's ``{"model_state_dict":
    {...}}`` or a bare ``{name: tensor}``."""
    inner = obj
    for wrapper in ("state_dict", "model_state_dict"):
        if isinstance(obj.get(wrapper), Mapping):
            inner = obj[wrapper]
            break
    state = {k: v for k, v in inner.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise CheckpointError(f"{path or 'checkpoint'} contains no tensors")
    return state


def guess_checkpoint_kind(keys: Iterable[str], top_level: Iterable[str] = ()) -> str | None:
    """Name the model a state dict most likely belongs to (for error messages)."""
    keys = list(keys)
    top = set(top_level)
    if "dims" in top or "model_state_dict" in top:
        return "a Whisper checkpoint (whisper/tiny.pt)"
    if any(k.startswith(("encoder.blocks.", "decoder.blocks.")) for k in keys):
        return "a Whisper checkpoint (whisper/tiny.pt)"
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in keys) or any(
        k.startswith("quant_conv") for k in keys
    ):
        return "a VAE checkpoint (sd-vae-ft-mse)"
    if any(k.startswith(("audio_encoder.", "visual_encoder.")) for k in keys):
        return "a SyncNet checkpoint (stable_syncnet.pt)"
    if any(k.startswith(("down_blocks.", "conv_in.")) for k in keys):
        return "a U-Net checkpoint"
    return None


def check_state_dict(
    expected: Mapping[str, torch.Size | tuple[int, ...]],
    state: Mapping[str, torch.Tensor],
    what: str,
    path: str | os.PathLike = "",
    top_level: Iterable[str] = (),
) -> None:
    """Raise a CheckpointError unless ``state`` has exactly the expected keys and shapes."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        (k, tuple(state[k].shape), tuple(expected[k]))
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k])
    ]
    if not (missing or unexpected or mismatched):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:_SHOW])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:_SHOW])})")
    if mismatched:
        shown = ", ".join(f"{k}: file {list(a)} vs model {list(b)}" for k, a, b in mismatched[:3])
        parts.append(f"{len(mismatched)} keys of the wrong shape ({shown})")
    cause = _likely_cause(what, expected, state, missing, unexpected, top_level, mismatched)
    source = f" {path}" if path else ""
    raise CheckpointError(
        f"checkpoint{source} does not fit the {what} ({len(state)} tensors in the file, "
        f"{len(expected)} in the model): {'; '.join(parts)}. Likely cause: {cause}"
    )


def _likely_cause(what, expected, state, missing, unexpected, top_level, mismatched=()) -> str:
    kind = guess_checkpoint_kind(state.keys(), top_level)
    if kind and "U-Net" not in kind and "U-Net" in what:
        return f"this is {kind}, not a U-Net: pass the file for the right model"
    if kind and "Whisper" in what and "Whisper" not in kind:
        return f"this is {kind}, not a Whisper encoder"
    if "SyncNet" in what:
        if kind and "SyncNet" not in kind:
            return f"this is {kind}, not a SyncNet: pass the file for the right model"
        if mismatched or missing or unexpected:
            return (
                "a SyncNet of another size or layout: give the config it was trained with "
                "(--syncnet-config), or a file written by lipsync train syncnet (which carries it)"
            )
    if missing and all(".motion_modules." in k for k in missing):
        return (
            "the file has no (or fewer) motion-module weights: a stage-1 or 'efficient' checkpoint "
            "used with a stage-2 config, or the wrong model version"
        )
    if unexpected and all(".motion_modules." in k for k in unexpected):
        return (
            "the file has motion modules the config lacks: a stage-2 checkpoint used with a "
            "stage-1/efficient config, or the wrong model version"
        )
    if len(missing) > len(expected) // 2:
        return "a file for a different model or a different model version"
    return "a different model version or a truncated/edited file"


def convert_state_dict(
    state: dict[str, torch.Tensor], device: str | torch.device, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Floating tensors to ``dtype`` on ``device`` (others keep their dtype), one at a time:
    each original is dropped from ``state`` as soon as it is converted, so the weights are never
    held twice."""
    out = {}
    for key in list(state):
        t = state.pop(key)
        target = dtype if t.is_floating_point() else t.dtype
        out[key] = t.to(device=device, dtype=target)
    return out


# Older diffusers files (sd-vae-ft-mse among them) name the VAE's attention projections
# differently from today's AutoencoderKL.
VAE_DEPRECATED_ATTENTION_NAMES = {
    ".query.": ".to_q.",
    ".key.": ".to_k.",
    ".value.": ".to_v.",
    ".proj_attn.": ".to_out.0.",
}


def rename_vae_attention_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A VAE state dict with the older attention key names (``query/key/value/proj_attn``)
    renamed to ``AutoencoderKL``'s (``to_q/to_k/to_v/to_out.0``); other keys unchanged."""
    out = {}
    for key, value in state.items():
        if ".attentions." in key:
            for old, new in VAE_DEPRECATED_ATTENTION_NAMES.items():
                key = key.replace(old, new)
        out[key] = value
    return out


WHISPER_ENCODER_PREFIX = "encoder."


def whisper_encoder_state_dict(
    state: Mapping[str, torch.Tensor], model: WhisperEncoder
) -> dict[str, torch.Tensor]:
    """Select the ``encoder.*`` entries of an OpenAI Whisper state dict and check them strictly.

    Every non-``encoder.`` key (the text decoder) is ignored. Among the ``encoder.`` keys, any
    missing, unexpected or mis-shaped one raises :class:`CheckpointError` naming the first few.
    Returns the entries with the prefix removed (``model``'s own names).
    """
    prefix = WHISPER_ENCODER_PREFIX
    enc = {k: v for k, v in state.items() if k.startswith(prefix)}
    expected = {prefix + k: v.shape for k, v in model.state_dict().items()}
    check_state_dict(expected, enc, "Whisper encoder", top_level=state.keys())
    return {k[len(prefix) :]: v for k, v in enc.items()}


# --------------------------------------------------------------------------- models


def load_unet(
    path: str | os.PathLike,
    config: Mapping[str, Any],
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
):
    """Build the U-Net from ``config`` and load ``path`` strictly, without a second weight copy.

    The model is created on the meta device (no memory), the file is memory-mapped, and each
    tensor is converted once to the requested dtype and device before being assigned.
    """
    raw = read_checkpoint(path)
    state = unwrap_state_dict(raw, path)
    with torch.device("meta"):
        model = UNet3D.from_config(dict(config))
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_state_dict(expected, state, "U-Net", path, top_level=raw.keys())
    model.load_state_dict(convert_state_dict(state, device, dtype), strict=True, assign=True)
    return model.eval().requires_grad_(False)


def load_vae(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Vae:
    """Load the VAE from a folder (``config.json`` + ``diffusion_pytorch_model.safetensors``) or
    a single weights file (the sd-vae-ft-mse config is then assumed). Strict: every key must fit
    (after :func:`rename_vae_attention_keys`)."""
    path = Path(path).expanduser()
    if path.is_dir():
        config_file = path / "config.json"
        weights = next(
            (
                path / n
                for n in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
                if (path / n).is_file()
            ),
            None,
        )
        if weights is None or not config_file.is_file():
            raise CheckpointNotFoundError(
                f"VAE folder {path} needs config.json and diffusion_pytorch_model.safetensors; "
                "run: lipsync download"
            )
        try:
            config = json.loads(config_file.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read VAE config {config_file}: {e}") from e
    else:
        weights, config = path, SD_VAE_FT_MSE_CONFIG
    state = rename_vae_attention_keys(unwrap_state_dict(read_checkpoint(weights), weights))
    with torch.device("meta"):
        model = build_autoencoder(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_state_dict(expected, state, "VAE", weights)
    model.load_state_dict(convert_state_dict(state, device, dtype), strict=True, assign=True)
    return Vae(model.eval().requires_grad_(False))


def load_whisper_encoder(
    state: Mapping[str, torch.Tensor], dims: Mapping[str, Any] | WhisperDims
) -> WhisperEncoder:
    """A :class:`WhisperEncoder` (on the CPU, fp32 as stored) from an OpenAI state dict and its
    ``dims``, checked strictly (:func:`whisper_encoder_state_dict`)."""
    if not isinstance(dims, WhisperDims):
        if not isinstance(dims, Mapping):
            raise CheckpointError(f"Whisper dims must be a dict, got {type(dims).__name__}")
        dims = WhisperDims.from_dict(dims)
    with torch.device("meta"):
        encoder = WhisperEncoder(dims)
    encoder.load_state_dict(whisper_encoder_state_dict(state, encoder), strict=True, assign=True)
    return encoder


def read_whisper_checkpoint(path: str | os.PathLike) -> WhisperEncoder:
    """Load an OpenAI Whisper file (``{"dims", "model_state_dict"}``, e.g. ``tiny.pt``)."""
    ckpt = read_checkpoint(path)
    if "dims" not in ckpt or "model_state_dict" not in ckpt:
        raise CheckpointError(
            f"{path} is not an OpenAI Whisper checkpoint (expected keys 'dims' and "
            "'model_state_dict')"
        )
    return load_whisper_encoder(ckpt["model_state_dict"], ckpt["dims"])


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a ``.safetensors`` file ({} for other files or none stored)."""
    path = Path(path).expanduser()
    if path.suffix not in SAFETENSORS_SUFFIXES or not path.is_file():
        return {}
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path} as safetensors: {e}") from e


SYNCNET_OFFICIAL_CONFIG = "syncnet_16_pixel_attn_config.json"
SYNCNET_FORMAT = "lipsync.syncnet/1"


def load_syncnet(
    path: str | os.PathLike,
    config: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[Any, dict[str, Any]]:
    """Load a SyncNet strictly: ``(model, info)``, the model in eval mode without gradients.

    The architecture comes from ``config`` when given, else from the config stored in the file
    (files written by :func:`save_syncnet` / ``lipsync train syncnet``), else the official
    ``syncnet_16_pixel_attn`` config (``stable_syncnet.pt``). ``info`` holds ``name`` (how
    reports name this SyncNet), ``path``, ``config`` and the file's other metadata.
    """
    from lipsync.config import load_packaged_config
    from lipsync.models.syncnet import StableSyncNet

    path = Path(path).expanduser()
    raw = read_checkpoint(path)
    meta = read_safetensors_metadata(path)
    if not meta and isinstance(raw.get("lipsync"), Mapping):
        meta = {k: v for k, v in raw["lipsync"].items() if isinstance(v, str)}
    state = unwrap_state_dict(raw, path)
    if config is not None:
        cfg, source = dict(config), "given config"
    elif "config" in meta:
        try:
            cfg, source = json.loads(meta["config"]), "config stored in the file"
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: the stored SyncNet config is not JSON ({e})") from e
    else:
        cfg, source = load_packaged_config(SYNCNET_OFFICIAL_CONFIG), "official config"
    with torch.device("meta"):
        model = StableSyncNet.from_config(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_state_dict(expected, state, f"SyncNet ({source})", path, top_level=raw.keys())
    model.load_state_dict(convert_state_dict(state, device, dtype), strict=True, assign=True)
    name = meta.get("name") or (
        f"{path.name} (official StableSyncNet architecture)"
        if source == "official config"
        else path.name
    )
    info = {**meta, "name": name, "path": str(path), "config": model.config.to_dict()}
    return model.eval().requires_grad_(False), info


def save_syncnet(
    model: torch.nn.Module,
    path: str | os.PathLike,
    name: str,
    metadata: Mapping[str, str] | None = None,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Write a SyncNet as safetensors (``dtype`` storage) with its config and ``name`` in the
    metadata, atomically (temporary file + rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    meta = {
        **dict(metadata or {}),
        "format": SYNCNET_FORMAT,
        "name": name,
        "config": json.dumps(model.config.to_dict()),
    }
    tmp = path.with_name(path.name + ".part")
    save_file(state, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------- finding files


def version_dir(preset: Preset, root: Path | None = None) -> Path:
    return (root or cache_dir()) / preset.name


def vae_dir(root: Path | None = None) -> Path:
    return (root or cache_dir()) / "sd-vae-ft-mse"


def checkpoint_paths(preset: Preset, root: Path | None = None) -> dict[str, Path]:
    """Where ``lipsync download`` puts each file of ``preset``."""
    base = version_dir(preset, root)
    return {
        "unet": base / UNET_FILE,
        "whisper": base / WHISPER_FILE,
        "vae": vae_dir(root),
    }


def require_checkpoints(
    preset: Preset, root: Path | None = None, parts: tuple[str, ...] = ("unet", "whisper", "vae")
) -> dict[str, Path]:
    """The paths of ``preset``'s files (those of ``parts``: ``lipsync run --unet`` needs no
    official U-Net), or one clear error naming the download command."""
    paths = {k: v for k, v in checkpoint_paths(preset, root).items() if k in parts}
    absent = [str(p) for name, p in paths.items() if not _present(name, p)]
    if absent:
        where = f" --dir {root}" if root else ""
        raise CheckpointNotFoundError(
            f"{preset.name} checkpoints not found ({', '.join(absent)}); "
            f"run: lipsync download --version {preset.name.lstrip('v')}{where}"
        )
    return paths


def _present(name: str, path: Path) -> bool:
    if name == "vae":
        return all((path / f).is_file() for f in VAE_FILES)
    return path.is_file()


def download(
    version: str = "1.6",
    root: Path | None = None,
    mirror: Path | None = None,
    progress: bool = True,
) -> dict[str, Path]:
    """Fetch ``version``'s U-Net, Whisper and VAE files into the cache (resumable).

    With ``mirror``, files are copied from a local directory laid out like the Hugging Face repos
    (``<mirror>/ByteDance/LatentSync-1.6/latentsync_unet.pt``, ``<mirror>/stabilityai/
    sd-vae-ft-mse/config.json`` …) — for air-gapped machines. Otherwise they come from the Hub
    through ``huggingface_hub`` (which resumes partial downloads and honours ``HF_HUB_OFFLINE``).
    """
    preset = get_preset(version)
    if preset.bundle is not None:
        raise CheckpointError(
            f"preset {preset.name!r} is a bundle shipped with lipsync; nothing to download"
        )
    if preset.hf_repo is None:
        raise CheckpointError(f"preset {preset.name!r} has random weights; nothing to download")
    paths = checkpoint_paths(preset, root)
    # (repo, file in the repo, local folder mirroring the repo): our layout is the repos' layout.
    jobs = [
        (preset.hf_repo, UNET_FILE, version_dir(preset, root)),
        (preset.hf_repo, WHISPER_FILE, version_dir(preset, root)),
        *[(VAE_REPO, f, paths["vae"]) for f in VAE_FILES],
    ]
    todo = [(repo, f, d) for repo, f, d in jobs if not (d / f).is_file()]
    if todo and mirror is None:
        _require_hub(*todo[0][:2])  # offline: one line now, not minutes of retries
    for repo, filename, local_dir in todo:
        dest = local_dir / filename
        dest.parent.mkdir(parents=True, exist_ok=True)
        if mirror is not None:
            _copy_from_mirror(Path(mirror) / repo / filename, dest)
        else:
            try:
                _fetch_from_hub(repo, filename, local_dir, progress)
            finally:
                _remove_idle_locks(local_dir)
    return paths


def _copy_from_mirror(src: Path, dest: Path) -> None:
    if not src.is_file():
        raise CheckpointNotFoundError(f"mirror has no file {src}")
    tmp = dest.with_name(dest.name + ".part")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


_RETRY_HINT = (
    "connect and run: lipsync download, or copy the files from a machine that has them with: "
    "lipsync download --from DIR"
)


def _require_hub(repo: str, filename: str) -> None:
    """One request to the Hub (``HF_ENDPOINT``), no retries: CheckpointNotFoundError in one line
    when offline mode is on or the Hub does not answer. ``huggingface_hub`` itself retries a
    refused connection five times with back-off (about 30 s of warnings) before giving up."""
    from huggingface_hub import constants, hf_hub_url
    from huggingface_hub.utils import get_session

    what = f"cannot download {repo}/{filename}"
    if constants.HF_HUB_OFFLINE:
        raise CheckpointNotFoundError(
            f"{what}: offline mode is on (HF_HUB_OFFLINE); unset it and run: lipsync download, "
            "or copy the files from a machine that has them with: lipsync download --from DIR"
        )
    try:  # any HTTP answer (even 401/404) means the Hub is reachable; hf_hub_download decides
        get_session().head(hf_hub_url(repo, filename), timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except Exception as exc:  # the HTTP client's connection / timeout / proxy errors
        raise CheckpointNotFoundError(
            f"{what}: offline or {constants.ENDPOINT} is unreachable ({one_line(exc)}); "
            f"{_RETRY_HINT}"
        ) from None


def _fetch_from_hub(repo: str, filename: str, local_dir: Path, progress: bool) -> None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    (enable_progress_bars if progress else disable_progress_bars)()
    try:  # local_dir mode resumes partial downloads (metadata under local_dir/.cache)
        hf_hub_download(repo_id=repo, filename=filename, local_dir=local_dir)
    except LocalEntryNotFoundError as e:
        raise CheckpointNotFoundError(
            f"cannot download {repo}/{filename}: offline or the Hub is unreachable "
            f"({one_line(e)}); {_RETRY_HINT}"
        ) from e
    except OSError as e:
        raise CheckpointError(f"download of {repo}/{filename} failed: {one_line(e)}") from e


def _remove_idle_locks(local_dir: Path) -> None:
    """Delete the lock files ``huggingface_hub`` leaves under ``local_dir/.cache`` (it never
    removes them), except those another process holds right now."""
    from filelock import FileLock, Timeout

    for path in (local_dir / ".cache" / "huggingface").rglob("*.lock"):
        lock = FileLock(path, timeout=0)
        try:
            with lock:
                path.unlink(missing_ok=True)
        except (Timeout, OSError):
            continue  # in use (a concurrent download) or not ours to delete
