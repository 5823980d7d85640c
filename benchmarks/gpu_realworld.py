"""Real-world use on one GPU (issue #19), one unattended run: long dubs and cold starts.

1. ``eager``: a fresh process, no compilation: process start → first chunk out, frames/s.
2. ``warmup``: a fresh process with empty compile caches builds the precompiled artefacts of
   v1.6 (random weights) for ``--mode fast`` (``lipsync.tools.warmup``): the cold compile time.
3. ``auto``: a fresh process with empty compile caches and the artefacts (``--compile auto``)
   runs the demo clip: process start → models loaded → first chunk out (compiled speed?); then
   the 9.6 s demo timed, and a long dub of it (up to ``--dub-seconds``, default 90 s; the clip
   looped ping-pong) timed: frames/s, GPU busy share (NVML), stage seconds, pass-2 details
   (frames decoded, face encodings reused).
4. Optional, when time is left: the same kind of dub with the long-dub reuse off
   (``frame_cache_mb=0``) as an A/B; and ``regional-warm``, a fresh process with ``--compile
   regional`` and the inductor cache the warmup left (no artefacts): what a second process on
   the same machine sees without artefacts.

Every process runs ``--mode fast --scheduler dpm++ --steps 6`` on v1.6's architecture with
random weights in bf16, the face track read from ``--faces`` (made on the CPU; no mediapipe
there). The whole run ends within ``--budget-s`` (default 450 s): each child is stopped at the
deadline, the dub is shortened to what the time left allows (its length is recorded), and the
optional parts run only when time is left. Writes ``$OUT/realworld_gpu.json`` (everything, rewritten
after each part), ``$OUT/artefact_manifest.json`` and ``$OUT/logs/*.log`` (each child's output).

On the H200 (torch 2.11, Python 3.12; its image lacks PyAV and diffusers, and ``../shared`` does
not travel): first, on the CPU machine, ``python benchmarks/realworld_wheels.py`` (fills
``.whl_realworld/`` and ``.bench_media/``); then one call carrying both, about 8 minutes:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
        .whl_realworld/*.whl && export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 && \
        python3 benchmarks/gpu_realworld.py --media .bench_media --out $OUT

A smoke run on a CPU: ``python benchmarks/gpu_realworld.py --preset tiny --device cpu --dtype
fp32 --dub-seconds 12 --ab-dub-seconds 11 --budget-s 1500 --out /tmp/x``.

Results: docs/PERFORMANCE.md ("Long dubs", "Cold start").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

T_START = time.time()  # this process's start (children: compared with LIPSYNC_T0)

import common  # noqa: E402

HERE = Path(__file__).resolve().parent
FACES = HERE / "data" / "faces"  # demo1_video.mp4's face track (lipsync run --face-cache)


def run_options(args, **extra):
    from lipsync.pipeline import RunOptions

    return RunOptions(
        mode="fast", scheduler="dpm++", steps=6, seed=1, force=True, face_cache=str(args.faces),
        **extra,
    )  # fmt: skip


class ChunkClock:
    """Progress hook: when each pass-2 chunk came out (seconds since the process started)."""

    def __init__(self, t0: float):
        self.t0, self.times = t0, []

    def start(self, stage, total):
        pass

    def advance(self, stage, n=1):
        if stage == "denoising":
            self.times.append(time.time() - self.t0)

    def finish(self, stage):
        pass


def timed(pipe, video, audio, out, options, device) -> dict:
    import torch

    from lipsync.tools.gpu_busy import GpuBusy

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    with GpuBusy(0 if device.type == "cuda" else None) as busy:
        report = pipe.run(video, audio, out, options)
    wall = time.perf_counter() - t
    return {
        "frames": report.frames,
        "video_frames": report.video_frames,
        "looped": report.looped,
        "wall_s": round(wall, 2),
        "fps_end_to_end": round(report.frames / wall, 2),
        "gpu_busy_share": None if busy.share is None else round(busy.share, 3),
        "stage_seconds": {k: round(v, 2) for k, v in report.seconds.items()},
        "details": report.details,
        "compile": report.compile,
        "warnings": report.warnings,
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if device.type == "cuda"
        else None,
    }


def dub_seconds_within(wanted: float, fps: float, deadline: float, reserve_s: float) -> float:
    """The longest dub up to ``wanted`` seconds of audio whose frames (25 per second) fit before
    ``deadline`` at ``fps``, keeping ``reserve_s`` spare (at least 10 s of audio)."""
    seconds_left = deadline - time.time() - reserve_s
    return round(max(10.0, min(wanted, seconds_left * fps / 25.0 / 1.5)), 1)


def child(args) -> dict:
    """One fresh process: import, load, the first run (cold start), then what ``--parts`` asks."""
    t0 = float(os.environ.get("LIPSYNC_T0", T_START))
    from lipsync.config import LoadOptions
    from lipsync.loading import load_models
    from lipsync.pipeline import LipSyncPipeline

    result = {"compile": args.compile, "t_imported_s": round(time.time() - t0, 2)}
    load = LoadOptions(preset=args.preset, device=args.device, dtype=args.dtype,
                       compile=args.compile, random_weights=True)  # fmt: skip
    if args.part == "warmup":
        from lipsync.tools.warmup import warmup

        built = warmup(replace(load, compile="regional"), ["fast"], args.artefacts)
        result.update(built=built, t_compiled_s=round(time.time() - t0, 2))
        return result
    models = load_models(load)
    result["t_loaded_s"] = round(time.time() - t0, 2)
    result["precompiled"] = models.precompiled.path.name if models.precompiled else None
    result["notes"] = list(models.notes)
    save_partial(args, result)
    pipe = LipSyncPipeline(models)
    video, audio = str(args.media / "demo1_video.mp4"), str(args.media / "demo1_audio.wav")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "o.mp4"
        clock = ChunkClock(t0)
        report = pipe.run(video, audio, out, run_options(args), progress=clock)
        gaps = [b - a for a, b in zip(clock.times, clock.times[1:], strict=False)]
        steady = statistics.median(gaps[1:-1] or gaps)  # not the first, nor the short last
        first_chunk = clock.times[0] - result["t_loaded_s"]
        result.update(
            t_first_chunk_out_s=round(clock.times[0], 2),
            first_chunk_s=round(first_chunk, 2),
            steady_chunk_s=round(steady, 3),
            first_chunk_over_steady=round(first_chunk / steady, 2),
            first_run_fps=round(report.frames / (clock.times[-1] - result["t_loaded_s"]), 2),
            first_run_compile=report.compile,
            first_run_warnings=report.warnings,
        )
        save_partial(args, result)
        dev = models.device
        fps = result["first_run_fps"]
        if "short" in args.parts:
            result["short"] = timed(pipe, video, audio, out, run_options(args), dev)
            fps = result["short"]["fps_end_to_end"]
        save_partial(args, result)
        for part, wanted, extra in (
            ("dub", args.dub_seconds, {}),
            ("dub_reuse_off", args.ab_dub_seconds, {"frame_cache_mb": 0}),
        ):
            if part not in args.parts:
                continue
            from lipsync.tools.bench import looped_audio as make_dub

            seconds = dub_seconds_within(wanted, fps, args.deadline, reserve_s=10)
            dub = make_dub(audio, seconds, Path(tmp) / f"{part}.wav")
            result[part] = timed(pipe, video, str(dub), out, run_options(args, **extra), dev)
            result[part]["audio_seconds"] = seconds
            save_partial(args, result)
    return result


def save_partial(args, result: dict) -> None:
    """The child's result so far (the parent reads it even if the child is stopped later)."""
    Path(args.result).write_text(json.dumps({**result, "partial": True}))


