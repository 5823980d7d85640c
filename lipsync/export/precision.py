"""Where would fp16 overflow? Per layer, the largest activation magnitude on real input.

Runs the PyTorch pipeline (fp32, CPU) on the first frames of a clip with a forward hook on
every module of the U-Net, the VAE and Whisper, and records for each module its largest
``|output|`` over the whole run (every denoising step, both guidance halves) and the fp16
headroom ``65504 / max|output|``: below 1 the value does not fit in fp16, below 2 one more
doubling overflows. For every normalisation it also records the largest sum of squares over
one normalisation group — what a naive fp16 accumulation of the variance would have to hold
(the exported fp16 graphs compute every normalisation in fp32, :mod:`lipsync.export.fp16`).

Writes ``precision.jsonl`` (one line per module, network order), ``precision.md`` (the
tightest modules) and ``precision.png`` (headroom of every module, per part).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lipsync.audio import AudioEncoder, load_audio
from lipsync.export.manifest import write_json_atomic
from lipsync.export.weights import ExportModels
from lipsync.loading import ModelBundle
from lipsync.media import read_frames
from lipsync.pipeline import LipSyncPipeline, RunOptions

FP16_MAX = 65504.0
NORMS = (nn.GroupNorm, nn.LayerNorm)


@dataclass
class LayerRange:
    part: str  # unet, vae, audio
    name: str  # module path inside the part
    kind: str  # module class
    max_abs: float = 0.0
    calls: int = 0
    group_sum_sq: float | None = None  # norms: largest sum of x^2 over one group
    group_size: int | None = None

    @property
    def headroom(self) -> float:
        return FP16_MAX / self.max_abs if self.max_abs > 0 else math.inf

    def as_dict(self) -> dict:
        d = asdict(self)
        d["headroom"] = self.headroom if math.isfinite(self.headroom) else None
        d["fp16_overflow"] = self.max_abs > FP16_MAX
        d["fp16_stats_overflow"] = bool(self.group_sum_sq and self.group_sum_sq > FP16_MAX)
        return d


def _max_abs(value) -> float:
    if isinstance(value, torch.Tensor):
        ok = value.is_floating_point() and value.numel()
        return float(value.detach().abs().max()) if ok else 0.0
    if isinstance(value, tuple | list):
        return max((_max_abs(v) for v in value), default=0.0)
    return 0.0


def _group_sum_sq(module: nn.Module, x: torch.Tensor) -> tuple[float, int]:
    """Largest sum of x^2 over one normalisation group, and the group's size."""
    x = x.detach().float()
    if isinstance(module, nn.GroupNorm):
        groups = x.reshape(x.shape[0], module.num_groups, -1)  # 5D input: groups span frames
    else:
        groups = x.reshape(-1, math.prod(module.normalized_shape))
    return float(groups.pow(2).sum(-1).max()), groups.shape[-1]


class RangeRecorder:
    """Forward hooks on every named module of each part; ``layers`` in registration order."""

    def __init__(self, parts: dict[str, nn.Module]):
        self.layers: dict[tuple[str, str], LayerRange] = {}
        self._handles = []
        for part, root in parts.items():
            for name, module in root.named_modules():
                if not name or isinstance(module, nn.ModuleList | nn.Sequential | nn.Dropout):
                    continue
                entry = LayerRange(part, name, type(module).__name__)
                self.layers[(part, name)] = entry
                self._handles.append(module.register_forward_hook(self._hook(entry, module)))

    @staticmethod
    def _hook(entry: LayerRange, module: nn.Module):
        def hook(_module, inputs, output):
            entry.calls += 1
            entry.max_abs = max(entry.max_abs, _max_abs(output))
            if isinstance(module, NORMS) and inputs:
                total, size = _group_sum_sq(module, inputs[0])
                entry.group_sum_sq = max(entry.group_sum_sq or 0.0, total)
                entry.group_size = size

        return hook

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> RangeRecorder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def activation_ranges(
    models: ExportModels,
    video: str | os.PathLike,
    audio: str | os.PathLike,
    frames: int = 16,
    options: RunOptions | None = None,
) -> list[LayerRange]:
    """Run the pipeline on the first ``frames`` frames of ``video`` with ``audio`` and return
    every module's range (modules that never ran are left out)."""
    pictures = read_frames(video, stop=frames)
    wav = load_audio(audio)[: int(round(len(pictures) / 25 * 16000))]
    bundle = ModelBundle(
        models.preset,
        models.unet,
        models.vae,
        AudioEncoder(models.whisper),
        torch.device("cpu"),
        torch.float32,
        0.0,
    )
    parts = {"unet": models.unet, "vae": models.vae.autoencoder, "audio": models.whisper}
    with RangeRecorder(parts) as recorder:
        LipSyncPipeline(bundle).run_arrays(pictures, wav, options or RunOptions())
    return [layer for layer in recorder.layers.values() if layer.calls]


