"""``lipsync profile`` (lipsync.tools.profile): the Chrome trace and summary, and how operator and
kernel time is sorted into classes and stages."""

from __future__ import annotations

import json

import pytest
import torch

from tests.support.cli import lipsync_cli


def test_cli_profile_writes_a_chrome_trace_and_a_summary(tmp_path):
    proc = lipsync_cli(
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
