"""VAE wrapper, scheduler, the model bundle loader and the ``lipsync check`` command."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import MEDIA, REFERENCE
from safetensors.torch import save_file

from lipsync.config import Preset
from lipsync.errors import CheckpointError, ConfigError
from lipsync.models.bundle import load_models, parse_dtype
from lipsync.models.scheduler import make_scheduler
from lipsync.models.vae import (
    SCALING_FACTOR,
    SD_VAE_FT_MSE_CONFIG,
    TINY_VAE_CONFIG,
    build_autoencoder,
    load_vae,
    random_vae,
)


def test_sd_vae_ft_mse_architecture():
    with torch.device("meta"):
        model = build_autoencoder(SD_VAE_FT_MSE_CONFIG)
    assert sum(p.numel() for p in model.parameters()) == 83_653_863
    assert SCALING_FACTOR == 0.18215


def test_vae_encode_is_scaled_posterior_mean_and_decode_inverts_scale():
    vae = random_vae()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.inference_mode():
        z = vae.encode(x)
        mean = vae.autoencoder.encode(x).latent_dist.mean
        assert z.shape == (2, 4, 8, 8)
        torch.testing.assert_close(z, mean * SCALING_FACTOR)
        torch.testing.assert_close(vae.decode(z), vae.autoencoder.decode(mean).sample)


def deprecated_names(state):
    out = {}
    for k, v in state.items():
        if ".attentions." in k:
            k = (
                k.replace(".to_q.", ".query.")
                .replace(".to_k.", ".key.")
                .replace(".to_v.", ".value.")
                .replace(".to_out.0.", ".proj_attn.")
            )
        out[k] = v
    return out


def write_vae_folder(folder, state):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(TINY_VAE_CONFIG))
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))


def test_load_vae_folder_strict_with_old_attention_names(tmp_path):
    source = random_vae(seed=3)
    state = {k: v.contiguous() for k, v in source.autoencoder.state_dict().items()}
    write_vae_folder(tmp_path / "vae", deprecated_names(state))
    loaded = load_vae(tmp_path / "vae", dtype=torch.float16)
    assert next(loaded.autoencoder.parameters()).dtype == torch.float16
    for k, v in loaded.autoencoder.state_dict().items():
        assert torch.equal(v, state[k].half()), k


def test_load_vae_refuses_partial_files(tmp_path):
    state = {k: v.contiguous() for k, v in random_vae().autoencoder.state_dict().items()}
    state.pop("decoder.conv_out.weight")
    write_vae_folder(tmp_path / "vae", state)
    with pytest.raises(CheckpointError, match="1 missing keys \\(e.g. decoder.conv_out.weight\\)"):
        load_vae(tmp_path / "vae")


def test_ddim_scheduler_matches_reference_config():
    sched = make_scheduler("ddim")
    cfg = json.loads((REFERENCE / "scheduler_config.json").read_text())
    for key in ("beta_start", "beta_end", "beta_schedule", "steps_offset", "clip_sample"):
        assert sched.config[key] == cfg[key]
    sched.set_timesteps(20)
    assert sched.timesteps.tolist() == list(range(951, 0, -50))
    with pytest.raises(ConfigError):
        make_scheduler("euler-ancestral-magic")


def test_dpm_scheduler_available_for_fast_modes():
    sched = make_scheduler("dpm++")
    sched.set_timesteps(8)
    assert len(sched.timesteps) == 8


def test_parse_dtype():
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("FP16") is torch.float16
    with pytest.raises(ConfigError):
        parse_dtype("int4")


def test_load_models_reads_a_downloaded_cache_layout(tmp_path):
    # A preset whose files are laid out exactly as `lipsync download` leaves them.
    preset = Preset(
        name="vtest",
        resolution=128,
        unet_config_file="unet_tiny_config.json",
        hf_repo="ByteDance/LatentSync-test",
    )
    base = tmp_path / "vtest"
    (base / "whisper").mkdir(parents=True)
    from safetensors.torch import load_file

    torch.save(
        {"state_dict": load_file(str(REFERENCE / "unet_tiny/weights.safetensors"))},
        base / "latentsync_unet.pt",
    )
    shutil.copy(REFERENCE / "whisper_tiny/encoder_random.pt", base / "whisper/tiny.pt")
    vae_state = {k: v.contiguous() for k, v in random_vae().autoencoder.state_dict().items()}
    write_vae_folder(tmp_path / "sd-vae-ft-mse", vae_state)
    bundle = load_models(preset, root=tmp_path, dtype="bf16")
    assert bundle.unet.dtype == torch.bfloat16
    assert bundle.vae.dtype == torch.bfloat16
    assert bundle.audio.dims.n_audio_state == 384


def run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "lipsync.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def test_cli_check_tiny_json():
    proc = run_cli("check", "--preset", "tiny", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["unet_output"] == [1, 4, 16, 16, 16]
    assert report["audio_windows"] == [16, 50, 384]
    assert report["unet_output_finite"] is True


def test_cli_user_errors_are_one_line(tmp_path):
    import os

    env = dict(os.environ, LIPSYNC_HOME=str(tmp_path))
    for args, text in [
        (("check", "--preset", "v9"), "error: unknown preset 'v9'"),
        (("check", "--preset", "v1.5"), "error: v1.5 checkpoints not found"),
        (("check", "--dtype", "int3"), "error: unknown dtype 'int3'"),
    ]:
        proc = run_cli(*args, env=env)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2, (args, proc.stderr)
        assert len(lines) == 1 and lines[0].startswith(text), (args, proc.stderr)


def test_cli_presets_json(tmp_path):
    proc = run_cli("presets", "--json", "--dir", str(tmp_path))
    rows = {row["name"]: row for row in json.loads(proc.stdout)}
    assert rows["v1.6"]["resolution"] == 512
    assert rows["v1.6"]["checkpoints"].startswith("missing: lipsync download --version 1.6")
    assert rows["tiny"]["checkpoints"].startswith("random weights")


def test_cli_bench_smoke_on_cpu():
    proc = run_cli("bench", "--preset", "tiny", "--steps", "2", "--chunks", "1", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert set(report["ms_per_frame"]) == {"vae_encode", "unet", "vae_decode"}
    assert all(v > 0 for v in report["ms_per_frame"].values())
    assert report["model_fps"] > 0 and report["unet_gflop_per_call"] > 1.0
    assert report["gpu_busy_share"] is None  # no GPU: nothing to sample, not a made-up number
    proc = run_cli("bench", "--mode", "turbo", "--steps", "1")
    assert proc.returncode == 2 and "unknown mode 'turbo'" in proc.stderr


def test_cli_bench_on_a_real_clip_end_to_end(tmp_path):
    from media_factory import make_audio, make_video, speechlike

    from lipsync.media import read_frames

    frames = read_frames(MEDIA / "demo1_video.mp4", stop=12)[:, 380:980, 295:895]
    video = make_video(
        tmp_path / "face.mp4", seconds=0.48, size=(600, 600), crf=18,
        draw=lambda i, _: frames[min(i, len(frames) - 1)],
    )  # fmt: skip
    audio = make_audio(tmp_path / "speech.wav", signal=speechlike(0.48, seed=3))
    proc = run_cli("bench", "--preset", "tiny", "--steps", "2", "--frames", "8", "--video",
                   str(video), "--audio", str(audio), "--face-cache", str(tmp_path / "faces"),
                   "--mode", "fast", "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["frames"] == 12 and report["frames_with_face"] == 12
    assert report["fps_end_to_end"] == pytest.approx(12 / report["wall_s"], rel=0.02)
    assert report["stage_seconds"]["denoise"] > 0 and report["mode"] == "fast"
    assert report["denoise"]["cache_interval"] == 3
    assert list((tmp_path / "faces").glob("*.npz")), "the warm-up run fills the face cache"
    proc = run_cli("bench", "--preset", "tiny", "--video", str(video))
    assert proc.returncode == 2 and "--video and --audio go together" in proc.stderr


def test_gpu_busy_reads_nvidia_smi_samples(tmp_path, monkeypatch):
    """The nvidia-smi fallback: a stand-in that prints what the real one prints with -lms."""
    import sys
    import time

    from lipsync.gpu_busy import GpuBusy

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


def test_cli_profile_writes_a_chrome_trace(tmp_path):
    proc = run_cli("profile", "--out", str(tmp_path), "--steps", "1", "--frames", "8")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "aten::" in proc.stdout and "# of Calls" in proc.stdout
    trace = json.loads((tmp_path / "trace.json").read_text())
    assert len(trace["traceEvents"]) > 100


def test_cli_usage_errors_are_one_message_not_a_traceback():
    proc = run_cli("run", "--bogus")
    assert proc.returncode == 2 and "No such option: --bogus" in proc.stderr
    assert "Traceback" not in proc.stderr
