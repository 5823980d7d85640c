"""The ``lipsync`` command.

Errors a user can act on (:class:`lipsync.errors.LipSyncError`) print one line, ``error: …``, and
exit non-zero; anything else is a bug and keeps its traceback. ``lipsync run`` treats SIGTERM
(``kill``, Kubernetes, process managers) like Ctrl-C: the partial output is removed and the exit
code is 143. Warnings of the ``lipsync`` loggers print as one ``warning: …`` line each.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lipsync.constants import (
    CHUNK_FRAMES,
    DEFAULT_GUIDANCE,
    DEFAULT_MIN_FACE_SIZE,
    DEFAULT_SEED,
    DEFAULT_STEPS,
    MODE_NAMES,
    EngineName,
    Provider,
)
from lipsync.data.cli import data_app
from lipsync.errors import ConfigError, LipSyncError, check_choice
from lipsync.eval.cli import eval_app
from lipsync.export.cli import export_app
from lipsync.progress import stderr_bars
from lipsync.serving.cli import serve_app
from lipsync.train.cli import train_app

app = typer.Typer(
    name="lipsync",
    help="Lip-sync a talking-head video to new audio (LatentSync 1.5 / 1.6 compatible).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # click's plain help: no <bool> type column on flags
)
# soft_wrap: a line is never broken at the console width (80 columns when piped)
console = Console(stderr=True, soft_wrap=True)


class Terminated(BaseException):
    """SIGTERM arrived (``kill``, a process manager): unwinds like Ctrl-C."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated


