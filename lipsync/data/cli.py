"""``lipsync data …``: the command group (registered by :mod:`lipsync.cli`).

Heavy imports (torch, media, models) happen inside the commands, so ``lipsync --help`` and
argument errors stay fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

data_app = typer.Typer(
    no_args_is_help=True,
    help="Make training data: a synthetic corpus, or process real footage.",
)


@data_app.command("synth")
def synth(
    out: Annotated[Path, typer.Argument(help="Output folder (created; re-running resumes).")],
    clips: Annotated[int, typer.Option("--clips", help="Number of clips.")] = ...,
    seed: Annotated[int, typer.Option(help="Corpus seed: same seed, same clips.")] = 0,
    faces: Annotated[
        Path | None,
        typer.Option(help="Folder of face videos / images (a sub-folder = one identity)."),
    ] = None,
    resolution: Annotated[int, typer.Option(help="Frame size in pixels (square).")] = 256,
    workers: Annotated[int, typer.Option(help="Worker processes (0: one per CPU core).")] = 0,
    base: Annotated[
        list[Path] | None,
        typer.Option(
            help="Base footage video (repeatable); default: shared/media/demo1_video.mp4."
        ),
    ] = None,
    no_demo: Annotated[
        bool, typer.Option("--no-demo", help="Do not use the demo clip as base footage.")
    ] = False,
    min_words: Annotated[int, typer.Option(help="Fewest words per clip.")] = 13,
    max_words: Annotated[int, typer.Option(help="Most words per clip.")] = 19,
    max_source_seconds: Annotated[
        float, typer.Option(help="Use at most this much of each base video.")
    ] = 30.0,
) -> None:
    """Generate a synthetic talking-face corpus with exact phone timings (docs/DATA.md)."""
    import json

    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.table import Table

    from lipsync.data.synth.corpus import SynthOptions, run_synth
    from lipsync.data.synth.faces import default_base_video
    from lipsync.errors import ConfigError

    console = Console(stderr=True)
    bases = list(base or [])
    if not no_demo and not bases:
        demo = default_base_video()
        if demo is not None:
            bases.append(demo)
        elif faces is None:
            raise ConfigError(
                "the demo clip shared/media/demo1_video.mp4 was not found: set LIPSYNC_SHARED, "
                "or give footage with --base or --faces"
            )
    options = SynthOptions(
        out=out, clips=clips, seed=seed, resolution=resolution, faces=faces,
        base=tuple(bases), workers=workers, min_words=min_words, max_words=max_words,
        max_source_seconds=max_source_seconds,
    )  # fmt: skip
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )
    state = {"task": None, "frames": 0, "t0": 0.0}

    def on_start(total: int, done: int) -> None:
        import time

        state["t0"] = time.perf_counter()
        state["task"] = progress.add_task("clips", total=total, completed=done, rate="")

    def on_clip(row: dict) -> None:
        import time

        state["frames"] += row["frames"]
        fps = state["frames"] / max(time.perf_counter() - state["t0"], 1e-9)
        progress.update(state["task"], advance=1, rate=f"{fps:.1f} frames/s")

    with progress:
        summary = run_synth(
            options, on_start=on_start, on_clip=on_clip, on_status=lambda m: console.print(m)
        )
    table = Table(title=f"synthetic corpus {out}")
    for col in ("split", "clips", "frames", "minutes"):
        table.add_column(col, justify="right")
    for split, row in summary.per_split.items():
        table.add_row(split, str(row["clips"]), str(row["frames"]), f"{row['frames'] / 1500:.1f}")
    console.print(table)
    console.print(
        f"generated {summary.generated} clips ({summary.skipped} already done), "
        f"{summary.frames_generated} frames in {summary.wall_s:.1f} s: "
        f"{summary.frames_per_s:.1f} frames/s, {summary.cpu_ms_per_frame:.1f} ms CPU per frame"
    )
    print(
        json.dumps(
            {
                "out": str(out),
                "clips": summary.clips,
                "generated": summary.generated,
                "skipped": summary.skipped,
                "frames_generated": summary.frames_generated,
                "wall_s": round(summary.wall_s, 2),
                "frames_per_s": round(summary.frames_per_s, 2),
                "cpu_ms_per_frame": round(summary.cpu_ms_per_frame, 2),
                "per_split": summary.per_split,
            }
        )
    )
