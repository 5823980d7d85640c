"""The quality losses of issue 16 on tiny inputs: the phone CTC head (learns to read toy mouths,
keeps the U-Net's gradient away from its own weights, strict files), the video encoders (ours
trains; VideoMAE loads from a local file), mouth-weighted TREPA (weights the lips, sees
flicker), and a stage-2 `lipsync train unet` run with all three options on."""

from __future__ import annotations

import json

import pytest
import torch

from lipsync.errors import CheckpointError, CheckpointNotFoundError, ConfigError
from lipsync.own_checkpoints import load_own_unet
from lipsync.train.config import QualitySection, load_unet_config
from lipsync.train.losses import VideoMaeDims, VideoMaeEncoder
from lipsync.train.metrics import read_jsonl
from lipsync.train.mouth import lip_weight_map, mouth_box
from lipsync.train.mouth_trepa import MouthWeightedTrepa
from lipsync.train.phone_ctc import (
    MouthCtcHead,
    PhoneCtcLoss,
    ctc_targets,
    to_units,
    train_ctc_head,
    unit_error_rate,
)
from lipsync.train.quality import build_quality_losses
from lipsync.train.unet import train_unet
from lipsync.train.video_encoder import (
    TinyVideoAutoencoder,
    TinyVideoConfig,
    load_video_encoder,
    train_video_autoencoder,
)
from tests.support.quality_fixtures import CLOSED, OPEN, toy_faces
from tests.support.train_fixtures import (
    RES,
    unet_config_dict,
    write_stage1_unet,
    write_tiny_syncnet,
)

TINY_MAE = {
    "embed_dim": 32,
    "depth": 1,
    "num_heads": 2,
    "mlp_hidden": 64,
    "patch_size": 16,
    "tubelet_size": 2,
    "image_size": 32,
    "num_frames": 4,
    "num_classes": 3,
}


def test_ctc_targets_collapse_repeats_and_skip_unknown_frames():
    units = torch.tensor([[3, 3, -1, 3, 5, 5, 1], [-1, -1, -1, -1, -1, -1, -1]])
    targets, lengths = ctc_targets(units)
    assert targets.tolist() == [3, 5, 1] and lengths.tolist() == [3, 0]
    visemes = to_units(torch.tensor([OPEN, CLOSED, -1]), "viseme")
    assert visemes.tolist()[2] == -1 and visemes[0] != visemes[1]


def test_the_head_learns_to_read_toy_mouths():
    torch.manual_seed(0)

    def sample(step):
        return toy_faces(8, 16, seed=step)

    head, losses = train_ctc_head(sample, steps=50, units="viseme", width=8, lr=3e-3)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    faces, phones = toy_faces(8, 16, seed=999)
    with torch.no_grad():
        per = unit_error_rate(head(faces), to_units(phones, "viseme"))
    assert per < 0.5  # chance: most windows' sequences would be wrong


def test_the_generated_term_trains_the_unet_not_the_head(tmp_path):
    torch.manual_seed(0)
    head = MouthCtcHead(42, width=8)
    loss_fn = PhoneCtcLoss(head, lr=1e-2)
    gt, phones = toy_faces(2, 16)
    generated = (gt + 0.1 * torch.randn_like(gt)).requires_grad_(True)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    loss, parts = loss_fn.eval()(generated, gt, phones, torch.tensor([1.0, 0.2]))
    loss.backward()
    assert generated.grad is not None and generated.grad.abs().sum() > 0
    assert all(p.grad is None for p in head.parameters())
    assert all(torch.equal(before[k], v) for k, v in head.state_dict().items())  # eval: no update
    assert "ctc_head_gt" not in parts
    loss, parts = loss_fn.train()(generated, gt, phones, None)
    assert "ctc_head_gt" in parts  # the head learned one step from the ground truth
    assert any(not torch.equal(before[k], v) for k, v in head.state_dict().items())
    # files: strict round trip, units checked
    head.save(tmp_path / "head.safetensors")
    again = MouthCtcHead.from_file(tmp_path / "head.safetensors", units="phone")
    pairs = zip(again.state_dict().values(), head.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    with pytest.raises(CheckpointError, match="reads phones"):
        MouthCtcHead.from_file(tmp_path / "head.safetensors", units="viseme")
    with pytest.raises(CheckpointNotFoundError):
        MouthCtcHead.from_file(tmp_path / "nope.safetensors")


def test_tiny_video_autoencoder_trains_and_round_trips(tmp_path):
    def sample(step):
        return toy_faces(4, 8, seed=step)[0]

    model, losses = train_video_autoencoder(
        sample, 30, TinyVideoConfig(width=8, channels=16), lr=3e-3
    )
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5])
    feats = model.features(sample(0))
    assert feats.shape == (4, 16, 8, 6, 10)
    path = tmp_path / "enc.safetensors"
    model.save(path)
    loaded = load_video_encoder("tiny3d", path)
    assert torch.equal(loaded.features(sample(1)), model.features(sample(1)))
    assert not any(p.requires_grad for p in loaded.parameters())


