"""``manifest.json``: what an export folder holds (written last, so its presence means complete).

The ONNX Runtime engine and the TensorRT build read everything they need from it: the preset
and face resolution, the precision, the VAE's latent scaling, Whisper's dimensions, the file
of each graph, and the parity figures measured at export time.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from lipsync.errors import ConfigError

Precision = Literal["fp32", "fp16"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "fp16")
MANIFEST = "manifest.json"
FORMAT = 1


def make_readable(path: Path) -> None:
    """Give ``path`` the permissions a plain ``open()`` would (temporary files and ONNX's
    external data start as owner-only), so a server under another user can read exports."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
        make_readable(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class Manifest:
    preset: str
    resolution: int  # face crop size in pixels; latents are resolution / 8
    precision: Precision
    weights: str  # "checkpoint" or "random (seed S)"
    opset: int
    torch_version: str
    scaling_factor: float  # VAE latent scaling (latents = (z - shift) * scale)
    shift_factor: float
    whisper_dims: dict[str, int | None]
    max_frames: int = 24  # frames per U-Net chunk: the motion modules' position table
    exporter: str = "torch.onnx (TorchScript tracer)"
    files: dict[str, str] = field(default_factory=dict)  # graph name -> file in the folder
    verification: dict[str, dict[str, float]] = field(default_factory=dict)
    format: int = FORMAT

    @property
    def latent_size(self) -> int:
        return self.resolution // 8

    def write(self, folder: Path) -> None:
        write_json_atomic(Path(folder) / MANIFEST, asdict(self))

    @classmethod
    def read(cls, folder: str | os.PathLike) -> Manifest:
        """The manifest of an export folder; ConfigError naming the fix if there is none."""
        path = Path(folder).expanduser() / MANIFEST
        if not path.is_file():
            raise ConfigError(
                f"{path.parent} is not a complete ONNX export (no {MANIFEST}); "
                "run: lipsync export onnx --preset PRESET " + str(path.parent)
            )
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read {path}: {e}") from None
        if data.get("format") != FORMAT:
            raise ConfigError(
                f"{path} has format {data.get('format')!r}, this lipsync reads {FORMAT}; "
                "export again with this version"
            )
        try:
            return cls(**data)
        except TypeError as e:
            raise ConfigError(f"{path} is not a lipsync export manifest: {e}") from None

    def path(self, folder: str | os.PathLike, graph: str) -> Path:
        """The file of ``graph`` in ``folder`` (ConfigError if the export lacks it)."""
        if graph not in self.files:
            raise ConfigError(f"the export in {folder} has no {graph} graph")
        path = Path(folder).expanduser() / self.files[graph]
        if not path.is_file():
            raise ConfigError(f"{path} is missing; export again")
        return path
