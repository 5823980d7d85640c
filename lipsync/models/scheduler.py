"""Diffusion schedulers (diffusers), configured like the reference.

``make_scheduler("ddim")`` is the reference sampler (``shared/reference/scheduler_config.json``:
scaled-linear betas 0.00085 → 0.012, 1000 training steps, steps_offset 1, epsilon prediction).
"""

from __future__ import annotations

from lipsync.config import load_packaged_config
from lipsync.constants import SCHEDULERS, SchedulerName
from lipsync.errors import check_choice

__all__ = ["SCHEDULERS", "make_scheduler"]


def make_scheduler(name: SchedulerName = "ddim"):
    """A fresh scheduler instance (schedulers are stateful: one per concurrent run)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    check_choice("scheduler", name, SCHEDULERS)
    config = load_packaged_config("scheduler_config.json")
    if name == "ddim":
        return DDIMScheduler.from_config(config)
    return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")