def test_videomae_loads_from_a_local_file_and_drives_the_weighting(tmp_path):
    torch.manual_seed(0)
    mae = VideoMaeEncoder(VideoMaeDims(**TINY_MAE))
    path = tmp_path / "videomae.pth"
    torch.save({"model": mae.state_dict()}, path)
    encoder = load_video_encoder("videomae", path, TINY_MAE)
    faces = toy_faces(1, 4)[0]
    assert encoder.features(faces).shape == (1, 32, 2, 2, 2)
    loss = MouthWeightedTrepa(encoder, RES, mouth_weight=4.0)
    fake = faces.clone().requires_grad_(True)
    value = loss(fake, faces + 0.2)
    value.backward()
    assert value > 0 and fake.grad.abs().sum() > 0
    broken = {k: v for k, v in mae.state_dict().items() if "blocks.0.mlp" not in k}
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match="mlp"):
        load_video_encoder("videomae", tmp_path / "broken.pth", TINY_MAE)
    with pytest.raises(CheckpointNotFoundError):
        load_video_encoder("videomae", tmp_path / "nope.pth", TINY_MAE)
    with pytest.raises(ConfigError, match="needs a file"):
        load_video_encoder("tiny3d", None)


def test_mouth_weighting_counts_the_lips_and_sees_flicker():
    torch.manual_seed(0)
    encoder = TinyVideoAutoencoder(TinyVideoConfig(width=8, channels=16)).eval()
    faces = toy_faces(1, 8)[0]
    r = RES
    lips = faces.clone()
    lips[..., int(0.6 * r) : int(0.68 * r), int(0.4 * r) : int(0.6 * r)] += 0.5
    t, _, left, _ = mouth_box(r)
    cheek = faces.clone()
    cheek[..., t : t + int(0.08 * r), left : left + int(0.2 * r)] += 0.5

    def ratio(m):
        loss = MouthWeightedTrepa(encoder, r, mouth_weight=m, delta=0.0)
        return float(loss(lips, faces) / loss(cheek, faces))

    assert ratio(8.0) > 1.5 * ratio(1.0)
    assert float(MouthWeightedTrepa(encoder, r)(faces, faces)) == 0.0
    # flicker: every other frame brightened on the lips; the same change on every frame is not
    flicker, steady = faces.clone(), faces.clone()
    flicker[:, ::2, :, int(0.6 * r) : int(0.7 * r)] += 0.3
    steady[:, :, :, int(0.6 * r) : int(0.7 * r)] += 0.3
    delta_only = MouthWeightedTrepa(encoder, r, mouth_weight=4.0, delta=1.0)
    plain = MouthWeightedTrepa(encoder, r, mouth_weight=4.0, delta=0.0)
    assert float(delta_only(flicker, faces) - plain(flicker, faces)) > float(
        delta_only(steady, faces) - plain(steady, faces)
    )
    w = lip_weight_map(r, 4.0)
    assert float(w.max()) == pytest.approx(4.0, rel=0.05) and float(w.min()) == pytest.approx(1.0)


def test_quality_section_errors_are_one_line():
    section = QualitySection()
    assert build_quality_losses(section, RES, "cpu") is None
    section.mouth_trepa.weight = 1.0
    with pytest.raises(ConfigError, match="needs quality.mouth_trepa.encoder_path"):
        build_quality_losses(section, RES, "cpu")
    section = QualitySection()
    section.phone_ctc.weight = 0.1
    section.phone_ctc.head_init = "/nowhere/head.safetensors"
    with pytest.raises(CheckpointNotFoundError, match="phone head not found"):
        build_quality_losses(section, RES, "cpu")


def test_stage2_trains_with_the_three_options(tmp_path, monkeypatch):
    """`lipsync train unet` stage 2 from stage-1 weights with the CTC head, mouth TREPA (our
    encoder, from a file) and dynamic conditioning: the parts are logged, the gates are new keys
    that train, and the exported U-Net carries the option in its config."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    stage1 = tmp_path / "stage1"
    write_stage1_unet(stage1)
    encoder = tmp_path / "enc.safetensors"
    TinyVideoAutoencoder(TinyVideoConfig(width=8, channels=16)).save(encoder)
    syncnet = write_tiny_syncnet(tmp_path / "syncnet.safetensors")
    out = tmp_path / "stage2"
    cfg = load_unet_config(
        unet_config_dict(
            out,
            stage=2,
            init={"source": "own", "path": str(stage1), "allow_missing": ["motion_modules."]},
            syncnet={"path": str(syncnet)},
            data={"factory": "tests.support.quality_fixtures:phoned_toy_windows"},
            losses={"recon": 1.0, "sync": 0.1, "pixel_space": True},
            train={"max_steps": 2},
            quality={
                "phone_ctc": {"weight": 0.1, "head_width": 8, "units": "viseme"},
                "mouth_trepa": {"weight": 1.0, "encoder_path": str(encoder)},
                "dynamic_conditioning": {"enabled": True, "hidden": 8},
            },
        )
    )
    summary = train_unet(cfg, device="cpu", show_progress=False)
    assert summary["steps"] == 2 and summary["init"]["missing_allowed"] > 0
    rec = [r for r in read_jsonl(out / "metrics.jsonl") if r["split"] == "train"]
    assert all(r["ctc"] > 0 and r["mtrepa"] >= 0 and r["sync"] > 0 for r in rec)
    unet = load_own_unet(out)
    assert unet.config.dynamic_conditioning.enabled
    gates = {k: v for k, v in unet.state_dict().items() if ".cond_gate.frame.2." in k}
    assert gates and any(float(v.abs().max()) > 0 for v in gates.values())  # trained from zero
    written = json.loads((out / "unet_config.json").read_text())
    assert written["dynamic_conditioning"]["enabled"] is True
