"""Build TensorRT engines (``.plan``) from an ``lipsync export onnx`` folder.

Strongly typed networks (TensorRT ≥ 10; always on from TensorRT 11): each layer runs in the
type the ONNX graph gives it. Built from an ``--fp16`` export, that is fp16 everywhere except
the normalisations, softmax and timestep embedding, which the graph keeps in fp32 (see
:mod:`lipsync.export.fp16`); built from an fp32 export, the engine is fp32 (TF32 allowed).
Nothing is left to TensorRT's own precision choices, which is how the seed fork's fp16 engine
lost its GroupNorm statistics.

One optimisation profile per engine (:mod:`lipsync.export.profiles`): U-Net batch 1..2·c,
frames 1..24 (16 optimal); VAE batches up to 24 (encoder) and 24·c (decoder); c = chunks per
call (1 in the pipeline).

TensorRT's Python package is not a dependency of lipsync: install it on the GPU machine that
builds (``pip install tensorrt``); engines are tied to that GPU model and TensorRT version.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from lipsync.errors import ConfigError, LipSyncError
from lipsync.export.graphs import GRAPH_NAMES
from lipsync.export.manifest import Manifest, make_readable, write_json_atomic
from lipsync.export.profiles import graph_inputs, shape_profile


class TensorRTError(LipSyncError):
    """TensorRT is missing, or could not parse or build a graph."""


def import_tensorrt():
    """The ``tensorrt`` module, or a :class:`TensorRTError` saying how to get it."""
    try:
        import tensorrt
    except ImportError:
        raise TensorRTError(
            "TensorRT is not installed: on a machine with an NVIDIA GPU run "
            "pip install tensorrt, then lipsync export tensorrt again (docs/EXPORT.md)"
        ) from None
    return tensorrt


def build_engine(
    onnx_path: Path,
    plan_path: Path,
    graph: str,
    max_clips: int = 1,
    workspace_gib: float = 8.0,
) -> dict:
    """Parse ``onnx_path`` (external weights beside it) and write a strongly typed engine to
    ``plan_path`` atomically. Returns what was built (shapes, seconds, sizes)."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    flags = 1 << int(strongly_typed) if strongly_typed is not None else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    profile = builder.create_optimization_profile()
    shapes = shape_profile(graph, graph_inputs(onnx_path), max_clips)
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTError(f"TensorRT failed to build {graph} (see its log above)")
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{plan_path.name}.", dir=plan_path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(memoryview(serialized))
        make_readable(Path(tmp))
        os.replace(tmp, plan_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {
        "file": plan_path.name,
        "tensorrt": trt.__version__,
        "strongly_typed": strongly_typed is not None,
        "profile": {k: [list(s) for s in v] for k, v in shapes.items()},
        "build_seconds": round(time.perf_counter() - start, 1),
        "bytes": plan_path.stat().st_size,
    }


def build_engines(
    onnx_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    graphs: tuple[str, ...] = GRAPH_NAMES,
    max_clips: int = 1,
    workspace_gib: float = 8.0,
    on_graph: Callable[[str, str], None] | None = None,
) -> dict:
    """Build one engine per graph of the export in ``onnx_dir`` into ``out_dir`` (default:
    ``onnx_dir/tensorrt``); writes ``engines.json`` there and returns its content. Graphs whose
    plan already exists (an interrupted build) are skipped."""
    folder = Path(onnx_dir).expanduser()
    manifest = Manifest.read(folder)
    unknown = sorted(set(graphs) - set(GRAPH_NAMES))
    if unknown:
        raise ConfigError(f"unknown graph(s) {', '.join(unknown)}; choose from {GRAPH_NAMES}")
    if max_clips < 1:
        raise ConfigError(f"max_clips must be at least 1, got {max_clips}")
    trt = import_tensorrt()  # fail before anything is written
    target = Path(out_dir).expanduser() if out_dir else folder / "tensorrt"
    report = {
        "preset": manifest.preset,
        "precision": manifest.precision,
        "tensorrt": trt.__version__,
        "engines": {},
    }
    for graph in graphs:
        plan = target / f"{graph}.plan"
        if plan.is_file():
            if on_graph:
                on_graph(graph, "skipped")
            report["engines"][graph] = {"file": plan.name, "bytes": plan.stat().st_size}
            continue
        if on_graph:
            on_graph(graph, "start")
        report["engines"][graph] = build_engine(
            manifest.path(folder, graph), plan, graph, max_clips, workspace_gib
        )
        if on_graph:
            on_graph(graph, "done")
    write_json_atomic(target / "engines.json", report)
    return report
