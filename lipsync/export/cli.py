"""``lipsync export …``: the command group (registered by :mod:`lipsync.cli`).

Heavy imports (torch, onnx, media, models) happen inside the commands, so ``lipsync --help`` and
argument errors stay fast.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

export_app = typer.Typer(
    no_args_is_help=True,
    help="Export models to ONNX and build TensorRT engines.",
)
console = Console(stderr=True)


def _models(preset: str, random_weights: bool, seed: int):
    """fp32 CPU models of ``preset``: its checkpoints, or seeded random weights."""
    import torch

    from lipsync.config import get_preset
    from lipsync.export.weights import ExportModels, random_models
    from lipsync.loading import load_models

    chosen = get_preset(preset)
    if random_weights or chosen.random_weights:
        return random_models(chosen, seed)
    bundle = load_models(chosen, device="cpu", dtype=torch.float32)
    return ExportModels.from_bundle(bundle, "checkpoint")


class _GraphProgress:
    """One line per graph on stderr: started, done (seconds) or skipped (resumed)."""

    def __init__(self):
        self.started: dict[str, float] = {}

    def __call__(self, graph: str, event: str) -> None:
        if event == "start":
            self.started[graph] = time.perf_counter()
            console.print(f"{graph:>14}: building …", highlight=False)
        elif event == "done":
            seconds = time.perf_counter() - self.started.get(graph, time.perf_counter())
            console.print(f"{graph:>14}: done in {seconds:.1f} s", highlight=False)
        else:
            console.print(f"{graph:>14}: already there (resumed)", highlight=False)


@export_app.command("onnx")
def export_onnx_command(
    out_dir: Annotated[Path, typer.Argument(help="Folder for the .onnx files and manifest.json.")],
    preset: Annotated[str, typer.Option("--preset", "-p", help="v1.6, v1.5 or tiny.")] = "v1.6",
    random_weights: Annotated[
        bool, typer.Option(help="The preset's architecture with seeded random weights.")
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed of --random-weights.")] = 0,
    fp16: Annotated[
        bool,
        typer.Option(help="fp16 graphs; normalisations, softmax, timestep embedding stay fp32."),
    ] = False,
    verify: Annotated[
        bool, typer.Option(help="Compare each graph with PyTorch in ONNX Runtime (CPU).")
    ] = True,
    force: Annotated[bool, typer.Option(help="Replace an export already in OUT_DIR.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
) -> None:
    """Export the U-Net, VAE encoder and decoder and Whisper encoder to ONNX (docs/EXPORT.md)."""
    from dataclasses import asdict

    from lipsync.export.onnx_export import ExportOptions, export_onnx

    options = ExportOptions(precision="fp16" if fp16 else "fp32", verify=verify, force=force)
    options.validate()
    models = _models(preset, random_weights, seed)
    manifest = export_onnx(models, out_dir, options, on_graph=_GraphProgress())
    if as_json:
        typer.echo(json.dumps(asdict(manifest), indent=2))
        return
    console.print(
        f"exported {manifest.preset} ({manifest.precision}, weights: {manifest.weights}) to "
        f"{out_dir}",
        highlight=False,
    )
    for graph, figures in manifest.verification.items():
        console.print(
            f"{graph:>14}: max rel. error {figures['max_rel_error']:.2e}, "
            f"cosine {figures['cosine']:.7f} vs PyTorch",
            highlight=False,
        )


@export_app.command("tensorrt")
def export_tensorrt_command(
    onnx_dir: Annotated[Path, typer.Argument(help="A folder made by lipsync export onnx.")],
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Where the .plan files go (ONNX_DIR/tensorrt).")
    ] = None,
    max_clips: Annotated[int, typer.Option(help="Chunks per U-Net call (profile maximum).")] = 1,
    workspace_gib: Annotated[float, typer.Option(help="Builder workspace in GiB.")] = 8.0,
) -> None:
    """Build strongly typed TensorRT engines from an ONNX export (needs TensorRT and a GPU)."""
    from lipsync.export.tensorrt import build_engines

    report = build_engines(
        onnx_dir, out_dir, max_clips=max_clips, workspace_gib=workspace_gib,
        on_graph=_GraphProgress(),
    )  # fmt: skip
    typer.echo(json.dumps(report, indent=2))


@export_app.command("precision")
def export_precision_command(
    video: Annotated[Path, typer.Argument(help="A talking-head clip (e.g. the demo clip).")],
    audio: Annotated[Path, typer.Argument(help="Its audio.")],
    out_dir: Annotated[Path, typer.Argument(help="Folder for precision.jsonl/.md/.png.")],
    preset: Annotated[str, typer.Option("--preset", "-p", help="v1.6, v1.5 or tiny.")] = "v1.6",
    random_weights: Annotated[
        bool, typer.Option(help="The preset's architecture with seeded random weights.")
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed of --random-weights.")] = 0,
    frames: Annotated[int, typer.Option(help="Frames of the clip to run (from the start).")] = 16,
    steps: Annotated[int, typer.Option(help="Denoising steps.")] = 20,
) -> None:
    """Per layer, the largest activation on real input and its fp16 headroom (65504 / max)."""
    from lipsync.errors import ConfigError
    from lipsync.export.precision import activation_ranges, write_report
    from lipsync.pipeline import RunOptions

    if frames < 1:
        raise ConfigError(f"--frames must be at least 1, got {frames}")
    options = RunOptions(steps=steps)
    options.validate()
    models = _models(preset, random_weights, seed)
    layers = activation_ranges(models, video, audio, frames, options)
    title = f"{models.preset.name}, weights {models.weights}, {video.name}, {frames} frames"
    summary = write_report(layers, out_dir, title)
    typer.echo(json.dumps(summary, indent=2))