class _ConsoleWarnings(logging.Handler):
    """``lipsync.*`` warnings as ``warning: …`` lines on stderr (each message once)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        self.show(record.getMessage())

    def show(self, message: str) -> None:
        if message not in self.seen:
            self.seen.add(message)
            console.print(f"[yellow]warning:[/yellow] {escape(message)}", highlight=False)


_warnings = _ConsoleWarnings()


def _show_warnings() -> None:
    """Print the ``lipsync`` loggers' warnings as ``warning:`` lines (the commands a person
    watches; the job service logs its own way, lipsync.serving.logs)."""
    logger = logging.getLogger("lipsync")
    if _warnings not in logger.handlers:
        logger.addHandler(_warnings)


app.add_typer(serve_app, name="serve")
app.add_typer(data_app, name="data")
app.add_typer(train_app, name="train")
app.add_typer(eval_app, name="eval")
app.add_typer(export_app, name="export")


class RichProgress:
    """Per-stage progress bars (frames/s and ETA) on stderr; silent when not a terminal."""

    def __init__(self, enabled: bool = True):
        self._bars = stderr_bars(
            "rate", label_width=10, percent=True, enabled=enabled, console=console
        )
        self._tasks: dict[str, int] = {}
        self._started = False

    def __enter__(self):
        return self  # the bars appear with the first stage: an early error prints no empty line

    def __exit__(self, *exc):
        if self._started:
            self._bars.stop()

    def start(self, stage: str, total: int) -> None:
        if not self._started:
            self._started = True
            self._bars.start()
        self._tasks[stage] = self._bars.add_task(stage, total=total, rate="")

    def advance(self, stage: str, n: int = 1) -> None:
        task_id = self._tasks[stage]
        self._bars.advance(task_id, n)
        task = self._bars.tasks[task_id]
        speed = task.finished_speed or task.speed
        self._bars.update(task_id, rate=f"{speed:5.1f} frames/s" if speed else "")

    def finish(self, stage: str) -> None:
        task_id = self._tasks[stage]
        task = self._bars.tasks[task_id]
        self._bars.update(task_id, completed=task.total)


# -- options shared by several commands (one declaration each) --------------------------------

Preset = Annotated[str, typer.Option("--preset", "-p", help="v1.6, v1.5, tiny or demo.")]
Device = Annotated[str | None, typer.Option(help="cuda or cpu (default: cuda if present).")]
DTypeOpt = Annotated[
    str | None,
    typer.Option("--dtype", help="fp16, bf16 or fp32 (default: fp16 on cuda, fp32 on cpu)."),
]
CheckpointDir = Annotated[Path | None, typer.Option("--dir", help="Checkpoint cache folder.")]
CompileOpt = Annotated[
    str,
    typer.Option(
        "--compile",
        help="torch.compile the U-Net: none, regional, full, full-cudagraphs (CUDA: pays off), "
        "or auto: compiled from `lipsync warmup`'s artefacts when they match, else eager.",
    ),
]
Fp8 = Annotated[
    bool,
    typer.Option(
        "--fp8",
        help="FP8 matmuls in the U-Net's big linear layers (CUDA, capability >= 8.9; "
        "approximate; measured speed: docs/PERFORMANCE.md).",
    ),
]
RandomWeights = Annotated[
    bool, typer.Option("--random-weights", help="The architecture with seeded random weights.")
]
ModeOpt = Annotated[
    str,
    typer.Option(
        "--mode",
        help="exact (the reference computation) or fast (DeepCache every 3rd step + guidance on "
        "the first half of the steps; approximate, see docs/PERFORMANCE.md).",
    ),
]
Steps = Annotated[int, typer.Option(help="Denoising steps.")]
Guidance = Annotated[float, typer.Option(help="Classifier-free guidance scale.")]
Scheduler = Annotated[str, typer.Option(help="ddim (reference) or dpm++ (fewer steps).")]
CacheInterval = Annotated[
    int | None,
    typer.Option(help="DeepCache: full U-Net every N-th step (1: off). Overrides the mode's."),
]
CacheBranch = Annotated[
    int | None,
    typer.Option(help="DeepCache skip branch (0: shallowest, fastest). Overrides the mode's."),
]
GuidanceSteps = Annotated[
    float | None, typer.Option(help="Share of the steps, from the first, with guidance (1: all).")
]
# run: unset means the model's own settings (a few-step student bundle's), else the defaults
RunSteps = Annotated[
    int | None,
    typer.Option("--steps", help=f"Denoising steps (default {DEFAULT_STEPS}, or a student's own)."),
]
RunGuidance = Annotated[
    float | None,
    typer.Option(
        "--guidance",
        help=f"Classifier-free guidance scale (default {DEFAULT_GUIDANCE}, or a student's own).",
    ),
]
RunScheduler = Annotated[
    str | None,
    typer.Option(
        "--scheduler", help="ddim (reference, default) or dpm++ (fewer steps); or a student's own."
    ),
]
Frames = Annotated[int, typer.Option(help="Frames per chunk.")]
FrameCacheMb = Annotated[
    int,
    typer.Option(
        "--frame-cache-mb",
        help="Looped dubs (audio longer than the video): MB of decoded video frames kept for the "
        "run, so each is decoded once (0: decode again every loop; same output).",
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def _load(
    preset, device, dtype, dir=None, compile="none", fp8=False, random_weights=False, unet=None
):
    """The :class:`~lipsync.config.LoadOptions` of a command's flags (checked)."""
    from lipsync.config import LoadOptions

    options = LoadOptions(
        preset=preset, device=device, dtype=dtype, checkpoint_dir=dir, compile=compile, fp8=fp8,
        random_weights=random_weights, unet=unet,
    )  # fmt: skip
    options.validate()
    return options


# lipsync run's model source: PyTorch models (--engine torch) or an ONNX export (--engine onnx)
RunPreset = Annotated[
    str | None,
    typer.Option(
        "--preset",
        "-p",
        help="v1.6, v1.5, tiny or demo (default v1.6; --engine onnx: the export's).",
    ),
]
UNetPath = Annotated[
    Path | None,
    typer.Option(
        "--unet",
        help="Our own trained U-Net instead of the preset's: a bundle or training-run folder, or "
        "a .safetensors with config metadata (docs/TRAINING.md).",
    ),
]
Engine = Annotated[
    EngineName,
    typer.Option(help="torch (PyTorch models) or onnx (an export on ONNX Runtime; --onnx-dir)."),
]
OnnxDir = Annotated[
    Path | None, typer.Option(help="--engine onnx: a folder made by lipsync export onnx.")
]
ProviderOpt = Annotated[
    Provider | None,
    typer.Option(help="--engine onnx: ONNX Runtime provider auto, cpu, cuda, tensorrt (auto)."),
]


