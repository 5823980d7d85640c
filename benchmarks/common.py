"""What the benchmark scripts share: the repository on ``sys.path``, one JSON line per result
(stamped with the machine, torch and the date), the demo media, mode specs, timing statistics.

Import it first (``import common``): it puts the repository root on ``sys.path`` so the scripts
run from a checkout without installing it (the GPU machine gets a copy of the tree).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import wave
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lipsync.audio import load_audio  # noqa: E402
from lipsync.constants import FPS, SAMPLE_RATE  # noqa: E402
from lipsync.pipeline import RunOptions  # noqa: E402


def machine() -> dict:
    """Where and when a number was measured."""
    return {
        "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
    }


def emit(record: dict, out: str | os.PathLike | None = None) -> dict:
    """Print ``record`` (plus :func:`machine`) as one JSON line; also append it to ``out``."""
    record = {**record, **machine()}
    line = json.dumps(record)
    print(line, flush=True)
    if out is not None:
        with open(out, "a") as fh:
            fh.write(line + "\n")
    return record


def shared_media() -> Path:
    """``shared/media`` beside the checkout (or ``$LIPSYNC_SHARED/media``)."""
    env = os.environ.get("LIPSYNC_SHARED")
    for base in ([Path(env)] if env else []) + [REPO.parent / "shared", REPO / "shared"]:
        if (base / "media").is_dir():
            return base / "media"
    return REPO.parent / "shared" / "media"


def parse_mode(spec: str, steps: int) -> dict:
    """A mode spec -> keyword arguments of ``DenoiseOptions.for_mode`` / ``RunOptions``.

    Specs (``+`` joins parts): ``exact``, ``fast`` (the preset), ``cacheN`` (DeepCache interval
    N), ``branchN`` (DeepCache branch N), ``guideF`` (guidance on the first share F of the
    steps), ``dpmN`` / ``ddimN`` (scheduler and N steps). Example: ``dpm10+fast``.
    """
    out: dict = {"mode": "exact", "steps": steps}
    for part in spec.split("+"):
        if part in ("exact", "fast"):
            out["mode"] = part
        elif part.startswith("cache"):
            out["cache_interval"] = int(part[5:])
        elif part.startswith("branch"):
            out["cache_branch"] = int(part[6:])
        elif part.startswith("guide"):
            out["guidance_steps"] = float(part[5:])
        elif part.startswith("dpm"):
            out["scheduler"], out["steps"] = "dpm++", int(part[3:])
        elif part.startswith("ddim"):
            out["scheduler"], out["steps"] = "ddim", int(part[4:])
        else:
            raise SystemExit(f"unknown mode part {part!r} in {spec!r}")
    return out


def with_mode(base: RunOptions, spec: str) -> RunOptions:
    """``base`` with the denoising of a mode spec (:func:`parse_mode`)."""
    return replace(base, **parse_mode(spec, base.steps))


def write_audio_clip(audio: str, frames: int, path, start_frame: int = 0) -> str:
    """``frames`` video frames' worth of ``audio`` from video frame ``start_frame`` on (default:
    the first) as a 16 kHz mono wav at ``path``."""
    begin = int(start_frame * SAMPLE_RATE / FPS)
    wav = load_audio(audio)[begin : begin + int(frames * SAMPLE_RATE / FPS)]
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(SAMPLE_RATE)
        w.writeframes((np.clip(wav, -1, 1) * 32767).astype("<i2").tobytes())
    return str(path)


def stats_ms(seconds: list[float]) -> dict:
    """Median, mean, min, p90 (milliseconds) and count of a list of durations in seconds."""
    ms = sorted(1000 * s for s in seconds)
    return {
        "median": round(statistics.median(ms), 2),
        "mean": round(statistics.fmean(ms), 2),
        "min": round(ms[0], 2),
        "p90": round(ms[min(len(ms) - 1, int(0.9 * len(ms)))], 2),
        "n": len(ms),
    }
