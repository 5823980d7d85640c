"""Precompiled artefacts: compiled speed without the compile wait.

``lipsync warmup`` compiles a preset the way ``lipsync run --compile`` does, runs every shape a
denoising mode needs once, and saves PyTorch's portable compile caches
(:func:`torch.compiler.save_cache_artifacts`: inductor's FX graphs, on CUDA with their Triton
kernels bundled, the AOTAutograd entries and autotuning results) as one file, with a JSON
manifest of what they were built for. Every process that loads through
:func:`lipsync.loading.load_models` with compilation on (``lipsync run``, ``app``, the workers'
engine runner, the Triton server, the Python API) looks for a matching artefact first and
hot-loads it (:func:`torch.compiler.load_cache_artifacts`), so its first chunk finds compiled
code in the caches instead of compiling it.

What they cannot save: Dynamo still traces the compiled blocks in every new process (its
bytecode is not portable), and on the CPU inductor's C++ kernels are rebuilt (only their source
is in the artefacts). Both are measured in docs/PERFORMANCE.md ("Cold start").

Keying (:class:`ArtefactKey`): the device (GPU name and compute capability, or the CPU's
instruction set), the versions of torch, Triton and diffusers, a hash of the code that is
compiled (``lipsync/models``, ``lipsync/accel/compile.py``), the preset, the models' architecture
(:func:`model_fingerprint`: an own U-Net under a preset's name is another model), dtype, compile
mode, FP8, and the chunk length. Which denoising plans were warmed (guided/unguided, full/DeepCache
steps) is listed in the manifest (:func:`plan_items`): ``--compile auto`` runs what they cover
compiled and anything else eagerly, never compiling in the foreground.

Files live in ``$LIPSYNC_COMPILED_DIR`` (read first; a folder baked into an image) and in
``$LIPSYNC_HOME/compiled`` (``~/.cache/lipsync/compiled``, where ``lipsync warmup`` writes by
default); each artefact is ``<digest>.bin`` + ``<digest>.json``, written atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import tempfile
from dataclasses import asdict, dataclass, fields
from importlib import metadata
from pathlib import Path

import torch

from lipsync.config import cache_dir
from lipsync.errors import ConfigError

FORMAT = 2  # manifest format (2: the models' fingerprint in the key)
ENV_DIR = "LIPSYNC_COMPILED_DIR"
_CODE = ("models", "accel/compile.py")  # what is compiled: a change invalidates the artefacts


@dataclass(frozen=True)
class ArtefactKey:
    """Everything compiled code depends on; two keys must be equal for an artefact to be used."""

    device: str  # "NVIDIA H200 (sm_90)", "cpu (x86_64 AVX2)"
    torch: str
    triton: str
    diffusers: str
    code: str  # hash of the compiled lipsync code
    preset: str
    models: str  # fingerprint of the U-Net's and VAE's parameters (names, shapes): architecture
    dtype: str
    compile: str  # regional, full, full-cudagraphs
    fp8: bool
    frames: int  # frames per chunk the shapes were compiled for

    def differences(self, other: ArtefactKey, ignore: tuple[str, ...] = ()) -> list[str]:
        """``field: theirs != ours`` for each field that differs (``self`` is ours)."""
        return [
            f"{f.name} {getattr(other, f.name)!s} != {getattr(self, f.name)!s}"
            for f in fields(self)
            if f.name not in ignore and getattr(self, f.name) != getattr(other, f.name)
        ]

    def digest(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:20]


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"
    return f"cpu ({platform.machine()} {torch.backends.cpu.get_cpu_capability()})"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "none"


def code_hash() -> str:
    """Hash of the sources whose compiled form the artefacts hold."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for part in _CODE:
        path = root / part
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            h.update(file.relative_to(root).as_posix().encode())
            h.update(file.read_bytes())
    return h.hexdigest()[:16]


def model_fingerprint(*modules: torch.nn.Module) -> str:
    """What the compiled graphs depend on of the models themselves: every parameter's and
    buffer's name and shape (a preset's own U-Net or bundle has another architecture under the
    same preset name). Weights' values do not matter."""
    h = hashlib.sha256()
    for module in modules:
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            h.update(f"{name}:{tuple(t.shape)};".encode())
        h.update(b"|")
    return h.hexdigest()[:16]


def artefact_key(
    preset: str,
    device: torch.device,
    dtype: str,
    compile: str,
    fp8: bool,
    frames: int,
    models: str = "",
) -> ArtefactKey:
    """The key of this process's compiled code for these load options (``models``: the loaded
    models' :func:`model_fingerprint`)."""
    return ArtefactKey(
        device=device_description(device), torch=torch.__version__,
        triton=_version("triton") if device.type == "cuda" else "none",
        diffusers=_version("diffusers"), code=code_hash(), preset=preset, models=models,
        dtype=dtype, compile=compile, fp8=bool(fp8), frames=int(frames),
    )  # fmt: skip


