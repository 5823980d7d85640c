"""``lipsync train …``: the command group (registered by :mod:`lipsync.cli`).

Heavy imports (torch, media, models) happen inside the commands, so ``lipsync --help`` and
argument errors stay fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

train_app = typer.Typer(
    no_args_is_help=True,
    help="Train SyncNet and the U-Net.",
)


@train_app.command("syncnet")
def syncnet(
    config: Annotated[
        Path,
        typer.Argument(
            help="Training config (JSON), e.g. lipsync/configs/syncnet_synth_train.json "
            "(a packaged config's file name also works)."
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Run folder (resumed if it holds checkpoints).")
    ],
    data: Annotated[
        str | None, typer.Option(help="Override the data: a processed corpus folder or 'toy'.")
    ] = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many steps.")] = None,
    max_minutes: Annotated[
        float | None, typer.Option(help="Stop (checkpoint, export) after this much wall time.")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Global batch size.")] = None,
    num_workers: Annotated[int | None, typer.Option(help="DataLoader workers per process.")] = None,
    checkpoint_every: Annotated[int | None, typer.Option(help="Steps between checkpoints.")] = None,
    val_every: Annotated[int | None, typer.Option(help="Steps between validations.")] = None,
    log_every: Annotated[int | None, typer.Option(help="Steps between log records.")] = None,
    gradient_checkpointing: Annotated[
        bool | None,
        typer.Option(
            "--gradient-checkpointing/--no-gradient-checkpointing",
            help="Recompute activations in the backward pass (less memory).",
        ),
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="cuda or cpu (default: cuda if present).")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Train a SyncNet (LatentSync's recipe). Several GPUs:
    torchrun --nproc_per_node N -m lipsync.cli train syncnet CONFIG --out RUN"""
    from lipsync.train.syncnet import SyncNetTrainConfig, train_syncnet

    cfg = SyncNetTrainConfig.from_file(
        config,
        data=data,
        max_steps=max_steps,
        max_minutes=max_minutes,
        batch_size=batch_size,
        num_workers=num_workers,
        checkpoint_every=checkpoint_every,
        val_every=val_every,
        log_every=log_every,
        gradient_checkpointing=gradient_checkpointing,
    )
    summary = train_syncnet(cfg, out, device=device, show_progress=not quiet)
    if summary.get("export") is None:  # not the main process
        return
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    val, test = summary.get("val"), summary.get("test")
    lines = [f"{summary['name']}: {summary['steps']} steps ({summary['stopped']})"]
    if val:
        lines.append(f"val  accuracy {val['accuracy']:.3f}, loss {val['loss']:.4f}")
    if test:
        lines.append(f"test accuracy {test['accuracy']:.3f}, loss {test['loss']:.4f}")
    lines.append(f"model: {summary['export']}")
    typer.echo("\n".join(lines))
