"""The 3D U-Net: exact key/shape compatibility with every official config, numerical parity."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lipsync.checkpoints import load_unet
from lipsync.errors import ConfigError
from lipsync.models.unet import UNet3D, UNetConfig
from tests.support.shared import REFERENCE

TINY = REFERENCE / "unet_tiny"
STAGES = ["stage1", "stage2", "stage2_512", "stage2_efficient"]


def read_tsv(path):
    rows = path.read_text().splitlines()[1:]
    return {k: json.loads(s) for k, s in (row.split("\t") for row in rows)}


def rel_err(ours, ref):
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("stage", STAGES)
def test_full_size_configs_have_exactly_the_official_keys_and_shapes(stage):
    cfg = json.loads((REFERENCE / f"unet_{stage}_config.json").read_text())
    with torch.device("meta"):
        model = UNet3D.from_config(cfg)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    ref = read_tsv(REFERENCE / f"unet_{stage}_state_dict.tsv")
    assert sorted(set(ref) - set(ours)) == []
    assert sorted(set(ours) - set(ref)) == []
    assert {k: ours[k] for k in ref} == ref


def test_stage_variants_differ_where_the_reference_does():
    def motion_prefixes(stage):
        keys = read_tsv(REFERENCE / f"unet_{stage}_state_dict.tsv")
        return {k.split(".motion_modules")[0] for k in keys if ".motion_modules." in k}

    assert motion_prefixes("stage1") == set()
    assert motion_prefixes("stage2_efficient") == {f"up_blocks.{i}" for i in range(4)}
    assert len(motion_prefixes("stage2")) == 8


@pytest.fixture(scope="module")
def tiny_model():
    cfg = json.loads((TINY / "config.json").read_text())
    return load_unet(TINY / "weights.safetensors", cfg)


@pytest.fixture(scope="module")
def tiny_inputs():
    return load_file(str(TINY / "inputs.safetensors"))


def test_parity_with_reference_tiny_unet(tiny_model, tiny_inputs):
    expected = load_file(str(TINY / "expected.safetensors"))["sample"]
    with torch.inference_mode():
        out = tiny_model(
            tiny_inputs["sample"], tiny_inputs["timestep"], tiny_inputs["encoder_hidden_states"]
        )
    assert out.shape == (2, 4, 8, 16, 16)
    err = rel_err(out, expected)
    print(f"unet_tiny expected.safetensors: max abs err / max |ref| = {err:.3e}")
    assert err <= 1e-4


def test_parity_with_reference_timestep1_null_audio(tiny_model, tiny_inputs):
    expected = load_file(str(TINY / "expected_t1_null_audio.safetensors"))["sample"]
    with torch.inference_mode():
        out = tiny_model(
            tiny_inputs["sample"], 1, torch.zeros_like(tiny_inputs["encoder_hidden_states"])
        )
    err = rel_err(out, expected)
    print(f"unet_tiny expected_t1_null_audio.safetensors: rel err = {err:.3e}")
    assert err <= 1e-4


def test_audio_conditioning_and_timestep_change_the_output(tiny_model, tiny_inputs):
    s, t, a = (tiny_inputs[k] for k in ("sample", "timestep", "encoder_hidden_states"))
    with torch.inference_mode():
        base = tiny_model(s, t, a)
        other_audio = tiny_model(s, t, a.flip(0))
        other_t = tiny_model(s, 900, a)
        batched_t = tiny_model(s, torch.tensor([int(t), int(t)]), a)
        four_d = tiny_model(s, t, a.reshape(2, 8, 50, 384))
    assert (base - other_audio).abs().max() > 1e-3
    assert (base - other_t).abs().max() > 1e-3
    torch.testing.assert_close(batched_t, base)
    torch.testing.assert_close(four_d, base)


def test_frames_are_coupled_only_through_motion_modules_and_norms(tiny_model, tiny_inputs):
    # Changing frame 0's input must change other frames' outputs (temporal attention + group norm
    # over frames), and changing clip 0 must leave clip 1 untouched (clips are independent).
    s, t, a = (tiny_inputs[k] for k in ("sample", "timestep", "encoder_hidden_states"))
    s2 = s.clone()
    s2[0, :, 0] += 1.0
    with torch.inference_mode():
        base = tiny_model(s, t, a)
        out = tiny_model(s2, t, a)
    assert (out[0, :, 5] - base[0, :, 5]).abs().max() > 1e-4
    torch.testing.assert_close(out[1], base[1])


def test_wrong_audio_rows_is_a_clear_error(tiny_model, tiny_inputs):
    with pytest.raises(ValueError, match="expected \\(b - null_audio_clips\\)\\*f = 16"):
        tiny_model(tiny_inputs["sample"], 1, tiny_inputs["encoder_hidden_states"][:5])


def test_bad_configs_are_config_errors():
    cfg = json.loads((TINY / "config.json").read_text())
    with pytest.raises(ConfigError, match="unknown U-Net config keys: bogus"):
        UNetConfig.from_dict({**cfg, "bogus": 1})
    with pytest.raises(ConfigError, match="resnet_time_scale_shift"):
        UNetConfig.from_dict({**cfg, "resnet_time_scale_shift": "scale_shift"})
    with pytest.raises(ConfigError, match="down block type"):
        UNetConfig.from_dict({**cfg, "down_block_types": ["Nope"] * 4})
    with pytest.raises(ConfigError, match="motion_module_kwargs"):
        UNetConfig.from_dict({**cfg, "motion_module_kwargs": {"wat": 1}})


def test_config_round_trips(tiny_model):
    again = UNetConfig.from_dict(
        {
            k: (list(v) if isinstance(v, tuple) else v)
            for k, v in tiny_model.config.to_dict().items()
        }
    )
    assert again == tiny_model.config


def test_null_audio_shortcut_equals_computing_zero_audio(tiny_model, tiny_inputs):
    # The unconditional CFG half: zero audio gives cross-attention output == its bias.
    s, t, a = (tiny_inputs[k] for k in ("sample", "timestep", "encoder_hidden_states"))
    full = torch.cat([torch.zeros_like(a[:8]), a[8:]])
    with torch.inference_mode():
        reference = tiny_model(s, t, full)
        shortcut = tiny_model(s, t, a[8:], null_audio_clips=1)
        all_null = tiny_model(s, t, None, null_audio_clips=2)
        zeros = tiny_model(s, t, torch.zeros_like(a))
    torch.testing.assert_close(shortcut, reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(all_null, zeros, rtol=0, atol=1e-5)


def test_temporal_attention_math_path_equals_sdpa(tiny_model, tiny_inputs):
    from lipsync.models.transformer import set_temporal_attention

    s, t, a = (tiny_inputs[k] for k in ("sample", "timestep", "encoder_hidden_states"))
    with torch.inference_mode():
        math_path = tiny_model(s, t, a)
        set_temporal_attention(tiny_model, "sdpa")
        try:
            sdpa = tiny_model(s, t, a)
        finally:
            set_temporal_attention(tiny_model, "matmul")
    torch.testing.assert_close(math_path, sdpa, rtol=1e-5, atol=1e-5)
