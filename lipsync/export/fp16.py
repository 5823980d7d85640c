"""fp16 variants of exported graphs that keep the numerically fragile parts in fp32.

Kept in fp32 (with casts at their borders), everything else in fp16:

* every normalisation: GroupNorm exports as ``InstanceNormalization`` on (b, groups, -1), so
  in the U-Net's ResNets one group spans all frames of a clip (10 channels × 16 frames × 64 × 64
  = 655,360 values at 512 px): fp16 statistics there are a known source of large error;
  ``LayerNormalization`` likewise;
* every ``Softmax`` (attention weights);
* the timestep embedding: every node that computes from the ``timestep`` input alone (the
  sinusoids of t up to 999, the embedding MLP, each ResNet's ``time_emb_proj``). In fp16,
  ``t · freq`` near 999 is only good to ±0.25 rad before the sine.

Inputs and outputs stay fp32 (``keep_io_types``), so callers and the scheduler loop do not
change. The conversion is ONNX Runtime's own (``onnxruntime.transformers.float16``).
"""

from __future__ import annotations

from collections.abc import Iterable

import onnx
from onnxruntime.transformers import float16

FP32_OPS = ("InstanceNormalization", "GroupNormalization", "LayerNormalization", "Softmax")
SHAPE_OPS = ("Shape", "Size")  # their outputs are integers: they carry no values downstream


def name_nodes(graph: onnx.GraphProto) -> None:
    """Give every unnamed node a unique name (the converter blocks nodes by name)."""
    seen = {n.name for n in graph.node if n.name}
    for i, node in enumerate(graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in seen:
                name += "_"
            node.name = name
            seen.add(name)


def nodes_fed_only_by(graph: onnx.GraphProto, roots: Iterable[str]) -> list[str]:
    """Names of the nodes whose values come from the inputs ``roots`` and constants only.

    A value reaches a node through a data edge unless it passed a shape op (``Shape``/``Size``
    return integers, so ``Expand(t, Shape(sample))`` still computes from ``t`` alone). Nodes are
    visited in the graph's (topological) order.
    """
    roots = set(roots)
    others = {i.name for i in graph.input} - roots - {t.name for t in graph.initializer}
    from_roots: set[str] = set(roots)
    from_others: set[str] = set(others)
    found = []
    for node in graph.node:
        if node.op_type in SHAPE_OPS:
            continue
        inputs = [i for i in node.input if i]
        if any(i in from_others for i in inputs):
            from_others.update(node.output)
        elif any(i in from_roots for i in inputs):
            from_roots.update(node.output)
            found.append(node.name)
    return found


def to_fp16(model: onnx.ModelProto, fp32_inputs: Iterable[str] = ()) -> onnx.ModelProto:
    """The fp16 variant of ``model`` (fp32 inputs and outputs; see the module docstring).

    ``fp32_inputs``: inputs whose whole downstream computation stays fp32 until it meets other
    data (the U-Net's ``timestep``). ``model`` must carry inferred value types
    (:func:`onnx.shape_inference.infer_shapes_path` on its file) for the casts to be placed.
    """
    name_nodes(model.graph)
    keep = nodes_fed_only_by(model.graph, fp32_inputs) if fp32_inputs else []
    return float16.convert_float_to_float16(
        model,
        keep_io_types=True,
        disable_shape_infer=True,
        op_block_list=list(float16.DEFAULT_OP_BLOCK_LIST) + list(FP32_OPS),
        node_block_list=keep,
    )
