"""U-Net training on a CPU: tiny configs, a toy dataset with the UNetWindows item keys.

Covers: the loss goes down; SIGKILL + resume gives the uninterrupted run's loss curve and weights;
two gloo processes (batch 1 each) equal one process with batch 2; SIGTERM stops with a checkpoint;
stage 2 (motion modules zero-initialised, only the listed modules train, SyncNet loss); the
exported checkpoint loads into UNet3D and denoises through the pipeline; config errors are one
``error:`` line with exit code 2.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lipsync.audio import load_audio
from lipsync.config import get_preset
from lipsync.diffusion import ChunkDenoiser, DenoiseOptions
from lipsync.loading import ModelBundle
from lipsync.models.unet import UNet3D
from lipsync.models.vae import TINY_VAE_CONFIG, random_vae
from lipsync.own_checkpoints import load_own_unet, seeded_audio_encoder
from lipsync.pipeline import LipSyncPipeline, RunOptions
from lipsync.train.checkpointing import CheckpointDir
from lipsync.train.config import load_unet_config
from lipsync.train.metrics import read_jsonl
from lipsync.train.unet import build_unet, train_unet
from tests.support.shared import MEDIA, REPO, demo_source_frames
from tests.support.train_fixtures import (
    ToyWindows,
    make_processed_corpus,
    unet_config_dict,
    write_config,
    write_stage1_unet,
    write_tiny_syncnet,
)

ENV = {
    **os.environ,
    "PYTHONPATH": str(REPO),
    "OMP_NUM_THREADS": "1",  # reproducible CPU kernels, and gentle on a shared machine
    "PYTHONUNBUFFERED": "1",
}


def cli(*args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "lipsync.cli",
        "train",
        "unet",
        *args,
        "--quiet",
        "--device",
        "cpu",
    ]


def losses(run: Path, split: str = "train") -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(run / "metrics.jsonl") if r["split"] == split}


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "unet.safetensors"))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """An uninterrupted 6-step stage-1 run (checkpoints every 2 steps)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    cfg = write_config(out.parent / "cfg.json", unet_config_dict(
        out, stage=1, checkpoint={"every": 2, "keep": 5},
        validation={"every": 6, "at_start": True, "windows": 2, "videos": 0},
    ))  # fmt: skip
    subprocess.run(cli(str(cfg)), env=ENV, check=True, timeout=600)
    return out


def test_training_lowers_the_validation_loss(reference_run):
    val = losses(reference_run, "val")
    assert set(val) == {0, 6}
    # same held-out windows, timesteps and noise before and after 6 steps
    assert val[6] < 0.85 * val[0], val
    train = losses(reference_run)
    assert sorted(train) == [1, 2, 3, 4, 5, 6]
    assert (reference_run / "loss.png").stat().st_size > 1000
    summary = json.loads((reference_run / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["stopped"] == "max_steps"


def test_resume_after_sigkill_continues_the_same_run(reference_run, tmp_path):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.json", unet_config_dict(
        out, stage=1, checkpoint={"every": 2, "keep": 5},
        validation={"every": 6, "at_start": True, "windows": 2, "videos": 0},
    ))  # fmt: skip
    proc = subprocess.Popen(cli(str(cfg)), env=ENV, stdout=subprocess.DEVNULL)
    try:
        deadline = time.time() + 400
        while not (out / "checkpoints" / "step-00000004.pt").exists():
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "checkpoints" / "step-00000006.pt").exists()
    done = subprocess.run(cli(str(cfg), "--json"), env=ENV, check=True, timeout=600,
                          capture_output=True, text=True)  # fmt: skip
    summary = json.loads(done.stdout)
    assert summary["resumed"] is True and summary["steps"] == 6
    assert summary["steps_this_run"] == 2
    ref, got = losses(reference_run), losses(out)
    assert sorted(got) == sorted(ref)
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-6, abs=1e-7), step
    assert losses(out, "val") == pytest.approx(losses(reference_run, "val"), rel=1e-6)
    a, b = weights(reference_run), weights(out)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_with_the_doubled_batch(tmp_path):
    """DDP and FSDP (2 processes, batch 1 each) against one process with batch 2."""
    # Adam's eps at 1e-6: with the default 1e-8, parameters whose true gradient is ~0 move by
    # up to a full step in the direction of float rounding noise, which differs between runs
    common = {"checkpoint": {"every": 3}, "train": {"max_steps": 3},
              "optimizer": {"lr": 1e-3, "fused": False, "eps": 1e-6}}  # fmt: skip
    one = write_config(tmp_path / "one.json", unet_config_dict(
        tmp_path / "one", stage=1, data={"batch_size": 2}, **common))  # fmt: skip
    subprocess.run(cli(str(one)), env=ENV, check=True, timeout=600)
    a, wa = losses(tmp_path / "one"), weights(tmp_path / "one")
    assert sorted(a) == [1, 2, 3]
    for strategy in ("ddp", "fsdp"):
        run = tmp_path / strategy
        cfg = write_config(tmp_path / f"{strategy}.json", unet_config_dict(
            run, stage=1, data={"batch_size": 1}, distributed={"strategy": strategy},
            **common))  # fmt: skip
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node", "2", "-m", "lipsync.cli", "train", "unet", str(cfg),
                    "--quiet", "--device", "cpu"]  # fmt: skip
        subprocess.run(torchrun, env=ENV, check=True, timeout=600)
        b = losses(run)
        assert sorted(b) == [1, 2, 3]
        for step in a:
            assert b[step] == pytest.approx(a[step], rel=1e-5), (strategy, step)
        summary = json.loads((run / "summary.json").read_text())
        assert summary["world_size"] == 2
        # the weights agree to a small part of one Adam update (lr 1e-3)
        wb = weights(run)
        assert wb.keys() == wa.keys()
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=2e-5)


