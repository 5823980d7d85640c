"""Export a preset's models to ONNX: ``unet``, ``vae_encoder``, ``vae_decoder``, ``audio_encoder``
(:mod:`lipsync.export.graphs` says what each computes), plus ``manifest.json``.

    >>> from lipsync.export.onnx_export import ExportOptions, export_onnx
    >>> from lipsync.export.weights import random_models
    >>> manifest = export_onnx(random_models("tiny"), "onnx-tiny", ExportOptions("fp16"))

Exporter: ``torch.onnx.export(dynamo=False)``, the TorchScript tracer. The torch.export-based
exporter (the default since torch 2.9) stops on the U-Net: the number of unconditional clips is
a shape expression (``batch - clips``) and it cannot guard on it ("data-dependent expression"
in the cross-attention); the tracer records it as shape arithmetic, so one graph serves guided
calls, unguided calls and every frame count. It also needs no ``onnxscript``. Opset 17
(``LayerNormalization``; TensorRT 8.6+ and every recent ONNX Runtime read it).

Weights go to one external-data file per graph (``unet.onnx`` + ``unet.onnx.data``): the
v1.6 U-Net is past protobuf's 2 GB limit in fp32. Each graph is written to a temporary name and
renamed once complete and verified; ``.export-state.json`` records finished graphs, so an
interrupted export resumes where it stopped. ``manifest.json`` is written last.

Verification (on by default): each saved graph runs in ONNX Runtime (CPU) next to the PyTorch
module on seeded inputs. fp32 must agree within 1e-4 of the output's largest magnitude, fp16
with cosine similarity >= 0.9999; the figures go into the manifest.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import shape_inference
from torch import nn

from lipsync.errors import ConfigError, LipSyncError, OutputPathError
from lipsync.export.fp16 import to_fp16
from lipsync.export.graphs import (
    GRAPH_NAMES,
    AudioEncoderGraph,
    GraphSpec,
    UNetGraph,
    VaeDecoderGraph,
    VaeEncoderGraph,
)
from lipsync.export.manifest import (
    MANIFEST,
    PRECISIONS,
    Manifest,
    Precision,
    make_readable,
    write_json_atomic,
)
from lipsync.export.weights import ExportModels

OPSET = 17
STATE = ".export-state.json"
FP32_MAX_REL_ERROR = 1e-4
FP16_MIN_COSINE = 0.9999


class ExportError(LipSyncError):
    """An export did not reproduce the PyTorch model within tolerance."""


@dataclass(frozen=True)
class ExportOptions:
    precision: Precision = "fp32"
    opset: int = OPSET
    verify: bool = True
    verify_frames: int = 4  # frames per clip of the U-Net verification call (cost grows with it)
    force: bool = False  # replace an existing export in the folder

    def validate(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"unknown precision {self.precision!r}; choose one of: {', '.join(PRECISIONS)}"
            )
        if not 14 <= self.opset <= 20:
            raise ConfigError(f"opset must be between 14 and 20, got {self.opset}")
        if not 1 <= self.verify_frames <= 24:
            raise ConfigError(f"verify_frames must be 1..24, got {self.verify_frames}")


def file_name(graph: str) -> str:
    return f"{graph}.onnx"


def data_name(graph: str) -> str:
    return f"{graph}.onnx.data"


# --------------------------------------------------------------------------------------------
# the graphs and their example inputs


def graph_module(models: ExportModels, graph: str) -> nn.Module:
    if graph == "unet":
        return UNetGraph(models.unet)
    if graph == "vae_encoder":
        return VaeEncoderGraph(models.vae)
    if graph == "vae_decoder":
        return VaeDecoderGraph(models.vae)
    if graph == "audio_encoder":
        return AudioEncoderGraph(models.whisper)
    raise ConfigError(f"unknown graph {graph!r}; choose one of: {', '.join(GRAPH_NAMES)}")


def example_inputs(
    models: ExportModels, graph: str, frames: int = 3, clips: int = 1, batch: int = 2, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """Seeded inputs of the right shapes (for tracing and verification). U-Net: ``batch`` clips
    of ``frames`` frames, the last ``clips`` with audio."""
    g = torch.Generator().manual_seed(seed)
    r = models.preset.resolution
    h = r // 8
    if graph == "unet":
        sample = torch.randn(batch, models.unet.config.in_channels, frames, h, h, generator=g)
        audio = torch.randn(clips, frames, 50, models.unet.config.cross_attention_dim, generator=g)
        return sample, torch.tensor([501.0]), audio
    if graph == "vae_encoder":
        return (torch.rand(batch, 3, r, r, generator=g) * 2 - 1,)
    if graph == "vae_decoder":
        return (torch.randn(batch, 4, h, h, generator=g),)
    dims = models.whisper.dims
    return (torch.randn(1, dims.n_mels, 2 * dims.n_audio_ctx, generator=g) * 0.5,)


def verification_cases(models: ExportModels, graph: str, frames: int) -> list[tuple]:
    """Inputs to compare on: for the U-Net a guided call (2 clips, 1 with audio), an unguided one
    and another timestep; other graphs one batch."""
    if graph != "unet":
        return [example_inputs(models, graph, seed=1)]
    guided = example_inputs(models, graph, frames, clips=1, batch=2, seed=1)
    unguided = example_inputs(models, graph, frames, clips=1, batch=1, seed=2)
    late = (guided[0], torch.tensor([21.0]), guided[2])
    return [guided, unguided, late]


# --------------------------------------------------------------------------------------------
# comparison


def compare(ours: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """max |ours - reference| / max |reference| and the cosine similarity of the two."""
    a = np.asarray(ours, dtype=np.float64).reshape(-1)
    b = np.asarray(reference, dtype=np.float64).reshape(-1)
    scale = float(np.abs(b).max()) or 1.0
    denom = float(np.linalg.norm(a) * np.linalg.norm(b)) or 1.0
    return {
        "max_rel_error": float(np.abs(a - b).max()) / scale,
        "cosine": float(a @ b) / denom,
    }


def passes(precision: Precision, figures: dict[str, float]) -> bool:
    if precision == "fp32":
        return figures["max_rel_error"] <= FP32_MAX_REL_ERROR
    return figures["cosine"] >= FP16_MIN_COSINE


def cpu_session(path: Path, threads: int | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@torch.no_grad()
def verify_graph(
    models: ExportModels, graph: str, path: Path, precision: Precision, frames: int
) -> dict[str, float]:
    """Run the saved graph in ONNX Runtime and the PyTorch module on the same inputs; the worst
    figures over every output and case."""
    module = graph_module(models, graph).eval()
    spec: GraphSpec = module.spec
    session = cpu_session(path)
    worst = {"max_rel_error": 0.0, "cosine": 1.0}
    for args in verification_cases(models, graph, frames):
        expected = module(*args)
        expected = expected if isinstance(expected, tuple) else (expected,)
        feeds = {name: a.numpy() for name, a in zip(spec.inputs, args, strict=True)}
        got = session.run(list(spec.outputs), feeds)
        for out, ref in zip(got, expected, strict=True):
            fig = compare(out, ref.numpy())
            worst["max_rel_error"] = max(worst["max_rel_error"], fig["max_rel_error"])
            worst["cosine"] = min(worst["cosine"], fig["cosine"])
    return worst


# --------------------------------------------------------------------------------------------
# export


def trace_to_onnx(
    models: ExportModels, graph: str, path: Path, opset: int = OPSET
) -> onnx.ModelProto:
    """Trace ``graph`` to ``path`` (weights possibly spread over several files beside it, as
    the exporter does past 2 GB) and return it loaded, weights included."""
    module = graph_module(models, graph).eval()
    spec: GraphSpec = module.spec
    args = example_inputs(models, graph)
    with warnings.catch_warnings():
        # the tracer warns about every Python-level shape check it folds into a constant, and
        # about itself being the legacy exporter; the verification step checks the result
        warnings.simplefilter("ignore")
        with torch.no_grad():
            torch.onnx.export(
                module,
                args,
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=list(spec.inputs),
                output_names=list(spec.outputs),
                dynamic_axes=spec.dynamic_axes,
                do_constant_folding=True,
            )
    return onnx.load(str(path))


def with_value_types(model: onnx.ModelProto, work: Path) -> onnx.ModelProto:
    """``model`` with inferred value types (the fp16 converter places casts from them); through
    files, so models past 2 GB work too."""
    src, dst = work / "typed_in.onnx", work / "typed_out.onnx"
    onnx.save_model(model, str(src), save_as_external_data=True, location="typed_in.data")
    shape_inference.infer_shapes_path(str(src), str(dst))
    return onnx.load(str(dst))


def save_graph(model: onnx.ModelProto, folder: Path, graph: str) -> Path:
    """Save ``model`` as ``graph.onnx`` + ``graph.onnx.data`` in ``folder``."""
    path = folder / file_name(graph)
    for stale in (path, folder / data_name(graph)):
        stale.unlink(missing_ok=True)
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data_name(graph),
        size_threshold=1024,
    )
    for written in (path, folder / data_name(graph)):
        make_readable(written)
    return path


def export_graph(
    models: ExportModels, graph: str, folder: Path, options: ExportOptions
) -> dict[str, float]:
    """Export one graph into ``folder`` (atomically: built in ``folder/.partial``, renamed when
    verified). Returns the verification figures ({} when verification is off)."""
    work = folder / ".partial" / graph
    shutil.rmtree(work, ignore_errors=True)
    (work / "trace").mkdir(parents=True)
    try:
        model = trace_to_onnx(models, graph, work / "trace" / "model.onnx", options.opset)
        if options.precision == "fp16":
            model = with_value_types(model, work)
            model = to_fp16(model, fp32_inputs=("timestep",) if graph == "unet" else ())
        model.producer_name = "lipsync"
        path = save_graph(model, work, graph)
        del model
        figures = {}
        if options.verify:
            figures = verify_graph(models, graph, path, options.precision, options.verify_frames)
            if not passes(options.precision, figures):
                limit = (
                    f"max relative error {figures['max_rel_error']:.3g} > {FP32_MAX_REL_ERROR}"
                    if options.precision == "fp32"
                    else f"cosine {figures['cosine']:.6f} < {FP16_MIN_COSINE}"
                )
                raise ExportError(
                    f"the exported {graph} does not match PyTorch ({options.precision}: {limit}); "
                    f"nothing was written for it"
                )
        os.replace(work / data_name(graph), folder / data_name(graph))
        os.replace(path, folder / file_name(graph))
        return figures
    finally:
        shutil.rmtree(work, ignore_errors=True)


def state_key(models: ExportModels, options: ExportOptions) -> dict:
    """What must match for an interrupted export to be resumed."""
    return {
        "preset": models.preset.name,
        "weights": models.weights,
        "precision": options.precision,
        "opset": options.opset,
        "torch": torch.__version__,
    }


def _prepare_folder(folder: Path, key: dict, options: ExportOptions) -> dict:
    """The resume state for ``folder`` (finished graphs), after checking that nothing of the
    user's is overwritten unasked."""
    folder.mkdir(parents=True, exist_ok=True)
    state_path = folder / STATE
    ours = [folder / MANIFEST] + [folder / file_name(g) for g in GRAPH_NAMES]
    if options.force:
        for path in ours + [folder / data_name(g) for g in GRAPH_NAMES] + [state_path]:
            path.unlink(missing_ok=True)
        return {"key": key, "done": {}}
    if state_path.is_file():
        state = json.loads(state_path.read_text())
        if state.get("key") == key:
            done = state.get("done", {})
            done = {g: f for g, f in done.items() if (folder / file_name(g)).is_file()}
            return {"key": key, "done": done}
    existing = [p.name for p in ours if p.exists()]
    if existing:
        raise OutputPathError(
            f"{folder} already holds an export ({', '.join(existing)}); use --force to replace it"
        )
    return {"key": key, "done": {}}


