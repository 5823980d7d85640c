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
    init: Annotated[
        Path | None,
        typer.Option(help="Start from this SyncNet file (e.g. a shipped one) instead of the seed."),
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
        init=str(init) if init else None,
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


# ----------------------------------------------------------------------------- U-Net and VAE


def _finish(summary: dict, as_json: bool, lines: list[str]) -> None:
    """Print the summary; a run stopped by a signal exits 128 + its number (checkpoint kept)."""
    if as_json:
        typer.echo(json.dumps(summary, indent=2, default=str))
    else:
        typer.echo("\n".join(lines))
    if summary.get("signal"):
        raise typer.Exit(128 + int(summary["signal"]))


@train_app.command("unet")
def unet(
    config: str = typer.Argument(
        ...,
        help="Training config (YAML/JSON, ours or a reference configs/unet/*.yaml), or a packaged "
        "one by name: stage1, stage2, stage2_efficient, stage1_512, stage2_512, demo_stage1 ...",
    ),
    out: str | None = typer.Option(None, "--out", "-o", help="Run folder (default: output_dir)."),
    overrides: list[str] = typer.Option(
        [],
        "--set",
        help="Override a config value: --set data.root=/corpus --set train.max_steps=10",
    ),
    device: str | None = typer.Option(None, help="cuda or cpu (default: cuda if present)."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue the run in --out."),
    resume_from: str | None = typer.Option(
        None, help="Continue from another run folder's newest checkpoint."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Train the LatentSync U-Net (stage 1 or 2). Several GPUs:
    torchrun --nproc_per_node N -m lipsync.cli train unet CONFIG"""
    from lipsync.train.config import load_unet_config, resolve_config_path
    from lipsync.train.unet import train_unet

    cfg = load_unet_config(resolve_config_path(config), overrides)
    summary = train_unet(cfg, out, device, show_progress=not quiet, resume=resume,
                         resume_from=resume_from)  # fmt: skip
    if summary.get("world_size", 1) > 1 and not _is_main():
        return
    lines = [
        f"{summary['name']}: step {summary['steps']} ({summary['stopped']}), "
        f"{summary['trainable_parameters']:,} of {summary['parameters']:,} parameters trained",
        f"weights: {summary['export']}",
    ]
    _finish(summary, as_json, lines)


@train_app.command("vae")
def vae(
    config: str = typer.Argument(..., help="VAE training config (YAML/JSON) or packaged name."),
    out: str | None = typer.Option(None, "--out", "-o", help="Run folder (default: output_dir)."),
    overrides: list[str] = typer.Option([], "--set", help="Override a config value (a.b=value)."),
    device: str | None = typer.Option(None, help="cuda or cpu (default: cuda if present)."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue the run in --out."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Train a small VAE (diffusers AutoencoderKL, 8x downsampling, 4 latent channels) on face
    crops; reports its reconstruction PSNR on the validation frames."""
    from lipsync.train.config import load_vae_config, resolve_config_path
    from lipsync.train.vae import train_vae

    cfg = load_vae_config(resolve_config_path(config), overrides)
    summary = train_vae(cfg, out, device, show_progress=not quiet, resume=resume)
    if summary.get("world_size", 1) > 1 and not _is_main():
        return
    val = summary.get("val") or {}
    lines = [f"{summary['name']}: step {summary['steps']} ({summary['stopped']})"]
    if "psnr" in val:
        lines.append(f"val PSNR {val['psnr']:.2f} dB, latent scaling factor "
                     f"{summary['scaling_factor']:.4f}")  # fmt: skip
    lines.append(f"weights: {summary['export']}")
    _finish(summary, as_json, lines)


def _is_main() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"
