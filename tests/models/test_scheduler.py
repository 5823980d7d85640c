"""The noise schedulers: DDIM as the reference configures it, DPM-Solver++ for the fast modes."""

from __future__ import annotations

import json

import pytest

from lipsync.errors import ConfigError
from lipsync.models.scheduler import make_scheduler
from tests.support.shared import REFERENCE


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
