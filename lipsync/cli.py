"""The ``lipsync`` command.

Errors a user can act on (:class:`lipsync.errors.LipSyncError`) print one line, ``error: …``, and
exit non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from lipsync.errors import LipSyncError

app = typer.Typer(
    name="lipsync",
    help="Lip-sync a talking-head video to new audio (LatentSync 1.5 / 1.6 compatible).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


@app.command()
def download(
    version: Annotated[
        str, typer.Option("--version", "-v", help="Model version: 1.6 or 1.5.")
    ] = "1.6",
    dir: Annotated[
        Path | None,
        typer.Option("--dir", help="Cache folder (default $LIPSYNC_HOME or ~/.cache/lipsync)."),
    ] = None,
    source: Annotated[
        Path | None,
        typer.Option(
            "--from", help="Copy from a local mirror laid out like the Hub repos instead."
        ),
    ] = None,
) -> None:
    """Fetch the official U-Net, Whisper and VAE checkpoints (resumable)."""
    from lipsync.checkpoints import download as fetch
    from lipsync.config import get_preset

    preset = get_preset(version)
    paths = fetch(preset.name, root=dir, mirror=source, progress=True)
    for name, path in paths.items():
        console.print(f"{name:8s} {path}")
    console.print(f"[green]{preset.name} checkpoints ready[/green]")


@app.command()
def presets(
    dir: Annotated[Path | None, typer.Option("--dir", help="Checkpoint cache folder.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List model presets and whether their checkpoints are downloaded."""
    from lipsync.checkpoints import checkpoint_paths, require_checkpoints
    from lipsync.config import PRESETS

    rows = []
    for preset in PRESETS.values():
        if preset.random_weights:
            status = "random weights (built in)"
        else:
            try:
                require_checkpoints(preset, dir)
                status = "downloaded"
            except LipSyncError:
                status = f"missing: lipsync download --version {preset.name.lstrip('v')}"
        rows.append(
            {
                "name": preset.name,
                "resolution": preset.resolution,
                "unet_config": preset.unet_config_file,
                "hf_repo": preset.hf_repo,
                "checkpoints": status,
                "paths": None
                if preset.random_weights
                else {k: str(v) for k, v in checkpoint_paths(preset, dir).items()},
                "description": preset.description,
            }
        )
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table("preset", "px", "checkpoints", "description")
    for row in rows:
        table.add_row(row["name"], str(row["resolution"]), row["checkpoints"], row["description"])
    Console().print(table)


@app.command()
def check(
    preset: Annotated[str, typer.Option("--preset", "-p", help="v1.6, v1.5 or tiny.")] = "tiny",
    dir: Annotated[Path | None, typer.Option("--dir", help="Checkpoint cache folder.")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    dtype: Annotated[str, typer.Option(help="fp32, fp16 or bf16.")] = "fp32",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Load a preset's models strictly and run one denoising call on synthetic input."""
    from lipsync.models.bundle import check_preset

    report = check_preset(preset, root=dir, device=device, dtype=dtype)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    for key, value in report.items():
        console.print(f"{key:22s} {value}")


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the Typer app, turning user errors into one line and exit code."""
    start = time.perf_counter()
    try:
        app(args=argv, standalone_mode=False)
    except LipSyncError as e:
        console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted after {time.perf_counter() - start:.1f} s[/yellow]")
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:  # click usage errors come as ClickException subclasses
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(130)
        raise


if __name__ == "__main__":
    main()