def write_report(
    layers: list[LayerRange], out_dir: str | os.PathLike, title: str, top: int = 25
) -> dict:
    """precision.jsonl / .md / .png in ``out_dir``; returns a summary."""
    folder = Path(out_dir).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".precision.jsonl.tmp"
    with tmp.open("w") as f:
        for layer in layers:
            f.write(json.dumps(layer.as_dict()) + "\n")
    os.replace(tmp, folder / "precision.jsonl")

    tight = sorted(layers, key=lambda x: x.headroom)[:top]
    norms = [x for x in layers if x.group_sum_sq is not None]
    worst_norm = max(norms, key=lambda x: x.group_sum_sq, default=None)
    summary = {
        "title": title,
        "layers": len(layers),
        "overflowing": sum(x.max_abs > FP16_MAX for x in layers),
        "min_headroom": min((x.headroom for x in layers), default=math.inf),
        "tightest": f"{tight[0].part}.{tight[0].name}" if tight else None,
        "norms_with_fp16_stats_overflow": sum(x.group_sum_sq > FP16_MAX for x in norms),
        "largest_group_sum_sq": worst_norm.group_sum_sq if worst_norm else None,
        "largest_group_sum_sq_at": f"{worst_norm.part}.{worst_norm.name}" if worst_norm else None,
    }
    lines = [
        f"# fp16 headroom: {title}",
        "",
        f"{summary['layers']} modules; {summary['overflowing']} with values past 65504; "
        f"smallest headroom {summary['min_headroom']:.3g} ({summary['tightest']}). "
        f"{summary['norms_with_fp16_stats_overflow']} of {len(norms)} normalisations have a "
        "group whose sum of squares exceeds 65504 (a naive fp16 variance would overflow; the "
        "exported fp16 graphs keep normalisations in fp32).",
        "",
        "| part | module | kind | max abs | headroom (65504 / max) | largest group sum x^2 |",
        "| --- | --- | --- | ---: | ---: | ---: |",
    ]
    for x in tight:
        sumsq = f"{x.group_sum_sq:.4g} (n={x.group_size})" if x.group_sum_sq is not None else ""
        lines.append(
            f"| {x.part} | `{x.name}` | {x.kind} | {x.max_abs:.4g} | {x.headroom:.3g} | {sumsq} |"
        )
    (folder / "precision.md").write_text("\n".join(lines) + "\n")
    plot_headroom(layers, folder / "precision.png", title)
    write_json_atomic(folder / "precision_summary.json", summary)
    return summary


def plot_headroom(layers: list[LayerRange], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = sorted({x.part for x in layers}, key=["audio", "vae", "unet"].index)
    fig, axes = plt.subplots(len(parts), 1, figsize=(12, 3 * len(parts)), squeeze=False)
    for ax, part in zip(axes[:, 0], parts, strict=True):
        values = np.array([x.headroom for x in layers if x.part == part])
        values = np.clip(values, 1e-2, 1e8)
        ax.semilogy(values, ".", markersize=3)
        ax.axhline(1.0, color="red", linewidth=1, label="fp16 overflow (65504)")
        ax.axhline(2.0, color="orange", linewidth=1, linestyle="--", label="one doubling left")
        ax.set_ylabel("65504 / max|out|")
        ax.set_title(f"{part}: {len(values)} modules, network order")
        ax.legend(loc="upper right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