def spawn(
    args, part: str, compile_mode: str, parts: str, env: dict, log: Path, deadline: float
) -> dict:
    """Run one child process until it ends or ``deadline``; its JSON result (what it had written
    so far when stopped, marked ``partial``; ``failed`` if it wrote nothing: see its log)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_path = f.name
    cmd = [sys.executable, __file__, "--child", part, "--compile", compile_mode, "--parts", parts,
           "--result", result_path, "--deadline", repr(deadline), *args.passthrough]  # fmt: skip
    full_env = {**os.environ, **env, "LIPSYNC_T0": repr(time.time())}
    t = time.time()
    timed_out = False
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, env=full_env, stdout=err, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.kill()
            proc.wait()
    text = Path(result_path).read_text() if Path(result_path).stat().st_size else ""
    if proc.returncode != 0 and not timed_out:
        print(f"{part}: exit {proc.returncode}, see {log}", file=sys.stderr)
    if not text:
        return {"failed": True, "exit": proc.returncode, "timed_out": timed_out, "log": log.name}
    result = json.loads(text)
    if proc.returncode == 0:
        result.pop("partial", None)
    result.update(process_wall_s=round(time.time() - t, 2), timed_out=timed_out)
    return result


def preflight() -> dict:
    """What the children need, checked once: a clear line instead of a child's traceback."""
    missing = []
    for module in ("av", "diffusers", "torch"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        sys.exit(
            f"missing Python modules: {', '.join(missing)} (run benchmarks/realworld_wheels.py "
            "here, carry .whl_realworld and install it: see this script's docstring)"
        )
    import av
    import diffusers

    return {"av": av.__version__, "diffusers": diffusers.__version__}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--media", type=Path, default=common.shared_media())
    p.add_argument("--faces", type=Path, default=FACES)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "realworld_out")))
    p.add_argument("--preset", default="v1.6")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--dub-seconds", type=float, default=90.0)
    p.add_argument("--ab-dub-seconds", type=float, default=45.0)
    p.add_argument("--budget-s", type=float, default=450.0, help="the whole run ends by then")
    # child side
    p.add_argument("--child", default=None)
    p.add_argument("--compile", default="none")
    p.add_argument("--parts", default="")
    p.add_argument("--result", default=None)
    p.add_argument("--artefacts", default=None)
    p.add_argument("--deadline", type=float, default=None)
    args = p.parse_args()
    if args.deadline is None:
        args.deadline = T_START + args.budget_s
    args.passthrough = [
        "--media", str(args.media), "--faces", str(args.faces), "--preset", args.preset,
        "--dtype", args.dtype, "--dub-seconds", str(args.dub_seconds),
        "--ab-dub-seconds", str(args.ab_dub_seconds),
        *(["--device", args.device] if args.device else []),
    ]  # fmt: skip
    return args


