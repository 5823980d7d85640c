"""``benchmarks/quality_modes.py`` on the demo clip with the tiny preset: every variant against
the fp32 eager reference, and the face track kept for the next run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support.shared import REPO

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def test_quality_script_on_the_demo_clip(tmp_path):
    out = tmp_path / "q.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "quality_modes.py"), "--preset", "tiny",
         "--source", "demo", "--frames", "4", "--steps", "2", "--dtypes", "fp32,bf16",
         "--mode-dtype", "bf16", "--modes", "fast,dpm2", "--face-cache", str(tmp_path / "faces"),
         "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report == json.loads(proc.stdout)
    assert report["weights"] == "random" and "random weights" in report["caveat"]
    assert report["reference"]["name"] == "exact-fp32-eager"
    variants = {v["name"]: v for v in report["variants"]}
    assert list(variants) == ["exact-fp32", "exact-bf16", "fast-bf16", "dpm2-bf16"]
    # same seed, same dtype, same path: the reference reproduces itself exactly
    assert variants["exact-fp32"]["vs_reference"]["psnr_db"] == float("inf")
    assert variants["exact-fp32"]["vs_reference"]["ssim"] == 1.0
    fast = variants["fast-bf16"]
    assert fast["denoise"]["cache_interval"] == 3 and "vs_exact_same_dtype" in fast
    for v in variants.values():
        assert v["unet_loop_fps"] > 0
        assert 0 < v["vs_reference"]["ssim"] <= 1 and v["vs_reference"]["psnr_db"] > 15
    assert list((tmp_path / "faces").glob("*.npz"))  # the face track was stored for next time
