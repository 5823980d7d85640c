"""torch.compile of the model blocks (lipsync.accel.compile) on the CPU, tiny preset: the
compiled U-Net computes what the eager one does, and unknown modes are refused. (Cold, the
inductor's C++ builds take about 1.5 min on the 2-core CI machine; warm, seconds.)"""

from __future__ import annotations

import copy

import pytest
import torch

from lipsync import LipSync
from lipsync.accel.compile import MODES, REGIONS, compile_unet, compile_vae
from lipsync.errors import ConfigError


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return LipSync.from_pretrained("tiny", device="cpu").pipeline.models


def test_regional_compile_matches_eager(tiny):
    """Every repeated block is compiled (not the whole net) and the outputs agree."""
    eager = tiny.unet
    compiled = compile_unet(copy.deepcopy(eager), "regional")
    blocks = [m for m in compiled.modules() if isinstance(m, REGIONS)]
    assert blocks and all(getattr(m, "_compiled_call_impl", None) for m in blocks)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 13, 4, 32, 32, generator=g)
    audio = torch.randn(2 * 4, 50, 384, generator=g)
    t = torch.tensor(500)
    with torch.no_grad():  # the unconditional clip's audio skipped, as the sampler calls it
        want = eager(x, t, audio[4:], null_audio_clips=1)
        got = compiled(x, t, audio[4:], null_audio_clips=1)
    assert want.abs().max() > 0.1  # a real output, not zeros
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_unknown_compile_modes_are_refused(tiny):
    assert MODES == ("none", "regional", "full", "full-cudagraphs")
    with pytest.raises(ConfigError, match="regional"):
        compile_unet(tiny.unet, "max")
    with pytest.raises(ConfigError):
        compile_vae(tiny.vae, "full")
