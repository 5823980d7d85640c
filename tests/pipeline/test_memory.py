"""Streaming: peak memory does not grow with the video's length (tiny preset, real pipeline).

A 60 s input against a 10 s one: 1250 more frames, 384 MB of them decoded at 320x320, far above
the 10 % allowed; README "Lip-sync a video" has the measured peaks of a 20 s and a 2-minute run."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests.support.media_factory import make_audio, make_video, speechlike

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

MEASURE = textwrap.dedent(
    """
    import json, sys
    from lipsync.cli import main
    try:
        main(sys.argv[1:])
    except SystemExit as e:
        if e.code:
            raise
    # VmHWM, not getrusage: a child's ru_maxrss starts at its parent's high-water mark
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
    print(json.dumps({"max_rss_kib": int(hwm)}))
    """
)


def peak_rss(video, audio, out) -> int:
    args = ["run", str(video), str(audio), "-o", str(out), "--preset", "tiny", "--steps", "1",
            "--guidance", "1.0", "--quiet", "--json"]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, *args], capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith('{"max_rss_kib"')]
    return json.loads(lines[-1])["max_rss_kib"]


def test_six_times_longer_input_needs_no_more_memory(tmp_path, small_demo_frames):
    n = len(small_demo_frames)

    def draw(i, t):  # ping-pong through the 3 s of face frames
        k = i % (2 * n)
        return small_demo_frames[k if k < n else 2 * n - 1 - k]

    results = {}
    for seconds in (10, 60):
        video = make_video(tmp_path / f"v{seconds}.mp4", seconds=seconds, size=(320, 320),
                           draw=draw, preset="ultrafast")  # fmt: skip
        audio = make_audio(tmp_path / f"a{seconds}.wav", seconds=seconds,
                           signal=speechlike(seconds))  # fmt: skip
        results[seconds] = peak_rss(video, audio, tmp_path / f"o{seconds}.mp4")
    print(f"peak RSS: 10 s input {results[10] / 1024:.0f} MiB, 60 s {results[60] / 1024:.0f} MiB")
    assert results[60] <= 1.10 * results[10], results
