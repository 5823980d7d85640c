"""A few-step student: the teacher's 20 guided DDIM steps distilled into 4 unguided ones.

Choice: **progressive-distillation-style trajectory matching** (Salimans & Ho 2022, with
classifier-free guidance folded into the student as in Meng et al. 2023), in one round of
20 → 4 instead of repeated halvings, rather than consistency distillation. Reasons:

* The target is exact and needs no bootstrapping: the teacher's own deterministic DDIM
  trajectory from the same noise and conditioning. Consistency distillation regresses on an EMA
  copy of the student and needs many more updates to settle; the GPU budget here is minutes.
* The student keeps the U-Net's ε-prediction and the reference DDIM sampler, at the scheduler's
  own 4-step timesteps (751, 501, 251, 1: each is also a timestep of the teacher's 20-step
  schedule, so every student step ends on a state of the teacher's trajectory). Inference needs
  no new code: ``steps=4, guidance=1`` (:func:`lipsync.own_checkpoints.bundle_denoise_defaults`
  reads them from a student bundle's manifest).
* Guidance folded in: one U-Net call per step instead of two; 4 calls instead of the teacher's
  40 (20 steps × 2 with CFG).

Per training window (inference conditioning: the masked frames, the frames themselves as the
reference, each frame's audio window; half of the windows get another window's audio, as in
dubbing): the teacher runs its 20 guided DDIM steps from the shared initial noise
(:func:`teacher_trajectory`). Student step k starts from the teacher's state at the student's
timestep s_k (step 0: the initial noise, which the sampler labels 751) and must land, in one
DDIM step, on the teacher's state at s_{k+1} (the last step: on the teacher's output). With
deterministic DDIM that fixes the clean estimate the student must predict:

    x̂₀* = (x_next − r·x_in) / (√ᾱ_next − r·√ᾱ_s),   r = √(1−ᾱ_next) / √(1−ᾱ_s)

and the loss is the MSE between the student's x̂₀ (from its ε̂) and x̂₀*, averaged over the 4
steps (``weighting="x0"``; ``"snr"``: each step weighted by max(SNR_s, 1), Salimans & Ho's
truncated-SNR weighting, which favours the last steps). The student starts as a copy of the
teacher. One teacher trajectory (20 guided calls without gradients) trains all 4 student steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lipsync.models.scheduler import make_scheduler
from lipsync.train.loop import sample_generators
from lipsync.train.pack_data import PackData
from lipsync.train.unet import sample_latents

StudentWeighting = Literal["x0", "snr"]
STUDENT_FORMAT = "lipsync.student/1"


@dataclass(frozen=True)
class DistillPlan:
    """Which teacher states each student step starts and ends on (module docstring)."""

    teacher_steps: int = 20
    student_steps: int = 4
    guidance: float = 1.5  # the teacher's; the student runs unguided (guidance 1)

    def schedule(self) -> dict[str, Any]:
        """Timesteps and the teacher-state indices: ``teacher`` (teacher_steps,), ``student``
        (student_steps,), ``start``/``end`` (student_steps,) indices into the teacher's states
        (state i = the input of teacher step i; state teacher_steps = its output), ``alpha_in``
        and ``alpha_next`` (student_steps,) ᾱ at each student step and the next."""
        sched = make_scheduler("ddim")
        sched.set_timesteps(self.teacher_steps)
        teacher = [int(t) for t in sched.timesteps]
        sched.set_timesteps(self.student_steps)
        student = [int(t) for t in sched.timesteps]
        missing = [t for t in student[1:] if t not in teacher]
        if missing or self.teacher_steps % self.student_steps:
            raise ValueError(
                f"{self.student_steps} student steps do not end on states of the teacher's "
                f"{self.teacher_steps}-step schedule (timesteps {missing})"
            )
        start = [0] + [teacher.index(t) for t in student[1:]]
        end = start[1:] + [self.teacher_steps]
        acp = sched.alphas_cumprod
        final = float(sched.final_alpha_cumprod)
        alpha_in = [float(acp[t]) for t in student]
        alpha_next = alpha_in[1:] + [final]
        return {
            "teacher": teacher,
            "student": student,
            "start": start,
            "end": end,
            "alpha_in": alpha_in,
            "alpha_next": alpha_next,
        }


@torch.no_grad()
def teacher_trajectory(
    teacher: nn.Module,
    cond: torch.Tensor,
    audio: torch.Tensor,
    noise: torch.Tensor,
    plan: DistillPlan,
    keep: list[int],
) -> dict[int, torch.Tensor]:
    """The teacher's guided DDIM run: cond (b, 9, f, h, w) [mask, masked, reference latents],
    audio (b·f, 50, 384), noise (b, 4, f, h, w) -> {i: state i} for i in ``keep`` (float32)."""
    sched = make_scheduler("ddim")
    sched.set_timesteps(plan.teacher_steps, device="cpu")
    b = noise.shape[0]
    x = noise.float()
    states = {0: x} if 0 in keep else {}
    cfg = plan.guidance > 1.0
    cond2 = torch.cat([cond, cond]) if cfg else cond
    for i, t in enumerate(sched.timesteps):
        model_in = torch.cat([x, x]) if cfg else x
        pred = teacher(
            torch.cat([model_in, cond2], dim=1), t.to(x.device), audio, b if cfg else 0
        ).float()
        if cfg:
            uncond, cond_pred = pred.chunk(2)
            pred = uncond + plan.guidance * (cond_pred - uncond)
        x = sched.step(pred, t, x).prev_sample.float()
        if i + 1 in keep:
            states[i + 1] = x
    return states


def x0_targets(
    x_in: torch.Tensor, x_next: torch.Tensor, alpha_in: torch.Tensor, alpha_next: torch.Tensor
) -> torch.Tensor:
    """The clean estimate that takes one deterministic DDIM step from x_in (at ᾱ_in) to x_next
    (at ᾱ_next): tensors (n, c, f, h, w), alphas (n,) -> (n, c, f, h, w)."""
    shape = (-1, 1, 1, 1, 1)
    ai, an = alpha_in.view(shape), alpha_next.view(shape)
    r = (1 - an).sqrt() / (1 - ai).sqrt()
    return (x_next - r * x_in) / (an.sqrt() - r * ai.sqrt())


def x0_from_eps(x: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    a = alpha.view(-1, 1, 1, 1, 1)
    return (x - (1 - a).sqrt() * eps) / a.sqrt()


@dataclass
class DistillObjective:
    """loss(batch, step, positions) for :class:`lipsync.train.loop.TrainLoop`: a teacher
    trajectory per window, then the student on all its steps at once. ``batch``: the
    :meth:`PackData.unet_batch` keys (``moments``, ``mask``, ``audio_windows``)."""

    student: nn.Module
    teacher: nn.Module
    plan: DistillPlan
    scaling_factor: float
    seed: int
    weighting: StudentWeighting = "x0"
    dub_share: float = 0.5  # share of windows given another window's audio

    def __post_init__(self):
        self.sched = self.plan.schedule()

    def conditioning(self, batch: dict[str, Any], gens) -> tuple[torch.Tensor, torch.Tensor]:
        """(cond (b, 9, f, h, w), audio (b·f, 50, 384)): inference-style conditioning."""
        m = batch["moments"]
        f = batch["audio_windows"].shape[1]
        masked = sample_latents(m["masked"], None, f, self.scaling_factor)
        ref = sample_latents(m["gt"], None, f, self.scaling_factor)  # the frames themselves
        b, _, _, h, w = masked.shape
        mask = F.interpolate(batch["mask"].float(), size=(h, w), mode="nearest")
        mask = mask[:, :, None].expand(b, 1, f, h, w)
        audio = batch["audio_windows"]
        dub = torch.tensor(
            [float(torch.rand((), generator=g, device=g.device)) < self.dub_share for g in gens]
        )
        if b > 1 and dub.any():
            rolled = torch.roll(audio, 1, dims=0)
            audio = torch.where(dub.to(audio.device)[:, None, None, None], rolled, audio)
        return torch.cat([mask, masked, ref], dim=1), audio.reshape(b * f, *audio.shape[2:])

    def __call__(self, batch: dict[str, Any], step: int, positions: torch.Tensor):
        device = batch["audio_windows"].device
        gens = sample_generators(self.seed, step, positions, device)
        cond, audio = self.conditioning(batch, gens)
        b, _, f, h, w = cond.shape
        noise = torch.cat(
            [torch.randn((1, 4, 1, h, w), generator=g, device=device) for g in gens]
        ).expand(b, 4, f, h, w)
        s = self.sched
        keep = sorted(set(s["start"]) | set(s["end"]))
        states = teacher_trajectory(self.teacher, cond, audio, noise, self.plan, keep)
        k = len(s["student"])
        x_in = torch.cat([states[i] for i in s["start"]])  # (k·b, 4, f, h, w)
        x_next = torch.cat([states[i] for i in s["end"]])
        rep = lambda v: torch.tensor(v, device=device).repeat_interleave(b)  # noqa: E731
        t_in = rep(s["student"])
        a_in, a_next = rep(s["alpha_in"]).float(), rep(s["alpha_next"]).float()
        eps = self.student(
            torch.cat([x_in, cond.repeat(k, 1, 1, 1, 1)], dim=1), t_in, audio.repeat(k, 1, 1)
        ).float()
        pred = x0_from_eps(x_in, eps, a_in)
        target = x0_targets(x_in, x_next, a_in, a_next)
        per = (pred - target).pow(2).mean(dim=(1, 2, 3, 4))  # (k·b,)
        if self.weighting == "snr":
            per = per * (a_in / (1 - a_in)).clamp(min=1.0)
        parts = {f"x0_mse_step{j}": per[j * b : (j + 1) * b].mean().detach() for j in range(k)}
        return per.mean(), parts


@torch.no_grad()
def trajectory_gap(
    student: nn.Module,
    teacher: nn.Module,
    data: PackData,
    plan: DistillPlan,
    scaling_factor: float,
    windows: int = 8,
    seed: int = 0,
) -> dict[str, float]:
    """How far the student's 4-step sampling ends from the teacher's 20-step output, in latent
    RMS, on ``windows`` fixed windows of ``data`` (own audio), next to the distance between the
    teacher's output and the ground-truth latents (the scale of what matters)."""
    pick = data.fixed_windows(windows, seed)
    batch = data.unet_batch(pick)
    obj = DistillObjective(student, teacher, plan, scaling_factor, seed, dub_share=0.0)
    gens = sample_generators(seed, 0, torch.arange(windows), data.device)
    cond, audio = obj.conditioning(batch, gens)
    b, _, f, h, w = cond.shape
    noise = torch.cat(
        [torch.randn((1, 4, 1, h, w), generator=g, device=data.device) for g in gens]
    ).expand(b, 4, f, h, w)
    teacher_out = teacher_trajectory(teacher, cond, audio, noise, plan, [plan.teacher_steps])
    student_plan = DistillPlan(plan.student_steps, plan.student_steps, 1.0)
    student_out = teacher_trajectory(
        student, cond, audio, noise, student_plan, [plan.student_steps]
    )
    gt = sample_latents(batch["moments"]["gt"], None, f, scaling_factor)
    t_out, s_out = teacher_out[plan.teacher_steps], student_out[plan.student_steps]
    rms = lambda a, c: math.sqrt(float((a - c).pow(2).mean()))  # noqa: E731
    return {
        "student_vs_teacher_rms": rms(s_out, t_out),
        "teacher_vs_truth_rms": rms(t_out, gt),
        "student_vs_truth_rms": rms(s_out, gt),
    }
