"""``lipsync eval …``: the command group (registered by :mod:`lipsync.cli`).

Heavy imports (torch, media, models) happen inside the commands, so ``lipsync --help`` and
argument errors stay fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

eval_app = typer.Typer(
    no_args_is_help=True,
    help="Measure lip-sync quality: sync confidence, reconstruction metrics, benchmark suites.",
)
console = Console(stderr=True)

_SYNCNET_HELP = (
    "SyncNet checkpoint: a file from 'lipsync train syncnet' or the official stable_syncnet.pt "
    "(default: $LIPSYNC_SYNCNET, else the one shipped with lipsync)."
)
_SYNCNET_CONFIG_HELP = "Model config of a checkpoint that carries none (default: the official)."
_DEVICE_HELP = "cuda or cpu (default: cuda if present)."


def _syncnet_config(path: Path | None) -> dict | None:
    from lipsync.errors import ConfigError

    if path is None:
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read SyncNet config {path}: {e}") from e


@eval_app.command("sync")
def sync(
    video: Annotated[Path, typer.Argument(help="Talking-head video.")],
    audio: Annotated[
        Path | None, typer.Option(help="Audio to score against (default: the video's own).")
    ] = None,
    syncnet: Annotated[Path | None, typer.Option(help=_SYNCNET_HELP)] = None,
    syncnet_config: Annotated[Path | None, typer.Option(help=_SYNCNET_CONFIG_HELP)] = None,
    aligned: Annotated[
        bool, typer.Option(help="The video already shows aligned face crops (no face tracking).")
    ] = False,
    max_offset: Annotated[int, typer.Option(help="Search offsets -N..N frames.")] = 15,
    stride: Annotated[int, typer.Option(help="Frames between scored windows.")] = 1,
    plot: Annotated[
        Path | None, typer.Option(help="Write a PNG: distance per offset, confidence over time.")
    ] = None,
    device: Annotated[str | None, typer.Option(help=_DEVICE_HELP)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Audio-visual sync of a video: offset (frames, + = audio lags video), confidence (LSE-C
    style), distance (LSE-D style), per window."""
    from lipsync.eval.sync import NOT_COMPARABLE, SyncScorer, score_video

    scorer = SyncScorer.from_checkpoint(syncnet, device, _syncnet_config(syncnet_config))
    result = score_video(
        scorer, video, audio, aligned=aligned, max_offset=max_offset, stride=stride
    )
    if plot is not None:
        from lipsync.eval.report import plot_sync

        plot_sync(result, plot, title=video.name)
    if as_json:
        typer.echo(json.dumps(result.as_dict()))
        return
    typer.echo(
        f"offset {result.offset:+d} frames   confidence {result.confidence:.3f}   "
        f"distance {result.distance:.3f}   ({len(result.windows)} windows, "
        f"{result.frames_with_face}/{result.frames} frames with a face)"
    )
    typer.echo(f"SyncNet: {result.syncnet}")
    typer.echo(f"note: {NOT_COMPARABLE}")


