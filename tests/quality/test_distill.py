"""The few-step student (issue 16): the plan ends every student step on a teacher state, the
target makes one real DDIM step land on the teacher's next state, distillation lowers the loss,
and the demo recipe writes a student bundle that says how to run it."""

from __future__ import annotations

import json

import pytest
import torch

from lipsync.api import LipSync
from lipsync.diffusion import ChunkDenoiser, DenoiseOptions
from lipsync.face.mask import make_mask
from lipsync.models.scheduler import make_scheduler
from lipsync.models.unet import random_unet
from lipsync.own_checkpoints import bundle_denoise_defaults, load_bundle
from lipsync.train import demo_recipe
from lipsync.train.distill import DistillObjective, DistillPlan, x0_from_eps, x0_targets
from tests.support.quality_fixtures import make_pack, make_teacher_bundle
from tests.support.train_fixtures import TINY_UNET, write_tiny_syncnet_16

TINY = [
    "unet2.batch=1",
    "unet2.eval_windows=2",
    "unet2.sample_windows=2",
    "unet2.sample_steps=2",
    "unet2.eval_reserve_s=1",
    "unet2.warmup=1",
    "student.batch=1",
    "student.eval_windows=2",
    "student.sample_windows=2",
    "student.eval_reserve_s=1",
    "student.warmup=1",
    "student.teacher_steps=4",
    "student.student_steps=2",
]


def test_the_plan_ends_each_student_step_on_a_teacher_state():
    s = DistillPlan(20, 4).schedule()
    assert s["student"] == [751, 501, 251, 1]
    assert [s["teacher"][i] for i in s["start"][1:]] == [501, 251, 1]
    assert s["start"] == [0, 9, 14, 19] and s["end"] == [9, 14, 19, 20]
    with pytest.raises(ValueError, match="do not end on states"):
        DistillPlan(20, 3).schedule()


def test_the_target_makes_one_ddim_step_land_on_the_teachers_state():
    sched = make_scheduler("ddim")
    sched.set_timesteps(4)
    x_in, x_next = torch.randn(1, 4, 2, 3, 3), torch.randn(1, 4, 2, 3, 3)
    acp = sched.alphas_cumprod
    a_in, a_next = acp[501].view(1), acp[251].view(1)
    x0 = x0_targets(x_in, x_next, a_in, a_next)
    eps = (x_in - a_in.sqrt() * x0) / (1 - a_in).sqrt()
    stepped = sched.step(eps, 501, x_in).prev_sample
    torch.testing.assert_close(stepped, x_next, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x0_from_eps(x_in, eps, a_in), x0, rtol=1e-4, atol=1e-4)


def test_distillation_lowers_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    teacher = random_unet(TINY_UNET, seed=0)
    student = random_unet(TINY_UNET, seed=0).train().requires_grad_(True)
    plan = DistillPlan(4, 2, guidance=2.0)
    objective = DistillObjective(student, teacher, plan, 1.0, seed=0, dub_share=0.5)
    g = torch.Generator().manual_seed(1)
    mom = lambda: (torch.randn(32, 4, 8, 8, generator=g), torch.full((32, 4, 8, 8), 0.1))  # noqa: E731
    batch = {
        "moments": {"gt": mom(), "masked": mom()},
        "mask": torch.from_numpy(make_mask(64))[None, None].expand(2, 1, 64, 64),
        "audio_windows": torch.randn(2, 16, 50, 384, generator=g),
    }
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        loss, parts = objective(batch, 0, torch.arange(2))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert set(parts) == {"x0_mse_step0", "x0_mse_step1"}
    assert losses[0] > 0 and losses[-1] < 0.7 * losses[0]


def test_recipe_distils_a_student_bundle_with_its_denoise_settings(tmp_path):
    pack = make_pack(tmp_path)
    teacher = make_teacher_bundle(tmp_path / "teacher")
    config = tmp_path / "unet.json"
    config.write_text(json.dumps(TINY_UNET))
    syncnet = str(write_tiny_syncnet_16(tmp_path / "syncnet.safetensors"))
    common = dict(unet_config=str(config), syncnet=syncnet, device="cpu", work=tmp_path / "w")
    # stage 2 with the quality options on (dynamic conditioning changes the architecture)
    quality = [
        "unet2.quality.dynamic_conditioning.enabled=true",
        "unet2.quality.dynamic_conditioning.hidden=8",
        "unet2.quality.phone_ctc.weight=0.1",
        "unet2.quality.phone_ctc.head_width=8",
    ]
    round2 = tmp_path / "round2"
    summary = demo_recipe.train(
        pack, ["unet2"], [0.08], round2, teacher, overrides=TINY + quality, **common
    )
    assert summary["stages"]["unet2"]["steps"] > 0
    bundle = load_bundle(round2)
    assert bundle.unet.config.dynamic_conditioning.enabled
    assert bundle_denoise_defaults(bundle.manifest) == {}
    lines = [json.loads(x) for x in (round2 / "metrics.jsonl").read_text().splitlines()]
    assert any("ctc" in r for r in lines if r.get("stage") == "unet2")
    # the student from that teacher
    out = tmp_path / "student"
    summary = demo_recipe.train(pack, ["student"], [0.08], out, round2, overrides=TINY, **common)
    ev = summary["stages"]["student"]["eval"]
    assert ev["student_vs_teacher_rms"] >= 0 and "sync_cos_generated" in ev
    student = load_bundle(out)
    defaults = bundle_denoise_defaults(student.manifest)
    assert defaults == {"steps": 2, "guidance": 1.0, "scheduler": "ddim"}
    assert student.manifest["training"]["student"]["teacher"] == {"steps": 4, "guidance": 1.5}
    # loading it as the demo preset's bundle (or as --unet) makes these the run's defaults;
    # the teacher's bundle asks for none
    for folder, unet, want in ((out, None, (2, 1.0)), (round2, None, (20, 1.5)),
                               (round2, out, (2, 1.0))):  # fmt: skip
        ls = LipSync.from_pretrained("demo", device="cpu", bundle_dir=folder, unet=unet)
        assert (ls.defaults.steps, ls.defaults.guidance, ls.defaults.scheduler) == (*want, "ddim")
    faces = torch.rand(16, 3, 64, 64) * 2 - 1
    denoiser = ChunkDenoiser(student.unet, student.vae, make_mask(64), DenoiseOptions(**defaults))
    result = denoiser(
        faces, torch.randn(16, 50, 384), torch.randn(1, 4, 1, 8, 8).expand(1, 4, 16, 8, 8)
    )
    assert result.shape == faces.shape and torch.isfinite(result).all()
    with pytest.raises(Exception, match="distil again from its teacher"):
        demo_recipe.train(
            pack, ["student"], [0.05], tmp_path / "again", out, overrides=TINY, **common
        )