def export_onnx(
    models: ExportModels,
    out_dir: str | os.PathLike,
    options: ExportOptions | None = None,
    on_graph: Callable[[str, str], None] | None = None,
) -> Manifest:
    """Export ``models`` into ``out_dir`` (see the module docstring); returns the manifest.

    ``on_graph(graph, event)`` is called with ``"start"`` / ``"done"`` / ``"skipped"`` (already
    exported by an interrupted run with the same settings).
    """
    options = options or ExportOptions()
    options.validate()
    folder = Path(out_dir).expanduser()
    key = state_key(models, options)
    manifest_path = folder / MANIFEST
    if manifest_path.is_file() and not options.force:
        old = Manifest.read(folder)
        raise OutputPathError(
            f"{folder} already holds a complete export ({old.preset}, {old.precision}); "
            "use --force to replace it"
        )
    state = _prepare_folder(folder, key, options)
    for graph in GRAPH_NAMES:
        if graph in state["done"]:
            if on_graph:
                on_graph(graph, "skipped")
            continue
        if on_graph:
            on_graph(graph, "start")
        state["done"][graph] = export_graph(models, graph, folder, options)
        write_json_atomic(folder / STATE, state)
        if on_graph:
            on_graph(graph, "done")
    dims = asdict(models.whisper.dims)
    manifest = Manifest(
        preset=models.preset.name,
        resolution=models.preset.resolution,
        precision=options.precision,
        weights=models.weights,
        opset=options.opset,
        torch_version=torch.__version__,
        scaling_factor=float(models.vae.scaling_factor),
        shift_factor=float(models.vae.shift_factor),
        whisper_dims=dims,
        files={g: file_name(g) for g in GRAPH_NAMES},
        verification={g: f for g, f in state["done"].items() if f},
    )
    manifest.write(folder)
    (folder / STATE).unlink(missing_ok=True)
    shutil.rmtree(folder / ".partial", ignore_errors=True)
    return manifest
