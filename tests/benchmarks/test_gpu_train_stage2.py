"""The GPU measurement script for stage-2 training, run on the CPU with tiny configs: it must
complete a real training step with every loss (SyncNet, LPIPS, TREPA) and write its JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support.shared import REPO
from tests.support.train_fixtures import TINY_SYNCNET_16, TINY_UNET, TINY_VAE

pytestmark = [pytest.mark.slow]

TINY_TREPA = {"embed_dim": 64, "depth": 2, "num_heads": 4, "mlp_hidden": 128, "patch_size": 16,
              "image_size": 32, "num_frames": 16, "num_classes": 10}  # fmt: skip


def test_stage2_measurement_script_writes_its_report(tmp_path):
    out = tmp_path / "stage2.json"
    command = [
        sys.executable, str(REPO / "benchmarks" / "gpu_train_stage2.py"), "--out", str(out),
        "--batch", "1", "--steps", "1", "--warmup", "0", "--resolution", "64",
        "--precision", "fp32", "--device", "cpu", "--work", str(tmp_path / "work"),
        "--unet-config", json.dumps(TINY_UNET), "--vae-config", json.dumps(TINY_VAE),
        "--syncnet-config", json.dumps(TINY_SYNCNET_16), "--trepa-dims", json.dumps(TINY_TREPA),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    subprocess.run(command, check=True, timeout=600, env=env, capture_output=True)
    report = json.loads(out.read_text())
    assert [r["batch"] for r in report["results"]] == [1]
    for r in report["results"]:
        assert r["step_s"] > 0 and r["flops_per_step"] > 0 and r["samples_per_s"] > 0
        assert 0 < r["share_of_bf16_peak"] and r["loss"] > 0
        assert 0 < r["unet_trainable_parameters"] < r["unet_parameters"]
        assert r["trepa_parameters"] > 0 and r["lpips_parameters"] > 0
    assert report["settings"]["trainable"] == "motion_modules.,attentions."