@eval_app.command("syncnet-accuracy")
def syncnet_accuracy(
    data: Annotated[str, typer.Argument(help="A processed corpus folder (or 'toy').")],
    syncnet: Annotated[Path | None, typer.Option(help=_SYNCNET_HELP)] = None,
    syncnet_config: Annotated[Path | None, typer.Option(help=_SYNCNET_CONFIG_HELP)] = None,
    split: Annotated[str, typer.Option(help="Which split's pairs.")] = "test",
    pairs: Annotated[int, typer.Option(help="Pairs to evaluate (the reference uses 2048).")] = 2048,
    batch_size: Annotated[int, typer.Option(help="Pairs per batch.")] = 64,
    num_workers: Annotated[int, typer.Option(help="DataLoader workers.")] = 4,
    seed: Annotated[int, typer.Option(help="Which pairs (seeded choice).")] = 0,
    device: Annotated[str | None, typer.Option(help=_DEVICE_HELP)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """SyncNet accuracy on in-sync / off-sync pairs of a split (cosine > 0.5 = in sync)."""
    import time

    import torch

    from lipsync.data.pair_sources import open_syncnet_pairs
    from lipsync.eval.sync import SyncScorer
    from lipsync.eval.syncnet_accuracy import evaluate_pairs

    scorer = SyncScorer.from_checkpoint(syncnet, device, _syncnet_config(syncnet_config))
    model = scorer.model
    dataset = open_syncnet_pairs(data, split, model.config.num_frames, seed)
    start = time.perf_counter()
    amp = torch.bfloat16 if scorer.device.type == "cuda" else None
    metrics = evaluate_pairs(
        model, dataset, max_pairs=pairs, batch_size=batch_size, device=scorer.device,
        autocast_dtype=amp, num_workers=num_workers, seed=seed,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    report = {
        "syncnet": scorer.name,
        "data": str(data),
        "split": split,
        **metrics.as_dict(),
        "seconds": seconds,
        "pairs_per_s": metrics.pairs / seconds,
    }
    if as_json:
        typer.echo(json.dumps(report))
        return
    typer.echo(
        f"accuracy {metrics.accuracy:.4f}  loss {metrics.loss:.4f}  on {metrics.pairs} {split} "
        f"pairs ({metrics.positives} in sync); mean cosine in sync {metrics.cos_in_sync:.3f}, "
        f"off sync {metrics.cos_off_sync:.3f}"
    )
    typer.echo(f"SyncNet: {scorer.name}")


@eval_app.command("compare")
def compare(
    out: Annotated[Path, typer.Argument(help="Lip-synced output video.")],
    ref: Annotated[Path, typer.Argument(help="The original video (same audio).")],
    fid: Annotated[bool, typer.Option("--fid", help="Also compute FID (needs weights).")] = False,
    fvd: Annotated[bool, typer.Option("--fvd", help="Also compute FVD (needs weights).")] = False,
    fid_weights: Annotated[
        Path | None, typer.Option(help="TorchScript Inception (inception-2015-12-05.pt).")
    ] = None,
    fvd_weights: Annotated[
        Path | None, typer.Option(help="TorchScript I3D (i3d_torchscript.pt).")
    ] = None,
    max_frames: Annotated[int | None, typer.Option(help="Compare at most N frames.")] = None,
    device: Annotated[str | None, typer.Option(help=_DEVICE_HELP)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Reconstruction metrics of OUT against REF: PSNR/SSIM (frame, mouth), lip landmarks,
    lip-opening correlation, mouth flicker; FID/FVD with their networks' weights."""
    from lipsync.eval.compare import compare_videos

    result = compare_videos(
        out, ref, fid_weights=fid_weights, fvd_weights=fvd_weights, want_fid=fid,
        want_fvd=fvd, max_frames=max_frames, device=device,
    )  # fmt: skip
    d = result.as_dict()
    if as_json:
        typer.echo(json.dumps(d))
        return
    for key, value in d.items():
        if key == "notes":
            for note in value:
                typer.echo(f"note: {note}")
        elif value is not None:
            typer.echo(
                f"{key:22s} {value:.4f}" if isinstance(value, float) else f"{key:22s} {value}"
            )


@eval_app.command("suite")
def suite(
    data: Annotated[
        Path, typer.Argument(help="A processed corpus folder, or a folder of clips (*.mp4).")
    ],
    model: Annotated[
        str, typer.Option(help="Preset (v1.6, v1.5, tiny) or a U-Net checkpoint file.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Report folder.")],
    preset: Annotated[
        str, typer.Option(help="Architecture of a --model checkpoint file.")
    ] = "v1.5",
    split: Annotated[str, typer.Option(help="Split of a processed corpus.")] = "test",
    clips: Annotated[int | None, typer.Option(help="Use at most N clips.")] = None,
    steps: Annotated[int, typer.Option(help="Denoising steps.")] = 20,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 1247,
    syncnet: Annotated[Path | None, typer.Option(help=_SYNCNET_HELP)] = None,
    syncnet_config: Annotated[Path | None, typer.Option(help=_SYNCNET_CONFIG_HELP)] = None,
    device: Annotated[str | None, typer.Option(help=_DEVICE_HELP)] = None,
    dir: Annotated[Path | None, typer.Option("--dir", help="Checkpoint cache folder.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Benchmark a model on held-out clips: reconstruction (own audio) and dubbing (another
    clip's audio); writes suite.json, suite.md, report.html and PNG charts into --out."""
    from lipsync.eval.suite import SuiteOptions, run_suite

    options = SuiteOptions(
        model=model, preset=preset, split=split, max_clips=clips, steps=steps, seed=seed,
        device=device, checkpoint_dir=dir, syncnet=syncnet,
        syncnet_config=_syncnet_config(syncnet_config),
    )  # fmt: skip
    summary = run_suite(data, out, options, show_progress=not quiet)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    typer.echo((out / "suite.md").read_text())
    typer.echo(f"report: {out / 'report.html'}")