def main() -> None:
    args = parse()
    if args.child:
        args.part = args.child
        args.parts = args.parts.split(",")
        args.artefacts = os.environ.get("LIPSYNC_COMPILED_DIR")
        Path(args.result).write_text(json.dumps(child(args)))
        return
    versions = preflight()
    if not (args.media / "demo1_video.mp4").is_file():
        sys.exit(f"no demo clip in {args.media} (run benchmarks/realworld_wheels.py, carry it)")
    args.out.mkdir(parents=True, exist_ok=True)
    logs = args.out / "logs"
    logs.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="lipsync-realworld-"))
    artefacts, home = work / "compiled", work / "home"
    home.mkdir()
    env = {"LIPSYNC_HOME": str(home), "LIPSYNC_COMPILED_DIR": str(artefacts)}
    cold_cache = {"TORCHINDUCTOR_CACHE_DIR": str(work / "inductor_cold")}
    results: dict = {"machine": common.machine(), "versions": versions,
                     "args": args.passthrough, "budget_s": args.budget_s, "parts": {}}  # fmt: skip

    def record(name, value):
        results["parts"][name] = value
        results["elapsed_s"] = round(time.time() - T_START, 1)
        (args.out / "realworld_gpu.json").write_text(json.dumps(results, indent=2) + "\n")
        print(f"{name}: {json.dumps(value)[:400]}", flush=True)

    def left() -> float:
        return args.deadline - time.time()

    # 1. eager cold start (no compile caches involved): process start -> first chunk out
    end = args.deadline
    record("eager", spawn(args, "run", "none", "", env, logs / "eager.log", end - 240))
    # 2. cold compile + artefacts (stopped in time for part 3)
    record("warmup", spawn(args, "warmup", "regional", "", {**env, **cold_cache},
                           logs / "warmup.log", end - 150))  # fmt: skip
    for manifest in artefacts.glob("*.json"):
        (args.out / "artefact_manifest.json").write_text(manifest.read_text())
    # 3. the artefacts in a fresh process with empty caches: cold start, then the short clip and
    # a long dub of it (as long as the time left allows, up to --dub-seconds)
    fresh = {"TORCHINDUCTOR_CACHE_DIR": str(work / "inductor_fresh")}
    record("auto", spawn(args, "run", "auto", "short,dub", {**env, **fresh}, logs / "auto.log",
                         end))  # fmt: skip
    # 4. optional: the long-dub reuse off (A/B), and a second process without artefacts
    if left() > 150:
        fresh2 = {"TORCHINDUCTOR_CACHE_DIR": str(work / "inductor_fresh2")}
        record("auto_reuse_off", spawn(args, "run", "auto", "dub_reuse_off", {**env, **fresh2},
                                       logs / "auto_reuse_off.log", end))  # fmt: skip
    if left() > 90:
        no_art = {**cold_cache, "LIPSYNC_COMPILED_DIR": str(work / "none")}
        record("regional_warm_cache", spawn(args, "run", "regional", "", {**env, **no_art},
                                            logs / "regional_warm.log", end))  # fmt: skip
    results["done"] = True
    record("total", {"elapsed_s": round(time.time() - T_START, 1)})


if __name__ == "__main__":
    main()