def _run_source(engine, preset, onnx_dir, provider, options, **flags):
    """:class:`~lipsync.config.LoadOptions` (``--engine torch``) or
    :class:`~lipsync.config.OnnxOptions` (``--engine onnx``) of ``lipsync run``'s flags, checked;
    ``flags``: the PyTorch-only ones (device, dtype, dir, compile, fp8, unet)."""
    from lipsync.config import OnnxOptions

    if engine == "torch":
        if onnx_dir is not None or provider is not None:
            raise ConfigError("--onnx-dir and --provider go with --engine onnx")
        return _load(preset or "v1.6", **flags)
    given = [f"--{k}" for k, v in flags.items() if v not in (None, False, "none")]
    if given:
        raise ConfigError(
            f"--engine onnx runs an export as it was made (weights, precision and preset fixed): "
            f"{', '.join(given)} do not apply; choose the hardware with --provider"
        )
    if onnx_dir is None:
        raise ConfigError(
            "--engine onnx needs --onnx-dir DIR (a folder made by lipsync export onnx)"
        )
    if options.denoise_options().cache_interval > 1:
        raise ConfigError(
            "the ONNX engine does not support DeepCache (cache_interval > 1); use --mode exact "
            "or set --cache-interval 1"
        )
    source = OnnxOptions(onnx_dir, provider or "auto", preset)
    source.validate()
    return source


