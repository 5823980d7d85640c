"""benchmarks/gpu_multi_train.py's bookkeeping, without launching anything: which records count,
the steady-state rate, nvidia-smi parsing (busy share, peak memory, a time-zone offset), the
loss comparison, scaling efficiency and the launch order. (The whole script was run end to end
on the CPU with gloo; docs/PERFORMANCE.md, "Several GPUs".)"""

from __future__ import annotations

import json
import time

import pytest

from tests.support.benchmark_scripts import load_benchmark

mt = load_benchmark("gpu_multi_train")


def test_train_records_keep_one_train_record_per_step_and_skip_torn_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [
        {"step": 1, "split": "train", "loss": 1.0, "unix_s": 100.0},
        {"step": 2, "loss": 0.9, "unix_s": 101.0},  # SyncNet's records have no split
        {"step": 2, "split": "val", "loss": 5.0, "unix_s": 101.5},
        {"step": 3, "split": "train", "loss": 0.8},  # no wall clock: not usable
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 4, "lo')
    assert [(r["step"], r["loss"]) for r in mt.train_records(path)] == [(1, 1.0), (2, 0.9)]
    assert mt.train_records(tmp_path / "missing.jsonl") == []


def test_steady_rate_is_wall_clock_between_the_warmup_step_and_the_last():
    records = [{"step": s, "loss": 1.0, "unix_s": t} for s, t in
               [(1, 10.0), (2, 30.0), (3, 31.0), (4, 32.0), (5, 33.0)]]  # fmt: skip
    rate = mt.steady_rate(records, warmup=2, samples_per_step=16)
    assert rate["samples_per_s"] == pytest.approx(16.0)  # 3 steps of 16 in 3 s
    assert rate["step_s"] == pytest.approx(1.0) and rate["measured_steps"] == 3
    assert rate["window_unix_s"] == [30.0, 33.0]
    assert mt.steady_rate(records[:2], warmup=2, samples_per_step=16) == {}


def test_nvidia_smi_samples_give_busy_share_and_peak_memory_per_gpu():
    t0 = time.time()
    stamp = [time.strftime("%Y/%m/%d %H:%M:%S", time.localtime(t0 + k)) + ".000"
             for k in range(4)]  # fmt: skip
    text = "\n".join([
        f"{stamp[0]}, 0, 10, 1024", f"{stamp[0]}, 1, 0, 512",
        f"{stamp[1]}, 0, 90, 4096", f"{stamp[1]}, 1, 70, 2048",
        f"{stamp[2]}, 0, 100, 8192", f"{stamp[2]}, 1, 80, 2048",
        f"{stamp[3]}, 0, 0, 1024", "garbage line",
    ])  # fmt: skip
    rows = mt.parse_smi(text, started_unix=t0)
    assert len(rows) == 7
    window = [rows[2][0], rows[4][0]]  # the two middle seconds
    stats = mt.gpu_stats(rows, 2, window)
    assert stats["busy_pct_per_gpu"] == [95.0, 75.0]
    assert stats["busy_share"] == pytest.approx(0.85)
    assert stats["smi_peak_gib_per_gpu"] == [8.0, 2.0]
    # nvidia-smi in another time zone than Python: shifted back onto our clock
    shifted = mt.parse_smi(text, started_unix=t0 + 3 * 3600)
    assert shifted[0][0] == pytest.approx(rows[0][0] + 3 * 3600)


def test_loss_difference_and_scaling_efficiency():
    base = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}]
    other = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.01}, {"step": 3, "loss": 9.0}]
    assert mt.loss_difference(base, other) == pytest.approx(0.01)
    runs = [{"phase": "unet", "n": 1, "samples_per_s": 10.0},
            {"phase": "unet", "n": 4, "samples_per_s": 32.0},
            {"phase": "syncnet", "n": 2, "samples_per_s": 5.0}]  # fmt: skip
    mt.add_efficiency(runs)
    assert runs[1]["speedup"] == pytest.approx(3.2) and runs[1]["efficiency"] == pytest.approx(0.8)
    assert "efficiency" not in runs[2]  # no 1-GPU run to compare with


def test_launch_plan_puts_the_ends_first_and_the_counts_between_last():
    plan = mt.launch_plan(["syncnet", "unet", "fsdp"], [1, 2, 4])
    assert plan == [("syncnet", 1), ("syncnet", 4), ("unet", 1), ("unet", 4), ("fsdp", 1),
                    ("fsdp", 4), ("syncnet", 2), ("unet", 2)]  # fmt: skip
    assert mt.launch_plan(["unet"], [1]) == [("unet", 1)]
