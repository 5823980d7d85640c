"""``lipsync bench`` (lipsync.tools.bench): the model loop and a real clip end to end, the fast
modes' report, what compile returns being what is timed, and the GPU-busy sampler."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest
import torch

from lipsync.config import LoadOptions
from lipsync.media import read_frames
from lipsync.pipeline import RunOptions
from tests.support.cli import lipsync_cli, lipsync_main
from tests.support.media_factory import make_audio, make_video, speechlike
from tests.support.shared import MEDIA


def test_cli_bench_smoke_on_cpu(capsys):
    proc = lipsync_cli("bench", "--preset", "tiny", "--steps", "2", "--chunks", "1", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert set(report["ms_per_frame"]) == {"vae_encode", "unet", "vae_decode"}
    assert all(v > 0 for v in report["ms_per_frame"].values())
    assert report["model_fps"] > 0 and report["unet_gflop_per_call"] > 1.0
    assert report["gpu_busy_share"] is None  # no GPU: nothing to sample, not a made-up number
    proc = lipsync_main(capsys, "bench", "--mode", "turbo", "--steps", "1")
    assert proc.returncode == 2 and "unknown mode 'turbo'" in proc.stderr


@pytest.mark.parametrize("tool", ["bench", "profile"])
def test_bench_and_profile_run_what_compile_returns(monkeypatch, tmp_path, tool):
    """A "full" compile wraps the U-Net; timing the unwrapped one would time eager code."""
    import lipsync.accel.compile as accel
    from lipsync.tools.bench import bench_model
    from lipsync.tools.profile import profile_model

    calls = {"wrapped": 0, "vae": 0}

    class Wrapped(torch.nn.Module):  # stands in for torch.compile's OptimizedModule
        def __init__(self, unet):
            super().__init__()
            self.inner = unet

        def __getattr__(self, name):
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self.inner, name)

        def forward(self, *args, **kwargs):
            calls["wrapped"] += 1
            return self.inner(*args, **kwargs)

    def fake_vae(vae, mode):
        calls["vae"] += 1
        return vae

    monkeypatch.setattr(accel, "compile_unet", lambda unet, mode: Wrapped(unet))
    monkeypatch.setattr(accel, "compile_vae", fake_vae)
    load = LoadOptions(preset="tiny", compile="full")
    run = RunOptions(steps=2, chunk_frames=4)
    if tool == "bench":
        bench_model(load, run, chunks=1)
    else:
        profile_model(str(tmp_path), load, run)
    assert calls["wrapped"] == 2 * 2  # warm-up + measured chunk, 2 steps each
    assert calls["vae"] == 1


@pytest.mark.e2e
def test_cli_bench_on_a_real_clip_end_to_end(tmp_path, capsys):
    frames = read_frames(MEDIA / "demo1_video.mp4", stop=12)[:, 380:980, 295:895]
    video = make_video(
        tmp_path / "face.mp4", seconds=0.48, size=(600, 600), crf=18,
        draw=lambda i, _: frames[min(i, len(frames) - 1)],
    )  # fmt: skip
    audio = make_audio(tmp_path / "speech.wav", signal=speechlike(0.48, seed=3))
    proc = lipsync_cli("bench", "--preset", "tiny", "--steps", "2", "--frames", "8", "--video",
                   str(video), "--audio", str(audio), "--face-cache", str(tmp_path / "faces"),
                   "--mode", "fast", "--dub-seconds", "1.44", "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["frames"] == 12 and report["frames_with_face"] == 12
    # the long dub: the 12-frame clip looped under its audio repeated to 36 frames
    dub = report["long_dub"]
    assert dub["frames"] == 36 and dub["looped"] and dub["video_frames"] == 12
    assert dub["details"]["frames_decoded"] == 12  # decoded once, kept for the run
    assert dub["details"]["face_encodings"]["reused_chunks"] >= 1
    assert report["long_dub_fps_ratio"] == pytest.approx(
        dub["fps_end_to_end"] / report["fps_end_to_end"], abs=0.01
    )
    assert report["fps_end_to_end"] == pytest.approx(12 / report["wall_s"], rel=0.02)
    assert report["stage_seconds"]["denoise"] > 0 and report["mode"] == "fast"
    assert report["denoise"]["cache_interval"] == 3
    assert list((tmp_path / "faces").glob("*.npz")), "the warm-up run fills the face cache"
    proc = lipsync_main(capsys, "bench", "--preset", "tiny", "--video", video)
    assert proc.returncode == 2 and "--video and --audio go together" in proc.stderr


def test_gpu_busy_reads_nvidia_smi_samples(tmp_path, monkeypatch):
    """The nvidia-smi fallback: a stand-in that prints what the real one prints with -lms."""

    from lipsync.tools.gpu_busy import GpuBusy

    fake = tmp_path / "nvidia-smi"
    fake.write_text(
        f"#!{sys.executable}\nimport sys, time\n"
        "assert '--query-gpu=utilization.gpu' in sys.argv\n"
        "for v in [7] + [40, 60] * 50:\n    print(v, flush=True)\n    time.sleep(0.02)\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setitem(sys.modules, "pynvml", None)  # force the fallback
    with GpuBusy(0, interval_s=0.02) as busy:
        time.sleep(0.8)
    assert busy.source == "nvidia-smi"
    assert len(busy.samples) >= 10 and 7.0 not in busy.samples  # the stale first sample dropped
    assert busy.share == pytest.approx(0.5, abs=0.05)
    with GpuBusy(None) as none:
        pass
    assert none.share is None and none.source is None


def test_bench_fast_mode_reports_its_options(tmp_path):
    proc = lipsync_cli("bench", "--preset", "tiny", "--frames", "4", "--steps", "6", "--chunks",
                       "1", "--mode", "fast", "--json", timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["mode"] == "fast" and report["exact"] is False
    assert report["denoise"]["cache_interval"] == 3 and report["denoise"]["guidance_steps"] == 0.5
    assert report["unet_calls_per_chunk"] == {
        "guided_full": 1, "guided_cached": 2, "conditional_full": 1, "conditional_cached": 2,
    }  # fmt: skip
    assert 0.2 < report["unet_flop_share_of_exact"] < 0.45
    assert report["unet_loop_fps"] > 0


def test_fp8_flag_is_refused_without_a_capable_gpu(capsys):
    proc = lipsync_main(capsys, "bench", "--preset", "tiny", "--fp8", "--device", "cpu")
    lines = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1 and "FP8" in lines[0], proc.stderr[-800:]
