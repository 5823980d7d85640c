"""The speed modes through the whole pipeline: ``lipsync run --mode fast`` on a short clip, and
the Python API's modes against the exact one."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lipsync import LipSync
from tests.support.cli import lipsync_cli
from tests.support.media_factory import make_audio, speechlike
from tests.support.shared import face_clip

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


@pytest.fixture(scope="module")
def face_frames(small_demo_frames):
    """16 frames of the demo's face, 320x320."""
    return small_demo_frames[:16]


def test_run_fast_mode_on_a_short_clip(tmp_path, face_frames):
    video = face_clip(tmp_path / "v.mp4", face_frames, 0.64)
    audio = make_audio(tmp_path / "a.wav", seconds=0.64, signal=speechlike(0.64))
    out = tmp_path / "o.mp4"
    proc = lipsync_cli("run", video, audio, "-o", out, "--preset", "tiny", "--steps", "4",
                       "--quiet", "--mode", "fast", "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["mode"] == "fast" and report["fp8"] is False
    assert report["denoise"]["cache_interval"] == 3 and report["denoise"]["steps"] == 4
    assert report["frames"] == 16 and report["frames_with_face"] == 16 and out.exists()


def test_api_modes_differ_little_and_report_their_options(face_frames):
    ls = LipSync.from_pretrained("tiny", device="cpu")
    frames, wav = face_frames, speechlike(0.64)
    exact, r_exact = ls.run_arrays(frames, wav, steps=4, seed=5)
    fast, r_fast = ls.run_arrays(frames, wav, steps=4, seed=5, mode="fast", cache_interval=2)
    other, _ = ls.run_arrays(frames, wav, steps=4, seed=6)
    assert r_exact.mode == "exact" and r_exact.denoise["cache_interval"] == 1
    assert r_fast.mode == "fast" and r_fast.denoise["cache_interval"] == 2
    changed = np.abs(exact.astype(int) - frames.astype(int)).max(-1) > 0  # the mouth region
    err = np.abs(fast.astype(int) - exact.astype(int))[changed].mean()
    seed_err = np.abs(other.astype(int) - exact.astype(int))[changed].mean()
    print(f"mean abs difference in the changed pixels: fast {err:.2f}, another seed {seed_err:.2f}")
    assert 0 < err < 0.5 * seed_err
