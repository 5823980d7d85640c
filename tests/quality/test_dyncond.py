"""Dynamic conditioning weighting (issue 16): off is today's U-Net bit for bit; a new gate starts
as the identity; it loads a gate-less checkpoint with only its own keys missing; it learns."""

from __future__ import annotations

import pytest
import torch

from lipsync.errors import ConfigError
from lipsync.models.dyncond import ConditioningGate, DynamicConditioningConfig
from lipsync.models.unet import UNet3D, UNetConfig
from lipsync.train.config import QualitySection
from lipsync.train.quality import GATE_KEYS, with_dynamic_conditioning
from tests.support.train_fixtures import TINY_UNET

ON = {"enabled": True, "per_region": True, "hidden": 16}


def _inputs(null_clips: int):
    g = torch.Generator().manual_seed(3)
    sample = torch.randn(2, 13, 4, 8, 8, generator=g)
    audio = torch.randn((2 - null_clips) * 4, 50, 384, generator=g)
    return sample, audio


def test_off_builds_the_same_modules_weights_and_config():
    torch.manual_seed(0)
    today = UNet3D.from_config(TINY_UNET)
    torch.manual_seed(0)
    off = UNet3D.from_config({**TINY_UNET, "dynamic_conditioning": {"enabled": False}})
    a, b = today.state_dict(), off.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not any("cond_gate" in name for name, _ in off.named_modules())
    # a disabled option leaves the config dict exactly the reference's
    assert "dynamic_conditioning" not in off.config.to_dict()
    assert UNetConfig.from_dict(off.config.to_dict()) == off.config
    sample, audio = _inputs(0)
    assert torch.equal(today(sample, 500, audio), off(sample, 500, audio))


@pytest.mark.parametrize("null_clips", [0, 1])
def test_a_new_gate_is_the_identity_bit_for_bit(null_clips):
    """Loaded with a gate-less U-Net's weights, the gated U-Net computes exactly the same, with
    and without the unconditional (CFG) rows."""
    torch.manual_seed(0)
    teacher = UNet3D.from_config(TINY_UNET).eval()
    gated = UNet3D.from_config({**TINY_UNET, "dynamic_conditioning": ON}).eval()
    own = gated.state_dict()
    missing = [k for k in own if k not in teacher.state_dict()]
    assert missing and all(GATE_KEYS in k for k in missing)
    assert not [k for k in teacher.state_dict() if k not in own]
    own.update(teacher.state_dict())
    gated.load_state_dict(own, strict=True)
    sample, audio = _inputs(null_clips)
    with torch.no_grad():
        expected = teacher(sample, 500, audio, null_audio_clips=null_clips)
        got = gated(sample, 500, audio, null_audio_clips=null_clips)
    assert torch.equal(expected, got)
    assert "dynamic_conditioning" in gated.config.to_dict()


def test_gate_weights_follow_the_audio_and_the_position():
    gate = ConditioningGate(32, 384, DynamicConditioningConfig(True, per_region=True, hidden=8))
    x, tokens = torch.randn(3, 16, 32), torch.randn(2, 50, 384)
    w_audio, w_id = gate(x, tokens, null_rows=1)
    assert w_audio.shape == w_id.shape == (3, 16, 1)
    assert torch.equal(w_audio, torch.ones_like(w_audio))  # identity at the start
    torch.nn.init.normal_(gate.frame[2].weight, std=0.05)
    torch.nn.init.normal_(gate.region.weight, std=0.05)
    w_audio, w_id = gate(x, tokens, null_rows=1)
    assert ((w_audio >= 0) & (w_audio <= 2)).all() and not torch.allclose(w_audio, w_id)
    assert w_audio[1].std() > 0  # per position
    louder, _ = gate(x, tokens * 3, null_rows=1)
    assert not torch.allclose(louder[1:], w_audio[1:])  # the audio rows react to the audio
    assert torch.equal(louder[:1], w_audio[:1])  # the null row has no audio to react to


def test_the_gate_trains_and_changes_the_output():
    torch.manual_seed(0)
    model = UNet3D.from_config({**TINY_UNET, "dynamic_conditioning": ON})
    gates = [p for n, p in model.named_parameters() if GATE_KEYS in f".{n}"]
    opt = torch.optim.SGD(gates, lr=0.5)
    sample, audio = _inputs(0)
    before = model(sample, 500, audio).detach()
    loss = model(sample, 500, audio).pow(2).mean()
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in gates)
    opt.step()
    assert not torch.equal(model(sample, 500, audio).detach(), before)


def test_config_errors_and_training_section():
    with pytest.raises(ConfigError, match="unknown dynamic_conditioning keys: hiden"):
        UNetConfig.from_dict({**TINY_UNET, "dynamic_conditioning": {"hiden": 3}})
    with pytest.raises(ConfigError, match="max_delta"):
        UNetConfig.from_dict({**TINY_UNET, "dynamic_conditioning": {"max_delta": 2.0}})
    with pytest.raises(ConfigError, match="add_audio_layer"):
        UNetConfig.from_dict({**TINY_UNET, "add_audio_layer": False, "dynamic_conditioning": ON})
    section = QualitySection()
    assert with_dynamic_conditioning(TINY_UNET, section) == TINY_UNET
    section.dynamic_conditioning.enabled = True
    merged = with_dynamic_conditioning(TINY_UNET, section)
    assert UNetConfig.from_dict(merged).dynamic_conditioning.enabled