def compiled_dirs(explicit: str | os.PathLike | None = None) -> list[Path]:
    """Where artefacts are looked for, in order: ``explicit`` (or ``$LIPSYNC_COMPILED_DIR``),
    then ``$LIPSYNC_HOME/compiled``."""
    first = explicit or os.environ.get(ENV_DIR)
    dirs = [Path(first).expanduser()] if first else []
    home = cache_dir() / "compiled"
    return dirs + ([home] if home not in dirs else [])


@dataclass
class Artefact:
    path: Path  # the .bin file
    key: ArtefactKey
    plans: list[str]  # plan_items of what was warmed
    manifest: dict


def _read_manifest(path: Path) -> Artefact | None:
    try:
        manifest = json.loads(path.read_text())
        key = ArtefactKey(**manifest["key"])
        bin_path = path.with_suffix(".bin")
        if manifest.get("format") != FORMAT or not bin_path.is_file():
            return None
        return Artefact(bin_path, key, list(manifest.get("plans", [])), manifest)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # unreadable or foreign: not ours


def find(
    key: ArtefactKey, dirs: list[Path], any_compile: bool = False
) -> tuple[Artefact | None, list[Artefact]]:
    """The first artefact built for ``key`` (any compile mode with ``any_compile``), and the
    others found (built for something else)."""
    ignore = ("compile",) if any_compile else ()
    others = []
    for d in dirs:
        for manifest in sorted(d.glob("*.json")) if d.is_dir() else []:
            art = _read_manifest(manifest)
            if art is None:
                continue
            if not key.differences(art.key, ignore):
                return art, others
            others.append(art)
    return None, others


def mismatch_message(key: ArtefactKey, others: list[Artefact]) -> str:
    """One line: why the artefacts found do not fit (the closest one's differences)."""
    closest = min(others, key=lambda a: len(key.differences(a.key)))
    diffs = "; ".join(key.differences(closest.key))
    return (
        f"precompiled artefacts in {closest.path.parent} were built for another setting "
        f"({diffs}); running eagerly. Build them here with: lipsync warmup --preset "
        f"{key.preset} --dtype {key.dtype}"
    )


def load(artefact: Artefact) -> int:
    """Hot-load ``artefact`` into this process's compile caches; returns the entries loaded.
    ConfigError when the file cannot be read or holds nothing (torch only logs a damaged one,
    with a traceback, and loads nothing: silenced here, reported as one error)."""
    torch_log = logging.getLogger("torch.compiler._cache")
    level = torch_log.level
    torch_log.setLevel(logging.CRITICAL)
    try:
        info = torch.compiler.load_cache_artifacts(artefact.path.read_bytes())
    except Exception as exc:  # a damaged or foreign file: the caller falls back
        raise ConfigError(f"cannot load precompiled artefacts {artefact.path}: {exc}") from exc
    finally:
        torch_log.setLevel(level)
    entries = sum(len(v) for v in info.artifacts.values()) if info is not None else 0
    if not entries:
        raise ConfigError(f"cannot load precompiled artefacts {artefact.path}: damaged or empty")
    return entries


def save(
    directory: str | os.PathLike, key: ArtefactKey, plans: list[str], extra: dict | None = None
) -> Artefact:
    """Save everything this process compiled (or found in its caches) as the artefact of
    ``key``, atomically (temp files + rename). ConfigError when nothing was compiled."""
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        raise ConfigError("nothing was compiled in this process: no artefacts to save")
    data, info = saved
    folder = Path(directory).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    digest = key.digest()
    manifest = {
        "format": FORMAT,
        "key": asdict(key),
        "plans": sorted(set(plans)),
        "entries": {k: len(v) for k, v in info.artifacts.items()},
        "bytes": len(data),
        **(extra or {}),
    }
    bin_path, json_path = folder / f"{digest}.bin", folder / f"{digest}.json"
    _atomic_write(bin_path, data)
    _atomic_write(json_path, (json.dumps(manifest, indent=2) + "\n").encode())
    return Artefact(bin_path, key, manifest["plans"], manifest)


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def plan_items(plan: list[tuple[bool, bool]], cache_branch: int, frames: int) -> list[str]:
    """The compiled shapes a denoising plan (``DenoiseOptions.plan()``) needs, as names:
    ``f16-guided-full``, ``f16-cond-cached-b0``… (the VAE's shapes come with any of them)."""
    items = set()
    for guided, full in plan:
        kind = "guided" if guided else "cond"
        items.add(f"f{frames}-{kind}-" + ("full" if full else f"cached-b{cache_branch}"))
    return sorted(items)


def compile_counters() -> dict[str, int]:
    """This process's compile activity so far: graphs Dynamo captured, and inductor's FX-graph
    cache hits (code from the caches or a loaded artefact) and misses (compiled from scratch)."""
    from torch._dynamo.utils import counters

    return {
        "graphs": int(counters["stats"]["unique_graphs"]),
        "fxgraph_cache_hit": int(counters["inductor"]["fxgraph_cache_hit"]),
        "fxgraph_cache_miss": int(counters["inductor"]["fxgraph_cache_miss"]),
    }
