"""``lipsync data …``: the command group (registered by :mod:`lipsync.cli`).

Heavy imports (torch, media, models) happen inside the commands, so ``lipsync --help`` and
argument errors stay fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lipsync.progress import stderr_bars

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
    progress = stderr_bars("rate", console=console)
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


# -- lipsync data process ----------------------------------------------------------------------


class _ProcessBars:
    """Rich progress bars on stderr: inputs (steps 1-4) and segments (steps 5-7)."""

    def __init__(self, enabled: bool):
        self.bars = stderr_bars("note", label_width=9, enabled=enabled)
        self.inputs = self.segments = None
        self.kept = self.dropped = 0

    def start(self, inputs: int) -> None:
        self.bars.start()
        self.inputs = self.bars.add_task("inputs", total=inputs, note="")
        self.segments = self.bars.add_task("segments", total=0, note="")

    def input_done(self, outcome, new_segments: int) -> None:
        self.bars.advance(self.inputs, 1)
        total = self.bars.tasks[self.segments].total or 0
        self.bars.update(self.segments, total=total + new_segments)

    def segment_done(self, outcome) -> None:
        if outcome.status == "kept":
            self.kept += 1
        else:
            self.dropped += 1
        self.bars.update(self.segments, advance=1, note=f"kept {self.kept} dropped {self.dropped}")

    def finish(self) -> None:
        self.bars.stop()


def _summary_table(report) -> None:
    from rich.console import Console
    from rich.table import Table

    s = report.summary
    table = Table(title=f"lipsync data process: {report.out}", title_justify="left")
    table.add_column("")
    table.add_column("reason")
    table.add_column("count", justify="right")
    table.add_column("hours", justify="right")
    table.add_row("inputs", "", str(s.inputs), f"{s.input_hours:.3f}")
    for what, reason, count, hours in s.rows():
        table.add_row(what, reason, str(count), f"{hours:.3f}")
    console = Console(stderr=True)
    console.print(table)
    console.print(
        f"{s.inputs_kept}/{s.inputs} inputs gave segments; {report.seconds:.1f} s wall, "
        f"{report.cpu_seconds:.1f} s CPU in tasks, {report.workers} worker(s) "
        f"({report.executor}); manifest: {report.out}/manifest.jsonl"
    )
    if s.errors:
        console.print(
            f"[yellow]{s.errors} item(s) failed with an internal error or a crashed worker; "
            "they are listed in the manifest and retried by the next run[/yellow]"
        )


@data_app.command("process")
def process(
    src: Annotated[Path, typer.Argument(help="Folder of videos (searched recursively) or a file.")],
    out: Annotated[Path, typer.Argument(help="Output folder (created; a re-run resumes).")],
    resolution: Annotated[int, typer.Option(help="Face crop size: 256 or 512.")] = 256,
    workers: Annotated[int, typer.Option(help="Local worker processes (0: one per CPU core).")] = 0,
    ray_address: Annotated[
        str | None,
        typer.Option(help="Run on a Ray cluster: auto, host:port or ray://host:10001."),
    ] = None,
    syncnet: Annotated[
        Path | None, typer.Option(help="SyncNet checkpoint for step 6 (without: step skipped).")
    ] = None,
    sync_threshold: Annotated[float, typer.Option(help="Minimum SyncNet confidence.")] = 3.0,
    hyperiqa: Annotated[
        Path | None,
        typer.Option(help="hyperIQA weights (koniq_pretrained.pkl); without: weight-free score."),
    ] = None,
    quality_threshold: Annotated[
        float | None, typer.Option(help="Minimum quality (default: 40 hyperIQA, 50 weight-free).")
    ] = None,
    min_seconds: Annotated[float, typer.Option(help="Shortest segment (s).")] = 5.0,
    max_seconds: Annotated[float, typer.Option(help="Longest segment (s).")] = 10.0,
    min_face_size: Annotated[int, typer.Option(help="Smallest usable face (source px).")] = 128,
    max_side: Annotated[int, typer.Option(help="Larger inputs are dropped (px).")] = 3840,
    max_duration: Annotated[float, typer.Option(help="Longer inputs are dropped (s).")] = 7200.0,
    scene_threshold: Annotated[float, typer.Option(help="PySceneDetect adaptive threshold.")] = 3.0,
    split_key: Annotated[
        str, typer.Option(help="Split by a hash of the file 'name' or its parent 'folder'.")
    ] = "name",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Check, resample, cut and align raw footage into training segments (7 resumable steps)."""
    from lipsync.data.process import ProcessOptions, process_corpus
    from lipsync.errors import ConfigError

    if split_key not in ("name", "folder"):
        raise ConfigError(f"--split-key must be 'name' or 'folder', got {split_key!r}")
    options = ProcessOptions(
        resolution=resolution,  # type: ignore[arg-type]
        workers=workers,
        ray_address=ray_address,
        syncnet=None if syncnet is None else str(syncnet),
        sync_threshold=sync_threshold,
        hyperiqa=None if hyperiqa is None else str(hyperiqa),
        quality_threshold=quality_threshold,
        min_seconds=min_seconds,
        max_seconds=max_seconds,
        min_face_size=min_face_size,
        max_side=max_side,
        max_duration_s=max_duration,
        scene_threshold=scene_threshold,
        split_key=split_key,  # type: ignore[arg-type]
        progress=not quiet,
    )
    bars = _ProcessBars(enabled=not quiet)
    report = process_corpus(src, out, options, progress=bars)
    _summary_table(report)
