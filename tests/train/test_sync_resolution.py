"""The SyncNet loss at a training resolution above the SyncNet's (LatentSync 1.6's stage 2: 512 px
faces, the 256 px SyncNet): the decoded faces are resized to the SyncNet's resolution, as the
reference's ``train_unet.py`` does; a SyncNet is never rebuilt at the training resolution (its
encoders would no longer end at 1×1: ConfigError). Tiny sizes: 128 px faces, a 64 px SyncNet."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
import torch.nn.functional as F

from lipsync.models.syncnet import StableSyncNet
from lipsync.train.losses import LossModels, LossWeights, sync_loss, syncnet_input, total_loss
from tests.support.benchmark_scripts import load_benchmark
from tests.support.train_fixtures import TINY_SYNCNET_16, TINY_UNET, TINY_VAE

stage2 = load_benchmark("gpu_train_stage2")


def test_syncnet_input_resizes_faces_to_the_syncnet_resolution():
    frames = torch.rand(2, 16, 3, 128, 128) * 2 - 1
    image = syncnet_input(frames, lower_half=True, resolution=64)
    assert image.shape == (2, 48, 32, 64)
    expected = F.interpolate(frames.reshape(32, 3, 128, 128), size=(64, 64), mode="bicubic")
    assert torch.equal(image, expected.reshape(2, 48, 64, 64)[:, :, 32:, :])
    same = syncnet_input(frames, lower_half=True, resolution=128)  # no resize at equal size
    assert torch.equal(same, frames.reshape(2, 48, 128, 128)[:, :, 64:, :])


def test_sync_loss_of_128px_faces_runs_the_64px_syncnet_on_resized_faces():
    torch.manual_seed(0)
    syncnet = StableSyncNet.from_config(TINY_SYNCNET_16).eval()
    with pytest.raises(Exception, match="not 1×1"):  # what the old code built, and failed on
        StableSyncNet.from_config({**TINY_SYNCNET_16, "resolution": 128})
    faces = torch.rand(1, 16, 3, 128, 128) * 2 - 1
    decode = lambda latents: faces.reshape(16, 3, 128, 128)  # noqa: E731 (a fixed "decoder")
    mel = torch.randn(1, 1, 80, 52)
    shape = (1, 4, 16, 16, 16)
    noise, pred = torch.randn(shape), torch.randn(shape)
    alphas = torch.linspace(0.99, 0.01, 1000)
    loss, parts = total_loss(
        LossWeights(recon=0.0, sync=1.0), LossModels(decode=decode, syncnet=syncnet),
        pred, noise, torch.randn(shape), torch.tensor([500]), alphas, None, mel,
    )  # fmt: skip
    vision, audio = syncnet(syncnet_input(faces, True, 64), mel)[:2]
    assert parts["sync"] == pytest.approx(sync_loss(vision, audio).mean().item(), rel=1e-6)
    assert loss.item() == pytest.approx(parts["sync"].item())


def test_stage2_script_trains_a_step_at_twice_the_syncnet_resolution(tmp_path):
    """benchmarks/gpu_train_stage2.py (and gpu_multi_train.py's fsdp phase, which builds its
    models with it) at a resolution above the SyncNet's: the step runs with the sync loss."""
    args = argparse.Namespace(
        unet_config=json.dumps(TINY_UNET), vae_config=json.dumps(TINY_VAE),
        syncnet_config=json.dumps(TINY_SYNCNET_16), resolution=128, trainable="motion_modules.",
        no_checkpointing=True, lpips=False, trepa=False, trepa_dims=None, precision="fp32",
        work=str(tmp_path), warmup=0, steps=1, peak_tflops=790.0,
    )  # fmt: skip
    record = stage2.measure(args, 1, torch.device("cpu"))
    assert record["resolution"] == 128 and record["syncnet_resolution"] == 64
    assert record["loss"] > 0 and record["step_s"] > 0
