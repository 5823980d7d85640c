"""VAE wrapper, scheduler, the model bundle loader and the ``lipsync check`` command."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from lipsync.checkpoints import load_vae
from lipsync.config import Preset
from lipsync.errors import CheckpointError, ConfigError
from lipsync.loading import load_models, parse_dtype
from lipsync.models.scheduler import make_scheduler
from lipsync.models.vae import (
    SCALING_FACTOR,
    SD_VAE_FT_MSE_CONFIG,
    TINY_VAE_CONFIG,
    build_autoencoder,
    random_vae,
)
from tests.support.shared import MEDIA, REFERENCE


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
    bundle = load_models(preset, checkpoint_dir=tmp_path, dtype="bf16")
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


@pytest.mark.parametrize("tool", ["bench", "profile"])
def test_bench_and_profile_run_what_compile_returns(monkeypatch, tmp_path, tool):
    """A "full" compile wraps the U-Net; timing the unwrapped one would time eager code."""
    import lipsync.accel.compile as accel
    from lipsync.config import LoadOptions
    from lipsync.pipeline import RunOptions
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


def test_cli_bench_on_a_real_clip_end_to_end(tmp_path):
    from lipsync.media import read_frames
    from tests.support.media_factory import make_audio, make_video, speechlike

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


def test_cli_profile_writes_a_chrome_trace_and_a_summary(tmp_path):
    proc = run_cli(
        "profile", "--out", str(tmp_path), "--steps", "2", "--frames", "8", "--mode", "fast"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "aten::" in proc.stdout and "# of Calls" in proc.stdout
    assert "time by kernel class (self CPU time)" in proc.stdout
    trace = json.loads((tmp_path / "trace.json").read_text())
    assert len(trace["traceEvents"]) > 100
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["denoise"]["cache_interval"] == 3  # --mode fast reached the denoiser
    by_category = summary["by_category"]
    for category in ("convolution", "matmul", "attention", "normalisation"):
        assert by_category[category]["ms"] > 0, category
    assert sum(row["share"] for row in by_category.values()) == pytest.approx(1.0, abs=1e-3)
    stages = summary["by_stage"]
    assert set(stages) >= {"lipsync.vae_encode", "lipsync.vae_decode", "lipsync.unet_step_guided"}
    assert stages["lipsync.vae_encode"]["by_category"]["convolution"]["ms"] > 0
    assert "attention" in stages["lipsync.unet_step_guided"]["by_category"]
    # the stages split the same time the classes do
    total_ms = sum(row["ms"] for row in by_category.values())
    assert sum(row["ms"] for row in stages.values()) == pytest.approx(total_ms, rel=1e-3)
    assert "lipsync.unet_step_guided:" in proc.stdout


def test_kernel_classes_of_gpu_and_inductor_names():
    from lipsync.tools.profile import categorize

    assert categorize("aten::_cudnn_attention_forward") == "attention"
    assert categorize("aten::_efficient_attention_forward") == "attention"
    assert categorize("aten::cudnn_convolution") == "convolution"
    assert categorize("aten::addmm", "nvjet_sm90_tst_320x128_64x3") == "matmul"
    assert categorize("aten::_scaled_mm") == "matmul"
    assert categorize("aten::native_group_norm") == "normalisation"
    assert categorize("aten::normal_") == "element-wise & reductions"  # a random draw
    assert categorize("aten::copy_", "Memcpy HtoD (Pinned -> Device)") == "copy"
    # inductor names fused kernels after what they absorbed: a bias add after a convolution
    assert categorize("triton_poi_fused_add_convolution_3") == "fused (inductor)"
    assert categorize("triton_red_fused_native_group_norm_silu_0") == "normalisation"
    assert categorize("triton_tem_fused_mm_7") == "matmul"
    assert categorize("triton_tem_fused_convolution_2") == "convolution"
    assert categorize("Torch-Compiled Region: 1/0") == "other"


def test_device_time_goes_to_the_launching_operator_and_its_stage():
    """The GPU path on profiler-shaped events: kernels count once, under their operator, also
    when the profiler linked them to a runtime call ("Command Buffer Full", cudaLaunchKernel)."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from lipsync.tools.profile import time_by_category, time_by_stage

    def event(name, parent=None, kernels=()):
        return SimpleNamespace(
            name=name, cpu_parent=parent, device_type=DeviceType.CPU, is_async=False,
            kernels=[SimpleNamespace(name=k, duration=us) for k, us in kernels],
            self_cpu_time_total=1.0,
        )  # fmt: skip

    step = event("lipsync.unet_step_guided")
    region = event("Torch-Compiled Region: 1/0", step)
    conv = event("aten::cudnn_convolution", region, [("sm90_xmma_fprop", 300.0)])
    addmm = event("aten::addmm", region)
    launch = event("Command Buffer Full", addmm, [("nvjet_sm90_tst", 200.0)])
    fused = event("triton_poi_fused_add_convolution_3", region, [("triton_poi_fused", 50.0)])
    decode = event("lipsync.vae_decode")
    norm = event("triton_red_fused_native_group_norm_0", decode, [("triton_red", 150.0)])
    device_kernel = SimpleNamespace(  # the kernel's own row: never counted a second time
        name="sm90_xmma_fprop", device_type=DeviceType.CUDA, is_async=False, kernels=[]
    )
    events = [step, region, conv, addmm, launch, fused, decode, norm, device_kernel]
    by_category = time_by_category(events, device=True)
    assert {c: row["ms"] for c, row in by_category.items()} == {
        "convolution": 0.3, "matmul": 0.2, "normalisation": 0.15, "fused (inductor)": 0.05,
    }  # fmt: skip
    assert by_category["matmul"]["top"] == [("aten::addmm", 0.2)]
    stages = time_by_stage(events, device=True)
    assert stages["lipsync.unet_step_guided"]["ms"] == 0.55
    assert stages["lipsync.vae_decode"]["ms"] == 0.15
    assert set(stages["lipsync.vae_decode"]["by_category"]) == {"normalisation"}


def test_time_by_category_counts_every_operator_once():
    from torch.profiler import ProfilerActivity, profile

    from lipsync.tools.profile import time_by_category

    x = torch.randn(8, 64, 32, 32)
    conv = torch.nn.Conv2d(64, 64, 3, padding=1)
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        y = conv(x)
        y = torch.nn.functional.group_norm(y, 8)
        z = y.flatten(2).transpose(1, 2) @ torch.randn(64, 256)
        (z * 2).contiguous()
    events = prof.events()
    by_category = time_by_category(events, device=False)
    assert {"convolution", "matmul", "normalisation"} <= set(by_category)
    total_ms = sum(row["ms"] for row in by_category.values())
    self_cpu_ms = sum(e.self_cpu_time_total for e in events) / 1000
    assert total_ms == pytest.approx(self_cpu_ms, rel=1e-3)
    conv_ops = dict(by_category["convolution"]["top"])
    assert max(conv_ops, key=conv_ops.get) in ("aten::mkldnn_convolution", "aten::_convolution")


def test_cli_usage_errors_are_one_message_not_a_traceback():
    proc = run_cli("run", "--bogus")
    assert proc.returncode == 2 and "No such option: --bogus" in proc.stderr
    assert "Traceback" not in proc.stderr
