"""End to end: the real demo clip and generated clips through `lipsync run` (tiny preset).

The tiny preset has random weights, so the mouths it paints are meaningless; these tests check
the plumbing a user relies on: timeline, audio, untouched surroundings, a changed mouth region,
looping, reports, errors, interruption and memory.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from lipsync.audio import load_audio
from lipsync.errors import NoFaceError
from lipsync.media import read_frames
from tests.support.cli import lipsync_cli, lipsync_main
from tests.support.media_factory import make_audio, make_video, speechlike
from tests.support.shared import DEMO_AUDIO, DEMO_VIDEO, face_clip

FAST = ["--preset", "tiny", "--steps", "2", "--quiet"]


def video_stream_info(path: Path) -> tuple[float, int]:
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        n = sum(1 for _ in c.decode(s))
        return float(s.average_rate), n


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "synced.mp4"
    t = time.perf_counter()
    proc = lipsync_cli("run", DEMO_VIDEO, DEMO_AUDIO, "-o", out, *FAST, "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    report["wall_s"] = time.perf_counter() - t
    return out, report


@pytest.mark.slow
@pytest.mark.e2e
def test_demo_clip_timeline_and_report(demo_run):
    out, report = demo_run
    print(f"demo end to end: {report['wall_s']:.1f} s wall, report {report['seconds']}")
    fps, n = video_stream_info(out)
    audio_frames = len(load_audio(DEMO_AUDIO)) / 16000 * 25
    assert fps == 25.0
    assert abs(n - audio_frames) <= 1, (n, audio_frames)
    assert report["frames"] == n == 240
    assert report["frames_without_face"] == 0 and report["frames_with_face"] == 240
    assert report["looped"] is False
    assert set(report["seconds"]) >= {"validate", "audio", "faces", "denoise", "encode"}


@pytest.mark.slow
@pytest.mark.e2e
def test_demo_clip_audio_is_the_input_audio(demo_run):
    out, _ = demo_run
    ours = load_audio(out)
    ref = load_audio(DEMO_AUDIO)
    # AAC adds encoder delay: align by cross-correlation over a small window, then correlate.
    n = min(len(ours), len(ref)) - 4000
    best = max((np.corrcoef(ours[lag : lag + n], ref[:n])[0, 1], lag) for lag in range(0, 3000, 1))
    print(f"audio correlation {best[0]:.4f} at lag {best[1]} samples")
    assert best[0] >= 0.99
    assert abs(len(ours) - len(ref)) <= 2048  # trimmed to the video (+ AAC frame padding)


@pytest.mark.slow
@pytest.mark.e2e
def test_demo_clip_pixels_outside_face_unchanged_and_mouth_changed(demo_run):
    out, _ = demo_run
    ours = read_frames(out, stop=48).astype(np.int16)
    src = read_frames(DEMO_VIDEO, stop=48).astype(np.int16)
    from lipsync.face.align import crop_size, estimate_transforms
    from lipsync.face.detect import MediaPipeDetector

    with MediaPipeDetector() as det:
        faces = det.detect(src.astype(np.uint8))
    pts = np.stack([f.points3 for f in faces]).astype(np.float32)
    mats = estimate_transforms(pts, 128)
    # The crop's corners in the frame: everything outside their bounding box (+ margin) is
    # the encoder's business only.
    w, h = crop_size(128)
    inv = np.linalg.inv(np.concatenate([mats, np.tile([[[0, 0, 1]]], (len(mats), 1, 1))], 1))
    corners = np.array([[0, 0, 1], [w, 0, 1], [0, h, 1], [w, h, 1]], dtype=np.float64).T
    frame_pts = inv[:, :2] @ corners  # (n, 2, 4)
    x0, y0 = frame_pts.min(axis=(0, 2)) - 8
    x1, y1 = frame_pts.max(axis=(0, 2)) + 8
    outside = np.ones(src.shape[1:3], dtype=bool)
    outside[int(max(y0, 0)) : int(y1), int(max(x0, 0)) : int(x1)] = False
    diff = np.abs(ours - src)
    outside_err = diff[:, outside].mean()
    # the mouth: the lower middle of the face box
    mouth = np.zeros_like(outside)
    cy0, cy1 = int(y0 + 0.62 * (y1 - y0)), int(y0 + 0.85 * (y1 - y0))
    cx0, cx1 = int(x0 + 0.3 * (x1 - x0)), int(x0 + 0.7 * (x1 - x0))
    mouth[cy0:cy1, cx0:cx1] = True
    mouth_err = diff[:, mouth].mean()
    print(f"mean abs diff: outside the face {outside_err:.2f}, mouth region {mouth_err:.2f}")
    assert outside_err < 2.0  # codec noise (both encoded at crf ~18)
    assert mouth_err > 8.0  # random weights paint something else there


@pytest.mark.e2e
def test_30fps_input_gives_25fps_output(tmp_path, small_demo_frames):
    video = face_clip(tmp_path / "in30.mp4", small_demo_frames, 2.0, fps=30)
    audio = make_audio(tmp_path / "a.wav", seconds=1.6, signal=speechlike(1.6))
    out = tmp_path / "out.mp4"
    proc = lipsync_cli("run", video, audio, "-o", out, *FAST, "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    fps, n = video_stream_info(out)
    assert fps == 25.0 and n == 40


@pytest.mark.e2e
def test_audio_longer_than_video_loops_ping_pong(tmp_path, small_demo_frames):
    video = face_clip(tmp_path / "short.mp4", small_demo_frames, 1.0)
    audio = make_audio(tmp_path / "long.wav", seconds=2.4, signal=speechlike(2.4))
    out = tmp_path / "out.mp4"
    proc = lipsync_cli("run", video, audio, "-o", out, *FAST, "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["looped"] is True and report["video_frames"] == 25 and report["frames"] == 60
    frames = read_frames(out).astype(np.int16)
    assert len(frames) == 60
    # ping-pong: output frame 25 + k shows source frame 24 - k, so it matches output 24 - k
    # outside the face; check the corners of the frame
    corner = (slice(0, 60), slice(0, 100))
    for k in (0, 5, 20):
        a, b = frames[25 + k][corner], frames[24 - k][corner]
        assert np.abs(a - b).mean() < 2.0, k


@pytest.mark.e2e
def test_audio_shorter_than_video_ends_with_the_audio(tmp_path, small_demo_frames):
    video = face_clip(tmp_path / "v.mp4", small_demo_frames, 2.0, audio=True)
    audio = make_audio(tmp_path / "short.wav", seconds=0.8, signal=speechlike(0.8))
    out = tmp_path / "out.mp4"
    proc = lipsync_cli("run", video, audio, "-o", out, *FAST, "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    _, n = video_stream_info(out)
    assert n == 20
    assert abs(len(load_audio(out)) - 0.8 * 16000) <= 2048


@pytest.mark.slow
@pytest.mark.e2e
def test_json_report_fields(demo_run):
    _, report = demo_run  # `lipsync run ... --json` on the demo clip
    for key in ("output", "frames", "frames_without_face", "seconds", "fps", "seed", "preset"):
        assert key in report
    assert report["preset"] == "tiny" and report["seed"] == 1247 and report["fps"] > 0


def test_refuses_existing_output_and_input_as_output(tmp_path, small_demo_frames, capsys):
    video = face_clip(tmp_path / "v.mp4", small_demo_frames, 0.4)
    audio = make_audio(tmp_path / "a.wav", seconds=0.4)
    existing = tmp_path / "exists.mp4"
    existing.write_bytes(b"keep me")
    for out, text in [(existing, "exists"), (video, "input")]:
        proc = lipsync_main(capsys, "run", video, audio, "-o", out, *FAST)
        lines = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
        assert proc.returncode == 2 and len(lines) == 1 and text in lines[0], proc.stderr[-800:]
    assert existing.read_bytes() == b"keep me"


def test_video_without_face_fails_before_heavy_work(tmp_path, capsys):
    video = make_video(tmp_path / "noface.mp4", seconds=1.0, size=(160, 120))
    audio = make_audio(tmp_path / "a.wav", seconds=1.0)
    out = tmp_path / "o.mp4"
    proc = lipsync_main(capsys, "run", video, audio, "-o", out, *FAST)
    assert proc.returncode == 2
    assert "no usable face" in proc.stderr or "no face" in proc.stderr
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.wav", "noface.mp4"]


@pytest.mark.e2e
def test_in_memory_api_and_seed_determinism(small_demo_frames):
    from lipsync import LipSync

    ls = LipSync.from_pretrained("tiny", device="cpu")
    wav = speechlike(0.64)
    frames = small_demo_frames[:16]
    a, report = ls.run_arrays(frames, wav, steps=2, seed=5)
    b, _ = ls.run_arrays(frames, wav, steps=2, seed=5)
    c, _ = ls.run_arrays(frames, wav, steps=2, seed=6)
    assert a.shape == (16, 320, 320, 3) and report.frames == 16
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a, frames)
    with pytest.raises(NoFaceError):
        ls.run_arrays(np.zeros((8, 120, 160, 3), np.uint8), wav, steps=1)


@pytest.mark.e2e
def test_ctrl_c_leaves_no_partial_output(tmp_path):
    out = tmp_path / "o.mp4"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lipsync.cli", "run", str(DEMO_VIDEO), str(DEMO_AUDIO), "-o",
         str(out), "--preset", "tiny", "--steps", "20", "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # a test runner started in the background may ignore SIGINT, and children inherit that
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    # wait until the encoder has its temp file (denoising has started), then interrupt
    deadline = time.time() + 120
    while time.time() < deadline and not any(tmp_path.glob(".o.*partial*")):
        time.sleep(0.2)
    assert any(tmp_path.glob(".o.*partial*")), "the run never started writing"
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-1000:]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.e2e
def test_face_cache_skips_tracking_and_gives_the_same_output(
    tmp_path, small_demo_frames, monkeypatch
):
    import lipsync.face.detect as detect_module
    from lipsync import LipSync
    from lipsync.face.cache import track_key

    video = face_clip(tmp_path / "v.mp4", small_demo_frames[:20], seconds=0.8)
    audio = make_audio(tmp_path / "a.wav", signal=speechlike(0.8))
    cache = tmp_path / "faces"
    ls = LipSync.from_pretrained("tiny", device="cpu")
    first = ls.run(video, audio, tmp_path / "1.mp4", steps=1, face_cache=str(cache))
    entries = list(cache.glob("*.npz"))
    assert [p.stem for p in entries] == [track_key(video, 64)]

    class NoDetector:
        def __init__(self, *a, **k):
            raise AssertionError("face tracking ran although the track was cached")

    monkeypatch.setattr(detect_module, "MediaPipeDetector", NoDetector)
    second = ls.run(video, audio, tmp_path / "2.mp4", steps=1, face_cache=str(cache))
    assert second.frames_with_face == first.frames_with_face == 20
    assert np.array_equal(read_frames(tmp_path / "1.mp4"), read_frames(tmp_path / "2.mp4"))
    # shorter audio needs fewer frames: the stored (longer) track serves it as well
    short = make_audio(tmp_path / "s.wav", signal=speechlike(0.4))
    third = ls.run(video, short, tmp_path / "4.mp4", steps=1, face_cache=str(cache))
    assert third.frames == third.frames_with_face == 10
    # a different video (or setting) is a different entry: tracking would run again
    other = face_clip(tmp_path / "w.mp4", small_demo_frames[20:40], seconds=0.8)
    assert track_key(other, 64) != track_key(video, 64)
    assert track_key(video, 80) != track_key(video, 64)
    with pytest.raises(AssertionError, match="face tracking ran"):
        ls.run(other, audio, tmp_path / "3.mp4", steps=1, face_cache=str(cache))


def test_sync_chunk_same_result_for_frames_on_device_and_in_numpy(small_demo_frames):
    # On CUDA the pass-2 frames stay on the GPU (tensor path); elsewhere numpy: same pixels.
    from lipsync import LipSync
    from lipsync.diffusion import DenoiseOptions
    from lipsync.face.align import estimate_transforms
    from lipsync.face.detect import MediaPipeDetector
    from lipsync.face.mask import make_mask

    pipe = LipSync.from_pretrained("tiny", device="cpu").pipeline
    frames = small_demo_frames[:4]
    with MediaPipeDetector() as det:
        pts = [det.tracker.update(o).face.points3 for o in det.detect_all(frames)]
    mats = estimate_transforms(np.stack(pts).astype(np.float32), 128, smooth=True)
    usable = np.array([True, False, True, True])
    windows = torch.randn(4, 50, 384, generator=torch.Generator().manual_seed(0))
    mask = torch.from_numpy(make_mask(128))
    args = (mats, usable, windows, mask, DenoiseOptions(steps=1))
    a = pipe._sync_chunk(frames.copy(), *args, seed=1, chunk_index=0)
    b = pipe._sync_chunk(torch.from_numpy(frames.copy()), *args, seed=1, chunk_index=0)
    assert isinstance(b, torch.Tensor) and np.array_equal(a, b.numpy())
    assert np.array_equal(a[1], frames[1]) and not np.array_equal(a[0], frames[0])
    # every frame usable: no gather/scatter on either path, still the same pixels
    every = (mats, np.ones(4, dtype=bool), windows, mask, DenoiseOptions(steps=1))
    a = pipe._sync_chunk(frames.copy(), *every, seed=1, chunk_index=0)
    b = pipe._sync_chunk(torch.from_numpy(frames.copy()), *every, seed=1, chunk_index=0)
    assert isinstance(b, torch.Tensor) and np.array_equal(a, b.numpy())
    assert not np.array_equal(a[1], frames[1])
