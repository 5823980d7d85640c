"""Where the reference fixtures and demo media live, and the demo clip's frames as tests use them.

The fixtures are required, never skipped: a parity test that silently skips is a defect. They are
looked up in ``$LIPSYNC_SHARED`` or in ``shared/`` beside the repository checkout (as in CI).
"""

from __future__ import annotations

import os
from pathlib import Path

import av
import numpy as np
import torch

from lipsync.media import read_frames
from tests.support.media_factory import make_video

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"  # small files the tests ship with (the toy SyncNet)


def shared_dir() -> Path:
    env = os.environ.get("LIPSYNC_SHARED")
    candidates = [Path(env)] if env else []
    candidates += [REPO.parent / "shared", REPO / "shared"]
    for path in candidates:
        if (path / "reference").is_dir():
            return path
    raise RuntimeError(
        "reference fixtures not found: set LIPSYNC_SHARED or put shared/ beside the checkout "
        f"(looked in {', '.join(map(str, candidates))})"
    )


SHARED = shared_dir()
REFERENCE = SHARED / "reference"
MEDIA = SHARED / "media"
DEMO_VIDEO = MEDIA / "demo1_video.mp4"
DEMO_AUDIO = MEDIA / "demo1_audio.wav"


def demo_source_frames(n: int):
    """The first ``n`` frames of ``demo1_video.mp4`` exactly as PyAV decodes them (RGB uint8,
    no frame-rate resampling): what the reference fixtures were computed from."""
    out = []
    with av.open(str(DEMO_VIDEO)) as container:
        for frame in container.decode(video=0):
            out.append(frame.to_ndarray(format="rgb24"))
            if len(out) == n:
                break
    return np.stack(out)


def small_demo_frames(stop: int = 75):
    """The demo's first ``stop`` frames (a portrait 1080x1920 clip) through the 25 fps decoder,
    cropped to the 600x600 around the face and downscaled to 320x320 (a face of ~110 px):
    (stop, 320, 320, 3) uint8."""
    frames = read_frames(DEMO_VIDEO, stop=stop)[:, 380:980, 295:895]
    t = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    small = torch.nn.functional.interpolate(t, size=(320, 320), mode="area")
    return small.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


def face_clip(path, frames, seconds, fps=25, audio=False):
    """A 320x320 clip of ``seconds`` showing ``frames`` (25 per second, the last one held)."""
    n = len(frames)
    return make_video(
        path, seconds=seconds, fps=fps, size=(320, 320), audio=audio,
        draw=lambda i, t: frames[min(int(t * 25 + 1e-6), n - 1)], crf=16,
    )  # fmt: skip
