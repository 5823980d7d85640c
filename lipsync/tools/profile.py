"""``lipsync profile``: where one chunk's time goes, by operator, kernel class and stage.

:func:`profile_model` runs one warm-up chunk, then one chunk under ``torch.profiler`` and writes

- ``trace.json``: the Chrome trace (chrome://tracing or https://ui.perfetto.dev);
- ``summary.json``: the same time grouped by kernel class (:func:`time_by_category`) and by
  pipeline stage (the ``lipsync.*`` ranges), plus the run's settings;

and returns the top-operators table. On a GPU the time is device time: each kernel is counted
once, under the operator that launched it (an inductor-generated Triton kernel is its own
operator, named ``triton_…``). On the CPU it is each operator's self CPU time.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from lipsync.config import LoadOptions
from lipsync.pipeline import RunOptions
from lipsync.tools.bench import sync, synthetic_chunk

# Kernel classes, in the order they are tested: a name matches the first class that claims it.
CATEGORIES = (
    "attention",
    "convolution",
    "matmul",
    "normalisation",
    "fused (inductor)",
    "copy",
    "element-wise & reductions",
    "other",
)
_MATMUL_OPS = {
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::baddbmm",
    "aten::_scaled_mm",
    "aten::matmul",
    "aten::linear",
    "aten::_addmm_activation",
}
_COPY_WORDS = ("copy", "memcpy", "memset", "contiguous", "clone")
_NORM = re.compile(r"norm(?!al)")  # group_norm, layer_norm, … but not normal_ (random draws)


def categorize(op: str, kernel: str = "") -> str:
    """Kernel class of a kernel named ``kernel`` launched by operator ``op`` (one of CATEGORIES).

    Inductor names a fused kernel after the operators it absorbed
    (``triton_poi_fused_add_convolution_3`` is the bias add after a convolution, not the
    convolution), so ``triton_`` kernels are "fused (inductor)" unless they are a matmul or
    convolution template (``triton_tem_…``) or contain a normalisation.
    """
    name = op.lower()
    both = f"{name} {kernel.lower()}"
    if name.startswith("triton_"):
        if name.startswith("triton_tem"):
            return "convolution" if "conv" in name else "matmul"
        return "normalisation" if _NORM.search(name) else "fused (inductor)"
    if any(word in both for word in ("attention", "sdpa", "fmha", "flash_fwd")):
        return "attention"
    if "conv" in name:
        return "convolution"
    if name in _MATMUL_OPS or "gemm" in name:
        return "matmul"
    if _NORM.search(name):
        return "normalisation"
    if any(word in name for word in _COPY_WORDS):
        return "copy"
    if name.startswith("aten::"):
        return "element-wise & reductions"
    return "other"


def _stage_of(event) -> str:
    """The innermost ``lipsync.*`` range around ``event`` ("(outside stages)" if none)."""
    parent = event
    while parent is not None:
        if parent.name.startswith("lipsync."):
            return parent.name
        parent = parent.cpu_parent
    return "(outside stages)"


def _is_runtime_call(name: str) -> bool:
    """CUDA runtime / driver calls (``cudaLaunchKernel``, ``cuLaunchKernelEx``, "Command Buffer
    Full" when the launch queue is full) that a kernel may be linked to instead of its operator."""
    return name.startswith(("cuda", "cu")) or name == "Command Buffer Full"


def _operator_of(event):
    """``event``, or for a runtime call the operator around it."""
    while _is_runtime_call(event.name) and event.cpu_parent is not None:
        event = event.cpu_parent
    return event


def _owned_times(events, device: bool):
    """(stage, category, operator, µs) for the time each operator owns: its own kernels' device
    time (each kernel once, under the operator that launched it), or its self CPU time."""
    for event in events:
        if event.device_type != DeviceType.CPU or event.is_async:
            continue
        stage = _stage_of(event)
        if device:
            op = _operator_of(event).name
            for kernel in event.kernels:
                yield stage, categorize(op, kernel.name), op, kernel.duration
        elif event.self_cpu_time_total > 0 and not event.name.startswith("lipsync."):
            yield stage, categorize(event.name), event.name, event.self_cpu_time_total


def _by_category(rows: list[tuple[str, str, float]]) -> dict[str, dict]:
    per_name: dict[tuple[str, str], float] = defaultdict(float)
    for category, name, us in rows:
        per_name[(category, name)] += us
    total = sum(per_name.values()) or 1.0
    out: dict[str, dict] = {}
    for category in CATEGORIES:
        names = {n: us for (c, n), us in per_name.items() if c == category and us > 0}
        if not names:
            continue
        us = sum(names.values())
        top = sorted(names.items(), key=lambda kv: -kv[1])[:5]
        out[category] = {
            "ms": round(us / 1000, 3),
            "share": round(us / total, 4),
            "top": [(n, round(t / 1000, 3)) for n, t in top],
        }
    return out


def time_by_category(events, device: bool) -> dict[str, dict]:
    """{category: {"ms": total, "share": of the whole, "top": [(operator, ms), … 5 largest]}}.

    ``events``: ``prof.events()`` of a finished ``torch.profiler.profile``; ``device``: count
    device kernel time (a GPU run) rather than self CPU time. ``lipsync.*`` ranges own no time
    themselves (on the CPU their self time is Python between operators, left out).
    """
    return _by_category([(c, n, us) for _, c, n, us in _owned_times(events, device)])


def time_by_stage(events, device: bool) -> dict[str, dict]:
    """{stage: {"ms": total, "by_category": like time_by_category}} for each ``lipsync.*``
    range (summed over its occurrences, e.g. every denoising step)."""
    rows: dict[str, list] = defaultdict(list)
    for stage, category, name, us in _owned_times(events, device):
        rows[stage].append((category, name, us))
    return {
        stage: {
            "ms": round(sum(us for _, _, us in stage_rows) / 1000, 3),
            "by_category": _by_category(stage_rows),
        }
        for stage, stage_rows in sorted(rows.items())
    }


def profile_model(
    out_dir: str, load: LoadOptions, run: RunOptions, rows: int = 25
) -> tuple[str, dict]:
    """Profile one chunk of ``run.chunk_frames`` synthetic frames through the model (VAE
    encode, the U-Net loop in ``run``'s mode, VAE decode), after one warm-up chunk that also
    compiles (``load.compile``).

    Writes ``out_dir/trace.json`` and ``out_dir/summary.json``; returns (top-operators table,
    summary). Host↔device copies appear as ``aten::copy_`` / ``Memcpy`` rows and under "copy".
    """
    run.validate()
    options, frames = run.denoise_options(), run.chunk_frames
    chunk = synthetic_chunk(load, frames, options)
    chunk.compile(load.compile)
    dev, models, dt = chunk.device, chunk.models, chunk.dtype
    chunk.run()  # warm-up (and compilation)
    sync(dev)
    on_device = dev.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
    with profile(activities=activities, record_shapes=False) as prof:
        chunk.run()
        sync(dev)
    os.makedirs(out_dir, exist_ok=True)
    prof.export_chrome_trace(os.path.join(out_dir, "trace.json"))
    events = prof.events()
    summary = {
        "preset": models.preset.name,
        "device": torch.cuda.get_device_name(dev) if on_device else "cpu",
        "torch": torch.__version__,
        "dtype": dt,
        "compile": load.compile,
        "fp8": models.fp8,
        "frames": frames,
        "denoise": options.as_dict(),
        "time_kind": "device kernel time" if on_device else "self CPU time",
        "by_category": time_by_category(events, on_device),
        "by_stage": time_by_stage(events, on_device),
    }
    with open(os.path.join(out_dir, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=1)
    key = "device_time_total" if on_device else "cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60)
    return table, summary


def format_summary(summary: dict) -> str:
    """A summary's time by kernel class, overall and per stage, as aligned text lines."""
    lines = [f"time by kernel class ({summary['time_kind']}):"]
    for category, row in summary["by_category"].items():
        top = ", ".join(name for name, _ in row["top"][:2])
        lines.append(f"  {category:26s} {row['ms']:10.2f} ms  {row['share']:6.1%}  ({top})")
    for stage, stage_row in summary["by_stage"].items():
        lines.append(f"{stage}: {stage_row['ms']:.2f} ms")
        for category, row in stage_row["by_category"].items():
            lines.append(f"  {category:26s} {row['ms']:10.2f} ms  {row['share']:6.1%}")
    return "\n".join(lines)
