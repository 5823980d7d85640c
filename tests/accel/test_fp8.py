"""FP8 linear layers: the quantisation math (checked on the CPU through the emulation), the
`torch._scaled_mm` calling convention, the U-Net conversion, and the CUDA-only guard."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lipsync.accel.fp8 import (
    FP8,
    FP8_MAX,
    FP8Linear,
    convert_unet_to_fp8,
    dequantize,
    fp8_candidates,
    has_fp8,
    quantize,
    require_fp8_device,
    scaled_mm_reference,
)
from lipsync.errors import ConfigError

E4M3_REL = 2.0**-4  # round to nearest with 3 mantissa bits: half an ulp of the value's binade
E4M3_SUBNORMAL_HALF_STEP = 2.0**-10  # smallest subnormal 2^-9, in units of the scale


@pytest.mark.parametrize("per_row", [True, False])
def test_quantize_scales_and_per_element_error(per_row):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=g) * torch.logspace(-2, 2, 64)[:, None]  # rows of all sizes
    x8, scale = quantize(x, per_row)
    assert x8.dtype == FP8 and scale.dtype == torch.float32
    amax = x.abs().amax(dim=-1, keepdim=True) if per_row else x.abs().amax()
    assert scale.shape == ((64, 1) if per_row else ())
    torch.testing.assert_close(scale, amax / FP8_MAX)  # the largest magnitude maps to 448
    assert x8.float().abs().max() == FP8_MAX
    back = dequantize(x8, scale)
    err = (back - x).abs()
    bound = x.abs() * E4M3_REL + scale * E4M3_SUBNORMAL_HALF_STEP
    assert (err <= bound * (1 + 1e-6)).all()
    normal = x.abs() >= scale * 2.0**-6  # e4m3's smallest normal, in scaled units
    rel = (err / x.abs())[normal]
    print(f"per_row={per_row}: max relative error {rel.max():.4f}, mean {rel.mean():.4f}")
    assert rel.max() <= E4M3_REL * (1 + 1e-6)
    assert rel.mean() < 0.03


def test_quantize_all_zero_input_is_finite():
    x8, scale = quantize(torch.zeros(4, 32), per_row=True)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert dequantize(x8, scale).abs().max() == 0


@pytest.mark.parametrize("granularity", ["row", "tensor"])
def test_fp8_linear_matches_the_float_linear(granularity):
    torch.manual_seed(0)
    linear = nn.Linear(256, 320).to(torch.bfloat16)
    x = torch.randn(2, 50, 256, dtype=torch.bfloat16)
    fp8 = FP8Linear.from_linear(linear, granularity, emulate=True)
    assert fp8.weight.dtype == FP8 and fp8.bias.dtype == torch.bfloat16
    assert fp8.weight_scale.shape == ((1, 320) if granularity == "row" else ())
    y, ref = fp8(x).float(), linear(x).float()
    assert y.shape == ref.shape == (2, 50, 320)
    rel = ((y - ref).norm() / ref.norm()).item()
    print(f"{granularity}: relative error of the layer output {rel:.4f}")
    assert rel < 0.05  # tighter than the per-element 6.25%: independent errors average out
    # the module's math is exactly: dequantised weight x dequantised activation, plus bias
    x8, xs = quantize(x.reshape(-1, 256), per_row=granularity == "row")
    w = dequantize(fp8.weight, fp8.weight_scale.reshape(-1, 1) if granularity == "row"
                   else fp8.weight_scale)  # fmt: skip
    expected = (dequantize(x8, xs) @ w.t()).to(torch.bfloat16) + linear.bias
    torch.testing.assert_close(y.reshape(-1, 320), expected.float(), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("per_row", [True, False])
def test_reference_matches_torch_scaled_mm_convention(per_row):
    # The GPU path is one torch._scaled_mm call. Where this CPU build has the op, check that
    # the reference computes what the kernel computes from the same operands (scales multiply,
    # weight passed transposed).
    torch.manual_seed(1)
    x8, xs = quantize(torch.randn(48, 128), per_row)
    w8, ws = quantize(torch.randn(64, 128), per_row)
    ws = ws.reshape(1, -1) if per_row else ws
    ref = scaled_mm_reference(x8, xs, w8, ws, torch.float32)
    try:
        kernel = torch._scaled_mm(x8, w8.t(), scale_a=xs, scale_b=ws, out_dtype=torch.float32)
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"no CPU _scaled_mm here: {e}")
    torch.testing.assert_close(kernel, ref, atol=1e-4, rtol=1e-4)


def test_the_guard_refuses_cpu_and_old_gpus(monkeypatch):
    with pytest.raises(ConfigError, match="compute capability 8.9"):
        require_fp8_device("cpu")
    unet = nn.Sequential(nn.Linear(128, 128)).to(torch.bfloat16)
    with pytest.raises(ConfigError, match="FP8"):
        convert_unet_to_fp8(unet)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(ConfigError, match="A100 has 8.0"):
        require_fp8_device("cuda")


def test_unet_conversion_picks_the_big_transformer_linears():
    from lipsync.loading import load_models

    unet = load_models("tiny", dtype="bf16").unet
    x = torch.randn(
        2, 13, 4, 16, 16, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0)
    )
    audio = torch.randn(4, 50, 384, dtype=torch.bfloat16)
    with torch.inference_mode():
        ref = unet(x, 501, audio, null_audio_clips=1).float()
    names = fp8_candidates(unet, min_features=32)
    assert names and all(".attentions." in n or ".motion_modules." in n for n in names)
    assert not any(n.endswith(("attn2.to_k", "attn2.to_v", "time_emb_proj")) for n in names)
    assert any(n.endswith("ff.net.0.proj") for n in names)
    assert any(n.endswith("attn1.to_q") for n in names)
    with pytest.raises(ConfigError, match="bf16 or fp16"):
        convert_unet_to_fp8(load_models("tiny").unet, emulate=True)  # fp32
    converted = convert_unet_to_fp8(unet, min_features=32, emulate=True)
    assert converted == names and has_fp8(unet)
    with torch.inference_mode():
        out = unet(x, 501, audio, null_audio_clips=1).float()
    rel = ((out - ref).norm() / ref.norm()).item()
    print(f"tiny U-Net, {len(names)} FP8 layers: relative output error {rel:.4f}")
    assert 0 < rel < 0.15  # ~6.5%: e4m3 rounding compounded through 60 random-weight layers
