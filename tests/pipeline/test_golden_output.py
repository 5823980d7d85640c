"""Bit-exact output guard: refactors must not change what `lipsync run` produces.

The hashes below are of the decoded video frames of two `lipsync run` calls (tiny preset, the demo
clip, the first 1.92 s of its audio = 48 frames = 3 chunks), recorded on commit 7e129a3 (before the
architecture rework of issue #12) with torch 2.13.0 (CPU) on this project's CI machine kind.
The whole 240-frame demo run (exact, 20 steps) and the 6-step fast run were checked by hand against
hashes recorded on the same commit (docs/NOTES.md, "Bit-exact refactors").

If a change is *meant* to change the output, re-record: run this file with
``LIPSYNC_GOLDEN_PRINT=1 pytest tests/pipeline/test_golden_output.py -s`` and update the constants
in the same commit, saying why.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import av
import pytest

from lipsync.audio import load_audio
from tests.support.media_factory import make_audio
from tests.support.shared import MEDIA

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

DEMO_VIDEO = MEDIA / "demo1_video.mp4"
DEMO_AUDIO = MEDIA / "demo1_audio.wav"

GOLDEN = {
    "exact": (
        ["--steps", "3"],
        "98adb13145931988c2dfbaaa975fbd00306324f68fdc1278486dbce96e5e0efe",
    ),
    "fast": (
        ["--mode", "fast", "--scheduler", "dpm++", "--steps", "4"],
        "f1ab05414db60557e51b8b688fbf07925f206d10babb2cf7c2aae78b26f15093",
    ),
}


def decoded_frames_sha256(path) -> tuple[int, str]:
    h = hashlib.sha256()
    n = 0
    with av.open(str(path)) as c:
        for frame in c.decode(video=0):
            h.update(frame.to_ndarray(format="rgb24").tobytes())
            n += 1
    return n, h.hexdigest()


@pytest.fixture(scope="module")
def short_audio(tmp_path_factory):
    wav = load_audio(DEMO_AUDIO)[: int(1.92 * 16000)]
    return make_audio(tmp_path_factory.mktemp("golden") / "demo_1.92s.wav", signal=wav)


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_output_frames_are_bit_identical_to_the_recorded_run(name, short_audio, tmp_path):
    args, expected = GOLDEN[name]
    out = tmp_path / f"{name}.mp4"
    cmd = [sys.executable, "-m", "lipsync.cli", "run", str(DEMO_VIDEO), str(short_audio)]
    cmd += ["-o", str(out), "--preset", "tiny", "--seed", "3", "--quiet", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    n, digest = decoded_frames_sha256(out)
    if os.environ.get("LIPSYNC_GOLDEN_PRINT"):
        print(f"{name}: {n} frames, sha256 {digest}")
    assert n == 48
    assert digest == expected, f"{name}: decoded frames changed (sha256 {digest})"
