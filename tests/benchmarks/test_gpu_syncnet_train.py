"""``benchmarks/gpu_syncnet_train.py`` end to end on the CPU with a tiny budget: train, hand
back at most 8 files, and continue on a 'fresh machine' from those files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lipsync.checkpoints import load_syncnet
from lipsync.train.metrics import read_jsonl
from tests.support.shared import FIXTURES, REPO

SCRIPT = REPO / "benchmarks/gpu_syncnet_train.py"
DATA = "toy:clips=2,frames=40,resolution=32"


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--data", DATA, "--config",
         str(FIXTURES / "syncnet_toy_train.json"), "--device", "cpu",
         "--num-workers", "0", "--batch-size", "4", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


@pytest.mark.slow
def test_budgeted_run_hands_back_files_and_resumes_from_them(tmp_path):
    out1, out2 = tmp_path / "out1", tmp_path / "out2"
    first = run("--max-minutes", "0.05", "--out", str(out1), "--run", str(tmp_path / "run1"),
                "--resume", str(tmp_path / "none"))  # fmt: skip
    assert first.returncode == 0, first.stderr
    line = json.loads(first.stdout.strip().splitlines()[-1])
    assert line["stopped"] == "max_minutes" and line["steps"] >= 10
    assert line["test_accuracy"] is not None and line["test_pairs"] > 0
    files = sorted(p.name for p in out1.iterdir())
    assert len(files) <= 8 and all((out1 / f).stat().st_size <= 16 * 2**20 for f in files)
    assert {"syncnet.safetensors", "metrics.jsonl", "metrics.png", "summary.json"} <= set(files)
    assert "checkpoint.pt.000" in files
    _, info = load_syncnet(out1 / "syncnet.safetensors")
    assert info["name"].startswith("lipsync toy SyncNet") and info["test_accuracy"]

    # a fresh machine: an empty run folder, the returned files carried in as --resume
    second = run("--max-minutes", "0.05", "--out", str(out2), "--run", str(tmp_path / "run2"),
                 "--resume", str(out1))  # fmt: skip
    assert second.returncode == 0, second.stderr
    assert f"restored step {line['steps']}" in second.stderr
    summary = json.loads((out2 / "summary.json").read_text())
    assert summary["restored_from_step"] == line["steps"] and summary["steps"] > line["steps"]
    steps = [r["step"] for r in read_jsonl(out2 / "metrics.jsonl") if "loss" in r]
    assert steps == sorted(set(steps)) and steps[0] == 10  # one curve from the first run on


def test_missing_data_is_one_error_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--data", str(tmp_path / "nothing"), "--max-minutes", "1",
         "--out", str(tmp_path / "out"), "--run", str(tmp_path / "run"), "--device", "cpu"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: data folder not found")
