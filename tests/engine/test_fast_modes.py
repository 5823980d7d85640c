"""Fast modes (issue #5): DeepCache step caching, guidance on early steps only, DPM-Solver++,
the mode presets and options (through `lipsync bench` / `lipsync run`: tests/tools/test_bench.py,
tests/pipeline/test_modes.py)."""

from __future__ import annotations

import pytest
import torch

from lipsync.diffusion import MODES, ChunkDenoiser, DenoiseOptions, initial_noise
from lipsync.errors import ConfigError
from lipsync.models.unet import StepCache
from lipsync.tools.bench import count_flops, make_unet_inputs
from tests.support.denoise import denoise

FRAMES = 4  # frames of the ``inputs`` fixture (conftest.py)


class UNetSpy:
    """Records, per U-Net call, its batch size and whether the deep part (mid block) ran."""

    def __init__(self, unet):
        self.batches: list[int] = []
        self.full: list[bool] = []
        self._hooks = [
            unet.register_forward_pre_hook(self._call),
            unet.mid_block.register_forward_hook(self._mid),
        ]

    def _call(self, module, args):
        self.batches.append(args[0].shape[0])
        self.full.append(False)

    def _mid(self, module, args, output):
        self.full[-1] = True

    def close(self):
        for h in self._hooks:
            h.remove()


@pytest.fixture(scope="module")
def exact4(bundle, mask, inputs):
    """The exact 4-step result on ``inputs`` (seed 0), which several fast paths must reproduce."""
    return denoise(bundle, mask, *inputs, steps=4)


@pytest.fixture
def spy(bundle):
    s = UNetSpy(bundle.unet)
    yield s
    s.close()


# -- the U-Net's cache path -------------------------------------------------------------------


@pytest.mark.parametrize("null_clips", [0, 1])
def test_unet_cache_full_call_is_exact_and_cached_call_reproduces_it(bundle, null_clips):
    # A full call that stores the feature computes exactly what a plain call does; a cached call
    # on the same inputs must then reproduce it bit for bit, for every branch (the cut, the
    # partial down block and the resumed decoder consume the right skips).
    unet = bundle.unet
    inp = make_unet_inputs(2, FRAMES, 16, "cpu", torch.float32, null_clips=null_clips)
    args = (inp.sample, inp.timestep, inp.audio, inp.null_clips)
    n = len(unet.down_blocks) * len(unet.up_blocks[0].resnets)
    with torch.inference_mode():
        plain = unet(*args)
        for branch in range(n):
            cache = StepCache(branch)
            assert torch.equal(unet(*args, cache=cache), plain)
            cache.refresh = False
            assert torch.equal(unet(*args, cache=cache), plain), branch
            assert (cache.full_calls, cache.cached_calls) == (1, 1)
    with pytest.raises(ConfigError, match="cache branch"):
        unet.cache_point(n)


def test_cached_calls_are_much_cheaper(bundle):
    unet = bundle.unet
    inp = make_unet_inputs(2, FRAMES, 16, "cpu", torch.float32, null_clips=1)
    with torch.inference_mode():
        cache = StepCache(0)
        full = count_flops(lambda: unet(inp.sample, inp.timestep, inp.audio, 1, cache=cache))
        cache.refresh = False
        cached = count_flops(lambda: unet(inp.sample, inp.timestep, inp.audio, 1, cache=cache))
        cache1 = StepCache(1)
        unet(inp.sample, inp.timestep, inp.audio, 1, cache=cache1)
        cache1.refresh = False
        cached1 = count_flops(lambda: unet(inp.sample, inp.timestep, inp.audio, 1, cache=cache1))
    print(f"cached / full FLOPs: branch 0 {cached / full:.3f}, branch 1 {cached1 / full:.3f}")
    assert cached < 0.15 * full  # branch 0: conv_in, the last up layer, conv_out
    assert cached < cached1 < full


# -- DeepCache in the denoiser ----------------------------------------------------------------


def test_cache_interval_one_is_exact(bundle, mask, inputs, exact4):
    assert torch.equal(denoise(bundle, mask, *inputs, steps=4, cache_interval=1), exact4)


