"""Input shape ranges of the exported graphs: the TensorRT optimisation profiles (min, opt, max)
used by ``lipsync export tensorrt``, ONNX Runtime's TensorRT provider and the polygraphy
commands of docs/EXPORT.md.

Static dimensions are read from the graph's inputs; the dynamic ones follow how the pipeline
calls the graphs: one chunk of up to 24 frames (16 by default) at a time, the U-Net batch
``[unconditional, conditional]`` (2 clips) with guidance, 1 without.
"""

from __future__ import annotations

from pathlib import Path

import onnx

Shape = tuple[int, ...]

# graph -> dynamic dimension name -> (min, opt, max), for ``max_clips`` chunks per call
_DYNAMIC: dict[str, dict[str, tuple[str, str, str]]] = {
    "unet": {"batch": ("1", "2", "2*c"), "clips": ("1", "1", "c"), "frames": ("1", "16", "24")},
    "vae_encoder": {"n": ("1", "16", "24")},
    "vae_decoder": {"n": ("1", "16", "24*c")},
    "audio_encoder": {"n": ("1", "1", "1")},
}


def _value(expr: str, clips: int) -> int:
    if expr == "c":
        return clips
    if expr.endswith("*c"):
        return int(expr[:-2]) * clips
    return int(expr)


def graph_inputs(path: str | Path) -> dict[str, list[int | str]]:
    """Each input of the ONNX file and its dimensions (ints, or names for dynamic ones)."""
    model = onnx.load(str(path), load_external_data=False)
    inputs = {}
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        inputs[value.name] = [d.dim_param if d.dim_param else d.dim_value for d in dims]
    return inputs


def shape_profile(
    graph: str, inputs: dict[str, list[int | str]], max_clips: int = 1
) -> dict[str, tuple[Shape, Shape, Shape]]:
    """input name -> (min, opt, max) shape of ``graph`` for calls of up to ``max_clips`` chunks."""
    table = _DYNAMIC[graph]
    profile = {}
    for name, dims in inputs.items():
        shapes = []
        for k in range(3):
            shapes.append(
                tuple(d if isinstance(d, int) else _value(table[d][k], max_clips) for d in dims)
            )
        profile[name] = (shapes[0], shapes[1], shapes[2])
    return profile


def as_polygraphy(profile: dict[str, tuple[Shape, Shape, Shape]], which: int) -> str:
    """``name:[d0,d1,…]`` words for polygraphy's --trt-*-shapes / --input-shapes (0 min, 1 opt,
    2 max)."""
    return " ".join(
        f"{name}:[{','.join(map(str, shapes[which]))}]" for name, shapes in profile.items()
    )


def as_ort_trt(profile: dict[str, tuple[Shape, Shape, Shape]], which: int) -> str:
    """ONNX Runtime TensorRT provider form: ``name:d0xd1x…,name2:…``."""
    return ",".join(
        f"{name}:{'x'.join(map(str, shapes[which]))}" for name, shapes in profile.items()
    )