@app.command()
def run(
    video: Annotated[Path, typer.Argument(help="Talking-head video (mp4, mov, mkv, webm).")],
    audio: Annotated[
        Path, typer.Argument(help="New audio (wav, mp3, m4a, flac) or a video with audio.")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output video (.mp4).")],
    preset: RunPreset = None,
    steps: RunSteps = None,
    guidance: RunGuidance = None,
    seed: Annotated[
        int, typer.Option(help="Random seed (same seed, device, dtype: same output).")
    ] = DEFAULT_SEED,
    device: Device = None,
    dtype: DTypeOpt = None,
    mask: Annotated[
        Path | None, typer.Option(help="Inpainting mask PNG (black = generate).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    dir: CheckpointDir = None,
    crf: Annotated[float, typer.Option(help="H.264 quality (lower = better, 0-51).")] = 18,
    min_face_size: Annotated[
        int, typer.Option(help="Faces smaller than this (px) are left unchanged.")
    ] = DEFAULT_MIN_FACE_SIZE,
    detector: Annotated[str, typer.Option(help="Face detector: mediapipe.")] = "mediapipe",
    loop: Annotated[
        bool, typer.Option(help="Loop the video ping-pong when the audio is longer.")
    ] = True,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    face_cache: Annotated[
        Path | None,
        typer.Option(help="Folder that keeps each video's face track for later runs on it."),
    ] = None,
    compile: CompileOpt = "none",
    mode: ModeOpt = "exact",
    scheduler: RunScheduler = None,
    cache_interval: CacheInterval = None,
    cache_branch: CacheBranch = None,
    guidance_steps: GuidanceSteps = None,
    fp8: Fp8 = False,
    frame_cache_mb: FrameCacheMb = 2048,
    unet: UNetPath = None,
    engine: Engine = "torch",
    onnx_dir: OnnxDir = None,
    provider: ProviderOpt = None,
) -> None:
    """Lip-sync VIDEO to AUDIO and write the result to --output."""
    from lipsync.config import get_preset
    from lipsync.media.validate import SilentAudioWarning, validate_inputs

    signal.signal(signal.SIGTERM, _raise_terminated)  # like Ctrl-C: no partial output is left
    _show_warnings()
    warnings.simplefilter("ignore", SilentAudioWarning)  # logged: one warning: line already
    # paths, media and the output folder first: seconds before torch and the models are imported
    if preset is not None:
        get_preset(preset)
    validate_inputs(video, audio, output, force=force, load_waveform=False)
    if mask is not None and not mask.is_file():
        raise ConfigError(f"mask file not found: {mask}")

    from lipsync.api import LipSync
    from lipsync.pipeline import RunOptions

    given = {k: v for k, v in (("steps", steps), ("guidance", guidance), ("scheduler", scheduler))
             if v is not None}  # fmt: skip
    options = RunOptions(
        seed=seed, mask_path=str(mask) if mask else None,
        force=force, crf=crf, min_face_size=min_face_size, detector=detector, loop_video=loop,
        face_cache=str(face_cache) if face_cache else None, mode=mode,
        cache_interval=cache_interval, cache_branch=cache_branch, guidance_steps=guidance_steps,
        frame_cache_mb=frame_cache_mb, **given,
    )  # fmt: skip
    options.validate()
    source = _run_source(
        engine, preset, onnx_dir, provider, options,
        device=device, dtype=dtype, dir=dir, compile=compile, fp8=fp8, unet=unet,
    )  # fmt: skip
    with console.status("loading the models") if not quiet else contextlib.nullcontext():
        ls = LipSync.from_options(source)
    # what was not given, ls.run takes from the model's defaults (a student's steps, guidance,
    # scheduler)
    chosen = {k: v for k, v in asdict(options).items()
              if k in given or k not in ("steps", "guidance", "scheduler")}  # fmt: skip
    with RichProgress(enabled=not quiet and not as_json) as progress:
        report = ls.run(video, audio, output, progress=progress, **chosen)
    if as_json:
        typer.echo(json.dumps(report.as_dict(), indent=2))
        return
    _print_summary(report)


def _print_summary(report) -> None:
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in report.seconds.items())
    console.print(
        f"[green]wrote[/green] {report.output}: {report.frames} frames "
        f"({report.frames_without_face} without a usable face"
        + (f", {report.frames_face_too_small} too small" if report.frames_face_too_small else "")
        + f"), {report.fps:.2f} frames/s end to end",
        highlight=False,
    )
    console.print(f"stages: {stages}", highlight=False)
    for warning in report.warnings:
        _warnings.show(warning)


@app.command("app")
def web_app(
    preset: Annotated[str, typer.Option("--preset", "-p", help="Default preset.")] = "v1.6",
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 7860,
    device: Device = None,
    dtype: DTypeOpt = None,
    dir: CheckpointDir = None,
) -> None:
    """Serve the web UI (Gradio): upload, options, progress, result."""
    from lipsync.app import build_app

    _show_warnings()
    page = build_app(_load(preset, device, dtype, dir))
    console.print(f"lipsync web UI on http://{host}:{port}")
    page.queue().launch(server_name=host, server_port=port, show_error=True, quiet=True)


@app.command()
def bench(
    preset: Preset = "tiny",
    frames: Frames = CHUNK_FRAMES,
    steps: Steps = DEFAULT_STEPS,
    mode: ModeOpt = "exact",
    compile: CompileOpt = "none",
    chunks: Annotated[int, typer.Option(help="Chunks timed after one warm-up chunk.")] = 2,
    device: Device = None,
    dtype: DTypeOpt = None,
    random_weights: RandomWeights = False,
    as_json: AsJson = False,
    guidance: Guidance = DEFAULT_GUIDANCE,
    scheduler: Scheduler = "ddim",
    cache_interval: CacheInterval = None,
    cache_branch: CacheBranch = None,
    guidance_steps: GuidanceSteps = None,
    fp8: Fp8 = False,
    temporal_attention: Annotated[
        str, typer.Option(help="Motion modules' attention: matmul (default) or sdpa.")
    ] = "matmul",
    video: Annotated[
        Path | None, typer.Option(help="Time this clip end to end instead (needs --audio).")
    ] = None,
    audio: Annotated[Path | None, typer.Option(help="Audio for --video.")] = None,
    face_cache: Annotated[
        Path | None, typer.Option(help="--video: face-track cache folder (lipsync run's).")
    ] = None,
    dub_seconds: Annotated[
        float | None,
        typer.Option(
            help="--video: also time a long dub, the clip looped under its audio repeated to "
            "this many seconds, against the clip alone."
        ),
    ] = None,
    frame_cache_mb: FrameCacheMb = 2048,
) -> None:
    """Time the model stages on synthetic input (per-stage ms/frame, frames/s, TFLOP/s, GPU
    busy share), or with --video/--audio a real clip end to end (one warm-up run, one timed)."""
    from lipsync.pipeline import RunOptions
    from lipsync.tools.bench import bench_model, bench_video

    _show_warnings()
    load = _load(preset, device, dtype, None, compile, fp8, random_weights)
    if (video is None) != (audio is None):
        raise typer.BadParameter("--video and --audio go together")
    run_options = RunOptions(
        mode=mode, steps=steps, guidance=guidance, scheduler=scheduler,
        cache_interval=cache_interval, cache_branch=cache_branch, guidance_steps=guidance_steps,
        chunk_frames=frames, face_cache=str(face_cache) if face_cache else None,
        frame_cache_mb=frame_cache_mb,
    )  # fmt: skip
    run_options.validate()
    if dub_seconds is not None and video is None:
        raise typer.BadParameter("--dub-seconds needs --video and --audio")
    if video is not None:
        report = bench_video(str(video), str(audio), load, run_options, dub_seconds=dub_seconds)
    else:
        report = bench_model(load, run_options, chunks, temporal_attention)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    for key, value in report.items():
        console.print(f"{key:22s} {value}", highlight=False)


@app.command()
def profile(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Folder for trace.json and summary.json.")
    ] = Path("lipsync-profile"),
    preset: Preset = "tiny",
    frames: Frames = CHUNK_FRAMES,
    steps: Steps = 2,
    mode: ModeOpt = "exact",
    scheduler: Scheduler = "ddim",
    compile: CompileOpt = "none",
    device: Device = None,
    dtype: DTypeOpt = None,
    random_weights: RandomWeights = False,
    fp8: Fp8 = False,
    rows: Annotated[int, typer.Option(help="Rows of the top-operators table.")] = 25,
) -> None:
    """Profile one chunk (after a warm-up chunk): top operators, time by kernel class and by
    stage, and a Chrome trace."""
    from lipsync.pipeline import RunOptions
    from lipsync.tools.profile import format_summary, profile_model

    _show_warnings()
    load = _load(preset, device, dtype, None, compile, fp8, random_weights)
    run_options = RunOptions(mode=mode, steps=steps, scheduler=scheduler, chunk_frames=frames)
    run_options.validate()
    table, summary = profile_model(str(out), load, run_options, rows)
    typer.echo(table)
    typer.echo(format_summary(summary))
    console.print(f"trace: {out / 'trace.json'} (open in chrome://tracing or Perfetto)")
    console.print(f"summary: {out / 'summary.json'}")


@app.command()
def warmup(
    preset: Preset = "v1.6",
    mode: Annotated[
        list[str], typer.Option("--mode", help="Denoising mode(s) to compile for (repeatable).")
    ] = ["exact", "fast"],  # noqa: B006 - typer reads the default, never mutates it
    compile: Annotated[
        str, typer.Option("--compile", help="regional (default), full or full-cudagraphs.")
    ] = "regional",
    device: Device = None,
    dtype: DTypeOpt = None,
    dir: CheckpointDir = None,
    random_weights: RandomWeights = False,
    fp8: Fp8 = False,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Folder for the artefacts (default $LIPSYNC_HOME/compiled)."),
    ] = None,
    as_json: AsJson = False,
) -> None:
    """Compile a preset once and save the result, so later runs with --compile auto (or
    regional) start at compiled speed (docs/PERFORMANCE.md, "Cold start")."""
    from lipsync.tools.warmup import warmup as build

    _show_warnings()
    for name in mode:
        check_choice("mode", name, MODE_NAMES)
    load = _load(preset, device, dtype, dir, compile, fp8, random_weights)
    with console.status(f"compiling {preset} for {', '.join(mode)}"):
        result = build(load, list(mode), out)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    console.print(
        f"[green]wrote[/green] {result['artefact']} ({result['bytes'] / 2**20:.1f} MiB; "
        f"compiled in {sum(result['compile_seconds'].values()):.0f} s)",
        highlight=False,
    )


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
    from lipsync.config import PRESETS, get_preset
    from lipsync.errors import ConfigError

    versions = [p.name.lstrip("v") for p in PRESETS.values() if p.hf_repo is not None]
    try:
        preset = get_preset(version)
    except ConfigError:
        preset = None
    if preset is None or preset.hf_repo is None:  # tiny: random weights; demo: shipped
        raise ConfigError(f"unknown version {version!r}; choose {' or '.join(versions)}")
    paths = fetch(preset.name, root=dir, mirror=source, progress=True)
    for name, path in paths.items():
        console.print(f"{name:8s} {path}")
    console.print(f"[green]{preset.name} checkpoints ready[/green]")