def test_cache_interval_three_runs_the_full_unet_on_every_third_step(bundle, mask, inputs, spy):
    steps = 7
    exact = denoise(bundle, mask, *inputs, steps=steps)
    other_seed = denoise(bundle, mask, *inputs, seed=1, steps=steps)
    spy.full.clear()
    spy.batches.clear()
    cached = denoise(bundle, mask, *inputs, steps=steps, cache_interval=3)
    assert [i for i, full in enumerate(spy.full) if full] == [0, 3, 6]
    assert len(spy.full) == steps and spy.batches == [2] * steps  # CFG batch throughout
    generated = ~mask.bool()
    err = (cached - exact)[:, :, generated].abs().mean()
    scale = (other_seed - exact)[:, :, generated].abs().mean()
    print(f"mean abs error of cache_interval=3: {err:.4f} (another seed: {scale:.4f})")
    assert 0 < err < 0.1 * scale


# -- guidance on early steps only -------------------------------------------------------------


def test_guidance_on_all_steps_is_exact(bundle, mask, inputs, exact4):
    assert torch.equal(denoise(bundle, mask, *inputs, steps=4, guidance_steps=1.0), exact4)


def test_guidance_on_half_the_steps_halves_the_late_batches(bundle, mask, inputs, exact4, spy):
    spy.batches.clear()
    early = denoise(bundle, mask, *inputs, steps=4, guidance_steps=0.5)
    assert spy.batches == [2, 2, 1, 1]
    assert (early - exact4).abs().max() > 0
    opts = DenoiseOptions(steps=5, guidance_steps=0.5)
    assert opts.guided_steps() == 3  # ceil: a positive share guides at least one step
    assert DenoiseOptions(steps=5, guidance=1.0).guided_steps() == 0
    assert DenoiseOptions(steps=5, guidance_steps=0.0).plan() == [(False, True)] * 5


def test_fast_mode_batches_of_chunks_equal_chunks_alone(bundle, mask, inputs, spy):
    # DeepCache + early guidance + a batch of 2 chunks: the cached feature of the guided steps
    # (4 clips) keeps the 2 conditional clips for the unguided steps; batching changes nothing.
    faces, audio = inputs
    opts = DenoiseOptions.for_mode("fast", steps=6)
    den = ChunkDenoiser(bundle.unet, bundle.vae, mask, opts)
    noise = initial_noise(FRAMES, 16, torch.Generator().manual_seed(5), torch.device("cpu"),
                          torch.float32)  # fmt: skip

    def gens():
        return [torch.Generator().manual_seed(11), torch.Generator().manual_seed(12)]

    other = faces.flip(0)
    spy.batches.clear()
    spy.full.clear()
    batched = den(torch.stack([faces, other]), torch.stack([audio, audio * 0.5]), noise, gens())
    assert spy.batches == [4, 4, 4, 2, 2, 2]
    assert spy.full == [True, False, False, True, False, False]
    g1, g2 = gens()
    alone = torch.stack([den(faces, audio, noise, g1), den(other, audio * 0.5, noise, g2)])
    torch.testing.assert_close(batched, alone, atol=2e-5, rtol=0)


def test_unguided_cached_step_uses_the_conditional_rows(bundle):
    # A guided full call caches [unconditional, conditional] rows; an unguided cached call on
    # the conditional rows alone equals the conditional half of a guided cached call.
    unet = bundle.unet
    inp = make_unet_inputs(2, FRAMES, 16, "cpu", torch.float32, null_clips=1)
    with torch.inference_mode():
        cache = StepCache(0)
        unet(inp.sample, inp.timestep, inp.audio, 1, cache=cache)
        cache.refresh = False
        guided = unet(inp.sample, inp.timestep, inp.audio, 1, cache=cache)
        cache.keep_rows(1, 2)
        cond = unet(inp.sample[1:], inp.timestep, inp.audio, 0, cache=cache)
        with pytest.raises(ValueError, match="does not fit"):
            unet(inp.sample, inp.timestep, inp.audio, 1, cache=cache)
    torch.testing.assert_close(cond, guided[1:], atol=1e-5, rtol=0)
    assert (cond - guided[:1]).abs().max() > 1e-3


