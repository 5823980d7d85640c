"""``lipsync train …``: the command group (registered by :mod:`lipsync.cli`).

Heavy imports (torch, media, models) happen inside the commands, so ``lipsync --help`` and
argument errors stay fast.
"""

from __future__ import annotations

import typer

train_app = typer.Typer(
    no_args_is_help=True,
    help="Train SyncNet and the U-Net.",
)


# ----------------------------------------------------------------------------- U-Net and VAE


def _finish(summary: dict, as_json: bool, lines: list[str]) -> None:
    """Print the summary; a run stopped by a signal exits 128 + its number (checkpoint kept)."""
    import json as _json

    if as_json:
        typer.echo(_json.dumps(summary, indent=2, default=str))
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
