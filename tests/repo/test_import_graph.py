"""The package's import graph: layers only point down, no cycles, no private names across modules.

Every ``import`` in ``lipsync/`` counts, at module level or inside a function (and under
``TYPE_CHECKING``): a function-level import hides a cycle from Python, not from this test.
The layers (README, "Architecture"), lowest first:

0. base: ``errors``, ``constants``, ``config``, ``transfer``, ``runtime``, ``progress``
1. ``models/``: pure ``nn.Module`` s and their configs
2. beside the model: ``media/``, ``face/``, ``audio``, ``checkpoints``
3. the model side of a run: ``accel/``, ``diffusion``, ``loading``, ``engine``
4. ``pipeline``
5. the Python API and the tools: ``api``, ``tools/``, ``data/``, ``train/``, ``eval/``,
   ``export/``
6. front doors: ``cli``, ``app``, ``serving/`` (and the package's lazy ``__init__``)

A module may import its own layer and the ones below, never one above.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "lipsync"

LAYERS: list[tuple[int, tuple[str, ...]]] = [
    (0, ("errors", "constants", "config", "configs", "weights", "transfer", "runtime", "progress")),
    (1, ("models",)),
    (2, ("media", "face", "audio", "checkpoints", "own_checkpoints")),
    (3, ("accel", "diffusion", "loading", "engine")),
    (4, ("pipeline",)),
    (5, ("api", "tools", "data", "train", "eval", "export")),
    (6, ("cli", "app", "serving")),
]
LAYER_NAMES = {
    0: "base",
    1: "models",
    2: "media/face/audio",
    3: "engine",
    4: "pipeline",
    5: "api/tools",
    6: "front door",
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> int:
    if module == "lipsync":
        return 6
    top = module.split(".")[1]
    for rank, names in LAYERS:
        if top in names:
            return rank
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS (and the README)")


def resolve(name: str) -> str | None:
    """The lipsync module a dotted import name refers to (a package's ``__init__`` included)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports(path: Path, module: str):
    """(imported module, names imported from it, line) for each lipsync import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "lipsync":
                    yield resolve(alias.name), [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "lipsync":
                continue
            for alias in node.names:
                full = f"{base}.{alias.name}"
                if full in MODULES:  # "from lipsync.serving import db": the submodule
                    yield full, [], node.lineno
                else:
                    yield resolve(base), [alias.name], node.lineno


def graph() -> tuple[dict[str, set[str]], list[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    private: list[str] = []
    for module, path in MODULES.items():
        for target, names, line in imports(path, module):
            if target is None or target == module:
                continue
            edges[module].add(target)
            for name in names:
                if name.startswith("_") and not name.startswith("__"):
                    private.append(f"{module}:{line} imports {name} from {target}")
    return edges, private


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(MODULES):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_function_level_and_type_checking_imports(tmp_path):
    """The parser counts imports wherever they are (the cycle check relies on it)."""
    source = tmp_path / "m.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from lipsync.pipeline import RunOptions\n"
        "def f():\n    from lipsync.face import track\n    import lipsync.audio\n"
    )
    found = {target for target, _, _ in imports(source, "lipsync.x")}
    assert found == {"lipsync.pipeline", "lipsync.face.track", "lipsync.audio"}
    edges = {"lipsync.a": {"lipsync.b"}, "lipsync.b": {"lipsync.a"}}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys.modules[__name__], "MODULES", {"lipsync.a": None, "lipsync.b": None})
        assert cycles(edges) == [["lipsync.a", "lipsync.b"]]


def test_no_import_cycles():
    assert cycles(graph()[0]) == []


def test_every_module_has_a_layer_and_imports_only_downwards():
    edges, _ = graph()
    upward = [
        f"{m} ({LAYER_NAMES[layer(m)]}) imports {t} ({LAYER_NAMES[layer(t)]})"
        for m in sorted(MODULES)
        for t in sorted(edges.get(m, ()))
        if layer(t) > layer(m)
    ]
    assert upward == []


def test_models_import_nothing_above_them():
    edges, _ = graph()
    allowed = ("lipsync.models", "lipsync.errors", "lipsync.constants", "lipsync.config")
    bad = {
        m: sorted(t for t in targets if not t.startswith(allowed))
        for m, targets in edges.items()
        if m.startswith("lipsync.models")
    }
    assert {m: t for m, t in bad.items() if t} == {}


def test_no_private_names_across_modules():
    """``from lipsync.x import _name`` and ``module._name`` on an imported lipsync module, in
    the package and in the benchmarks."""
    _, private = graph()
    for path in [*PACKAGE.rglob("*.py"), *(ROOT / "benchmarks").glob("*.py")]:
        tree = ast.parse(path.read_text(), str(path))
        aliases = set()  # names bound to lipsync modules in this file
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("lipsync"):
                        aliases.add(alias.asname or alias.name.split(".")[0])
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lipsync"):
                for alias in node.names:
                    if alias.name.startswith("_") and path.parent.name == "benchmarks":
                        private.append(f"{path.name}:{node.lineno} imports {alias.name}")
                    if f"{node.module}.{alias.name}" in MODULES:
                        aliases.add(alias.asname or alias.name)
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                private.append(f"{path.name}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert private == []