def test_denoiser_keeps_the_conditional_rows_when_guidance_stops(bundle, mask, inputs, monkeypatch):
    calls = []
    original = StepCache.keep_rows

    def keep_rows(self, start, stop):
        calls.append((start, stop, self.feature.shape[0]))
        original(self, start, stop)

    monkeypatch.setattr(StepCache, "keep_rows", keep_rows)
    faces, audio = inputs
    den = ChunkDenoiser(bundle.unet, bundle.vae, mask, DenoiseOptions.for_mode("fast", steps=5))
    noise = initial_noise(FRAMES, 16, torch.Generator().manual_seed(5), torch.device("cpu"),
                          torch.float32)  # fmt: skip
    # 5 steps: guided 0-2, full at 0 and 3: step 3 (unguided) refreshes, nothing to keep
    den(torch.stack([faces, faces]), torch.stack([audio, audio]), noise)
    assert calls == []
    den.options = DenoiseOptions.for_mode("fast", steps=4)  # guided 0-1, full at 0 and 3
    den(torch.stack([faces, faces]), torch.stack([audio, audio]), noise)
    assert calls == [(2, 4, 4)]  # step 2: the conditional half of the 2 x 2 clips


# -- DPM-Solver++ -------------------------------------------------------------------------------


def test_dpm_solver_with_the_fast_paths(bundle, mask, inputs, spy):
    exact = denoise(bundle, mask, *inputs, steps=5, scheduler="dpm++")
    spy.batches.clear()
    fast = denoise(bundle, mask, *inputs, **{**MODES["fast"], "steps": 5, "scheduler": "dpm++"})
    assert spy.batches == [2, 2, 2, 1, 1]
    assert torch.isfinite(fast).all()
    err = (fast - exact).abs().mean()
    assert 0 < err < 0.05
    ddim = denoise(bundle, mask, *inputs, steps=5)
    assert (exact - ddim).abs().max() > 1e-3  # really another sampler


# -- options, presets, validation -----------------------------------------------------------


def test_mode_presets_and_overrides():
    assert DenoiseOptions.for_mode("exact") == DenoiseOptions()
    assert DenoiseOptions().exact and not DenoiseOptions.for_mode("fast").exact
    fast = DenoiseOptions.for_mode("fast", steps=10, cache_interval=None)
    assert (fast.cache_interval, fast.cache_branch, fast.guidance_steps) == (3, 0, 0.5)
    assert fast.steps == 10
    assert DenoiseOptions.for_mode("fast", cache_interval=2).cache_interval == 2
    plan = DenoiseOptions.for_mode("fast", steps=20).plan()
    assert [i for i, (_, full) in enumerate(plan) if full] == [0, 3, 6, 9, 12, 15, 18]
    assert sum(guided for guided, _ in plan) == 10
    for bad in (
        {"cache_interval": 0},
        {"cache_branch": -1},
        {"guidance_steps": 1.5},
        {"scheduler": "euler"},
    ):
        with pytest.raises(ConfigError):
            DenoiseOptions(**bad).validate()
    with pytest.raises(ConfigError, match="unknown mode"):
        DenoiseOptions.for_mode("turbo")


def test_denoiser_rejects_a_branch_the_unet_lacks(bundle, mask):
    with pytest.raises(ConfigError, match="cache branch"):
        ChunkDenoiser(bundle.unet, bundle.vae, mask, DenoiseOptions(cache_interval=2,
                                                                    cache_branch=99))  # fmt: skip


def test_run_options_resolve_the_mode():
    from lipsync.pipeline import RunOptions

    opts = RunOptions(mode="fast", steps=12, cache_interval=2).denoise_options()
    assert (opts.steps, opts.cache_interval, opts.guidance_steps) == (12, 2, 0.5)
    with pytest.raises(ConfigError):
        RunOptions(mode="nope").validate()


# -- CLI -----------------------------------------------------------------------------------------