@app.command()
def presets(
    dir: CheckpointDir = None,
    as_json: AsJson = False,
) -> None:
    """List model presets and whether their checkpoints are downloaded."""
    from lipsync.checkpoints import checkpoint_paths, require_checkpoints
    from lipsync.config import PRESETS, bundle_dir
    from lipsync.loading import require_bundle

    rows = []
    for preset in PRESETS.values():
        paths = None
        if preset.random_weights:
            status = "random weights (built in)"
        elif preset.bundle is not None:
            paths = {"bundle": str(bundle_dir(preset))}
            try:
                require_bundle(preset)
                status = "bundle ready"
            except LipSyncError:
                status = f"missing bundle: {paths['bundle']}"
        else:
            paths = {k: str(v) for k, v in checkpoint_paths(preset, dir).items()}
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
                "paths": paths,
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
    preset: Preset = "tiny",
    dir: CheckpointDir = None,
    device: Device = None,
    dtype: DTypeOpt = None,
    as_json: AsJson = False,
) -> None:
    """Load a preset's models strictly and run one denoising call on synthetic input."""
    from lipsync.tools.check import check_preset

    _show_warnings()
    report = check_preset(_load(preset, device, dtype, dir))
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    for key, value in report.items():
        console.print(f"{key:22s} {value}")


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the Typer app, turning user errors into one line and exit code."""
    start = time.perf_counter()
    try:
        # Typer turns Ctrl-C into an exit code, returned (not raised) in this mode
        code = app(args=argv, standalone_mode=False)
        if code == 130:
            raise KeyboardInterrupt
        if isinstance(code, int) and code:
            sys.exit(code)
    except LipSyncError as e:
        console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted after {time.perf_counter() - start:.1f} s[/yellow]")
        sys.exit(130)
    except Terminated:
        console.print(f"[yellow]terminated after {time.perf_counter() - start:.1f} s[/yellow]")
        sys.exit(143)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:  # usage errors: click's ClickException / Abort (Typer may vendor
        # its own copy of click, typer._click, so match the class names, not one module's classes)
        kinds = {cls.__name__ for cls in type(e).__mro__}
        if "ClickException" in kinds:
            e.show()
            sys.exit(e.exit_code)
        if "Abort" in kinds:
            sys.exit(130)
        raise


if __name__ == "__main__":
    main()