def test_sigterm_stops_after_the_step_with_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.json", unet_config_dict(
        out, stage=1, train={"max_steps": 1000}, checkpoint={"every": 1000}))  # fmt: skip
    proc = subprocess.Popen(cli(str(cfg), "--json"), env=ENV, stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 400
    while not (out / "metrics.jsonl").exists() or not losses(out):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM
    summary = json.loads(stdout)
    assert summary["stopped"] == "signal SIGTERM"
    step = summary["steps"]
    assert 1 <= step < 1000
    assert (out / "checkpoints" / f"step-{step:08d}.pt").is_file()
    assert max(losses(out)) == step


def test_stage2_trains_only_the_listed_modules_with_the_sync_loss(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # stage-1 weights (random here) saved as one of our checkpoints, then stage 2 from them
    stage1 = tmp_path / "stage1"
    model1 = write_stage1_unet(stage1)
    syncnet = write_tiny_syncnet(tmp_path / "syncnet.safetensors")
    out = tmp_path / "stage2"
    cfg = load_unet_config(unet_config_dict(
        out, stage=2,
        init={"source": "own", "path": str(stage1), "allow_missing": ["motion_modules."]},
        syncnet={"path": str(syncnet)},
        losses={"recon": 1.0, "sync": 0.5, "pixel_space": True},
        train={"trainable": ["motion_modules.", "attn2."], "max_steps": 2},
        validation={"every": 2, "windows": 1, "videos": 1, "inference_steps": 2},
    ))  # fmt: skip
    model2, report = build_unet(cfg)
    assert report["missing_allowed"] > 0 and report["unexpected_dropped"] == 0
    # new motion modules start as the identity: their output projection is zero
    zeroed = [v for k, v in model2.state_dict().items() if "proj_out" in k and "motion" in k]
    assert zeroed and all(float(v.abs().max()) == 0.0 for v in zeroed)
    summary = train_unet(cfg, device="cpu", show_progress=False)
    assert summary["steps"] == 2
    rec = [r for r in read_jsonl(out / "metrics.jsonl") if r["split"] == "train"]
    assert all(r["sync"] > 0 and r["mse"] > 0 for r in rec)
    after = weights(out)
    before = model1.state_dict()
    changed = {k for k in before if not torch.equal(after[k].float(), before[k].float())}
    assert changed and all("motion_modules." in k or "attn2." in k for k in changed)
    assert any("attn2." in k for k in changed)
    # frozen weights are exactly the stage-1 ones
    assert torch.equal(after["conv_in.weight"], before["conv_in.weight"])
    assert list((out / "val").glob("step-00000002-0.mp4"))


@pytest.mark.e2e
def test_checkpoint_loads_into_unet3d_and_denoises_through_the_pipeline(reference_run):
    unet = load_own_unet(reference_run)
    assert isinstance(unet, UNet3D)
    state = CheckpointDir(reference_run / "checkpoints").load_latest()["model"]
    for k, v in unet.state_dict().items():
        assert torch.equal(v, state[k]), k
    # the denoiser on a few toy frames: the loaded model and the checkpoint's give the same faces
    item = ToyWindows("val")[0]
    vae = random_vae(TINY_VAE_CONFIG)
    options = DenoiseOptions(steps=2)
    noise = torch.randn(1, 4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    noise = noise.expand(1, 4, 4, 8, 8)
    out = ChunkDenoiser(unet, vae, item["mask"][0], options)(
        item["frames"], item["audio_windows"], noise, torch.Generator().manual_seed(1)
    )
    assert out.shape == item["frames"].shape and torch.isfinite(out).all()
    # the whole pipeline (face detection, alignment, chunks, paste-back) on real frames
    frames = demo_source_frames(8)
    wav = load_audio(MEDIA / "demo1_audio.wav")[: 8 * 640]
    preset = get_preset("tiny")
    bundle = ModelBundle(preset, unet, vae, seeded_audio_encoder(0), torch.device("cpu"),
                         torch.float32, 0.0)  # fmt: skip
    synced, report = LipSyncPipeline(bundle).run_arrays(frames, wav, RunOptions(steps=2))
    assert synced.shape == frames.shape and synced.dtype == np.uint8
    assert report.frames == 8 and report.frames_with_face == 8
    # the mouth was regenerated, the rest of the frame kept
    diff = np.abs(synced.astype(int) - frames.astype(int)).max(axis=-1)
    assert diff.max() > 10 and (diff == 0).mean() > 0.5


def run_main(capsys, *argv: str) -> tuple[int, str]:
    from lipsync.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["train", "unet", *argv])
    captured = capsys.readouterr()
    return exc.value.code, (captured.out + captured.err).strip()


PIXEL = {"pixel_space": True}
CONFIG_ERRORS = [
    (
        {"losses": {"recon": 1.0, "snyc": 0.1}},
        "unknown config key 'losses.snyc' (did you mean 'sync'?)",
    ),
    ({"train": {"max_steps": "ten"}}, "train.max_steps must be an integer"),
    ({"train": {"precision": "fp8"}}, "train.precision must be one of"),
    ({"stage": 2, "losses": {"sync": 0.05, **PIXEL}}, "losses.sync > 0 needs syncnet.path"),
    (
        {"stage": 2, "losses": {"lpips": 0.1, **PIXEL}},
        "losses.lpips > 0 needs losses.lpips_weights",
    ),
    (
        {"stage": 2, "losses": {"trepa": 10.0, **PIXEL}},
        "losses.trepa > 0 needs losses.trepa_weights",
    ),
    ({"losses": {"sync": 0.05}}, "stage 1 trains with the noise MSE only"),
    ({"init": {"source": "official"}}, "init.source is 'official' but init.path is not set"),
    (
        {"train": {"trainable": ["motoin_modules."]}},
        "train.trainable pattern(s) match no parameter: motoin_modules.",
    ),
    (
        {"init": {"source": "official", "path": "/nonexistent/latentsync_unet.pt"}},
        "checkpoint not found: /nonexistent/latentsync_unet.pt",
    ),
    (
        {"stage": 2, "losses": {"lpips": 0.1, "lpips_weights": "/nonexistent/lpips.pth", **PIXEL}},
        "checkpoint not found: /nonexistent/lpips.pth",
    ),
]


@pytest.mark.parametrize(("change", "expected"), CONFIG_ERRORS)
def test_config_errors_are_one_line(change, expected, tmp_path, capsys):
    change = dict(change)
    cfg = unet_config_dict(tmp_path / "run", stage=change.pop("stage", 1))
    for key, value in change.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    code, text = run_main(capsys, str(write_config(tmp_path / "cfg.json", cfg)), "--quiet")
    assert code == 2
    lines = text.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), text
    assert expected in lines[0]


def test_yaml_errors_and_overrides_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: 1\nmodel: [unclosed\n")
    code, text = run_main(capsys, str(bad))
    assert code == 2 and text.startswith("error: cannot parse") and len(text.splitlines()) == 1
    good = write_config(tmp_path / "cfg.json", unet_config_dict(tmp_path / "run"))
    code, text = run_main(capsys, str(good), "--set", "train.max_steps=-3")
    assert code == 2 and text == "error: train.max_steps must be > 0, got -3"


def test_trains_on_a_processed_corpus_through_unet_windows(tmp_path):
    """The default data path: ``data.root`` -> lipsync.data.datasets.UNetWindows with Whisper
    windows from the (seeded) audio encoder through the FeatureCache, SyncNet mels, stage 2."""
    corpus = make_processed_corpus(tmp_path / "corpus")
    syncnet = write_tiny_syncnet(tmp_path / "syncnet.safetensors")
    out = tmp_path / "run"
    cfg = unet_config_dict(
        out, stage=2, data={"root": str(corpus), "factory": None, "batch_size": 2},
        syncnet={"path": str(syncnet)}, losses={"recon": 1.0, "sync": 0.1, "pixel_space": True},
        train={"max_steps": 2}, validation={"every": 2, "windows": 1, "videos": 1,
                                             "inference_steps": 2},
    )  # fmt: skip
    summary = train_unet(load_unet_config(cfg), device="cpu", show_progress=False)
    assert summary["steps"] == 2
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2]
    assert all(r["sync"] > 0 for r in records if r["split"] == "train")
    assert len(list((corpus / "cache").glob("whisper-*/*.npy"))) >= 4  # features cached
    # the validation video carries the window's audio from the corpus
    video = next((out / "val").glob("*.mp4"))
    assert load_audio(video).shape[0] > 0
