"""SyncNet training: loss goes down, resume after SIGKILL continues the same curve, two gloo
processes equal one process with the doubled batch, run-folder outputs, refusals.

All runs use the toy stand-in data (``lipsync.data.toy_sync``: drawn mouths and a voiced sound,
learnable) and a small toy SyncNet at 32 px, so they take seconds on a CPU.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lipsync.checkpoints import load_syncnet
from lipsync.errors import ConfigError
from lipsync.train.metrics import read_jsonl
from lipsync.train.syncnet import SyncNetTrainConfig, train_syncnet
from tests.support.shared import FIXTURES, REPO

TOY = json.loads((FIXTURES / "syncnet_toy_train.json").read_text())
DATA = "toy:clips=2,frames=40,resolution=32"


def write_config(tmp_path: Path, data: str = DATA, **train) -> Path:
    cfg = json.loads(json.dumps(TOY))
    cfg["data"] = {"root": data, "num_workers": 0, "val_split": "val", "test_split": None}
    cfg["train"] = {
        "batch_size": 4, "lr": 3e-4, "warmup_steps": 2, "max_steps": 12, "log_every": 2,
        "checkpoint_every": 4, "val_every": 6, "val_pairs": 8, "val_batch_size": 8, **train,
    }  # fmt: skip
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    return path


def cli(*args: str, env_extra: dict | None = None, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.Popen(
        [sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, **kwargs,
    )  # fmt: skip


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def train_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r}


def test_a_few_steps_decrease_the_loss(tmp_path):
    # one short toy clip, almost all of its pairs in every batch: the loss must fall fast
    cfg = SyncNetTrainConfig.from_file(
        write_config(tmp_path, data="toy:clips=1,frames=28,resolution=32", batch_size=12,
                     max_steps=40, log_every=5, checkpoint_every=40, val_every=0),
    )  # fmt: skip
    torch.set_num_threads(1)
    summary = train_syncnet(cfg, tmp_path / "run", device="cpu", show_progress=False)
    losses = train_losses(tmp_path / "run")
    assert sorted(losses) == list(range(5, 41, 5))
    first, last = losses[5], (losses[35] + losses[40]) / 2
    assert first > 0.6 and last < 0.7 * first, losses  # measured: 0.68 -> 0.32
    assert summary["steps"] == 40 and summary["stopped"] == "max_steps"


def test_run_folder_holds_metrics_charts_and_a_loadable_model(tmp_path):
    run = tmp_path / "run"
    proc = cli("-m", "lipsync.cli", "train", "syncnet", str(write_config(tmp_path)),
               "--out", str(run), "--json", "--device", "cpu", "--quiet")  # fmt: skip
    code, out, err = finish(proc)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["steps"] == 12 and summary["val"]["pairs"] == 8
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in records if r.get("split") == "val"] == [6, 12]
    assert all(k in records[0] for k in ("loss", "acc", "lr", "samples_per_s", "elapsed_s"))
    assert (run / "metrics.png").stat().st_size > 10_000
    assert json.loads((run / "config.json").read_text())["batch_size"] == 4
    model, info = load_syncnet(run / "syncnet.safetensors")
    assert info["name"] == TOY["name"] and info["steps"] == "12"
    assert model.config.resolution == 32
    # the exported model evaluates through the CLI, named in the report
    proc = cli("-m", "lipsync.cli", "eval", "syncnet-accuracy", DATA,
               "--syncnet", str(run / "syncnet.safetensors"), "--split", "val", "--pairs", "8",
               "--num-workers", "0", "--device", "cpu", "--json")  # fmt: skip
    code, out, err = finish(proc)
    assert code == 0, err
    report = json.loads(out)
    assert report["syncnet"] == TOY["name"] and report["pairs"] == 8
    assert report["accuracy"] == pytest.approx(summary["val"]["accuracy"])


def test_init_starts_from_an_exported_syncnet_and_refuses_another_architecture(tmp_path):
    torch.set_num_threads(1)
    first = SyncNetTrainConfig.from_file(
        write_config(tmp_path, max_steps=8, val_every=0, checkpoint_every=8)
    )
    train_syncnet(first, tmp_path / "a", device="cpu", show_progress=False)
    exported = tmp_path / "a" / "syncnet.safetensors"
    trained, _ = load_syncnet(exported)
    # zero learning rate: the fine-tune's weights stay exactly the exported (fp16-stored) ones
    cfg = SyncNetTrainConfig.from_file(
        write_config(tmp_path, max_steps=2, val_every=0, checkpoint_every=2, lr=1e-30),
        init=str(exported),
    )
    train_syncnet(cfg, tmp_path / "b", device="cpu", show_progress=False)
    tuned, _ = load_syncnet(tmp_path / "b" / "syncnet.safetensors")
    for (name, a), b in zip(trained.state_dict().items(), tuned.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    # the seed alone gives other weights
    seeded = SyncNetTrainConfig.from_file(
        write_config(tmp_path, max_steps=2, val_every=0, checkpoint_every=2, lr=1e-30)
    )
    train_syncnet(seeded, tmp_path / "c", device="cpu", show_progress=False)
    fresh, _ = load_syncnet(tmp_path / "c" / "syncnet.safetensors")
    pairs = zip(trained.state_dict().values(), fresh.state_dict().values(), strict=True)
    assert not all(torch.equal(a, b) for a, b in pairs)
    other = json.loads(json.dumps(TOY))
    other["model"]["visual_encoder"]["block_out_channels"][0] = 32
    bad = SyncNetTrainConfig.from_dict({**other, "data": DATA}, init=str(exported))
    with pytest.raises(ConfigError, match="another architecture"):
        train_syncnet(bad, tmp_path / "d", device="cpu", show_progress=False)


@pytest.mark.slow
def test_resume_after_sigkill_continues_the_same_loss_curve(tmp_path):
    cfg = write_config(tmp_path, max_steps=16)
    args = ("-m", "lipsync.cli", "train", "syncnet", str(cfg), "--device", "cpu", "--quiet")
    whole = tmp_path / "whole"
    code, _, err = finish(cli(*args, "--out", str(whole)))
    assert code == 0, err

    killed = tmp_path / "killed"
    proc = cli(*args, "--out", str(killed), start_new_session=True)
    ckpt = killed / "checkpoints" / "step-00000008.pt"
    deadline = time.monotonic() + 240
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ckpt.exists(), proc.communicate()[1]
    os.killpg(proc.pid, signal.SIGKILL)  # no chance to checkpoint or clean up
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    steps_at_kill = max(train_losses(killed))
    assert 8 <= steps_at_kill < 16

    code, _, err = finish(cli(*args, "--out", str(killed)))
    assert code == 0, err
    assert "resumed from step 8" in err
    a, b = train_losses(whole), train_losses(killed)
    assert sorted(a) == sorted(b) == list(range(2, 17, 2))  # no duplicated or missing records
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), step
    vals_a = [r for r in read_jsonl(whole / "metrics.jsonl") if r.get("split") == "val"]
    vals_b = [r for r in read_jsonl(killed / "metrics.jsonl") if r.get("split") == "val"]
    assert [r["val_loss"] for r in vals_b] == pytest.approx([r["val_loss"] for r in vals_a])


def test_two_gloo_processes_equal_one_process_with_the_doubled_batch(tmp_path):
    cfg = write_config(tmp_path, max_steps=6, batch_size=8, checkpoint_every=6, val_every=6)
    one, two = tmp_path / "one", tmp_path / "two"
    code, _, err = finish(cli("-m", "lipsync.cli", "train", "syncnet", str(cfg), "--out",
                              str(one), "--device", "cpu", "--quiet"))  # fmt: skip
    assert code == 0, err
    proc = cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "lipsync.cli", "train", "syncnet", str(cfg), "--out", str(two),
               "--device", "cpu", "--quiet")  # fmt: skip
    code, _, err = finish(proc)
    assert code == 0, err
    a, b = train_losses(one), train_losses(two)
    assert sorted(a) == sorted(b) == [2, 4, 6]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4), (step, a, b)
    summary = json.loads((two / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["val"]["pairs"] == 8
    va = json.loads((one / "summary.json").read_text())["val"]
    assert summary["val"]["loss"] == pytest.approx(va["loss"], rel=1e-4)


def test_resuming_with_other_settings_is_refused_in_one_line(tmp_path):
    run = tmp_path / "run"
    cfg = write_config(tmp_path, max_steps=2, checkpoint_every=2, val_every=0)
    code, _, err = finish(cli("-m", "lipsync.cli", "train", "syncnet", str(cfg), "--out",
                              str(run), "--device", "cpu", "--quiet"))  # fmt: skip
    assert code == 0, err
    other = write_config(tmp_path, max_steps=4, checkpoint_every=2, val_every=0, lr=1e-3)
    code, _, err = finish(cli("-m", "lipsync.cli", "train", "syncnet", str(other), "--out",
                              str(run), "--device", "cpu", "--quiet"))  # fmt: skip
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "lr" in lines[0]


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ({"checkpoint_every": 5, "log_every": 2}, "multiple of log_every"),
        ({"precision": "fp8"}, "precision must be"),
        ({"colour": 1}, "unknown training settings: colour"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
    ],
)
def test_bad_training_configs(tmp_path, train, message):
    with pytest.raises(ConfigError, match=message):
        SyncNetTrainConfig.from_file(write_config(tmp_path, **train))
