"""The benchmark scripts as modules, for the tests of their bookkeeping (``benchmarks/`` is a
folder of scripts, not a package)."""

from __future__ import annotations

import importlib.util
from types import ModuleType

from tests.support.shared import REPO


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` imported as the module ``name`` (its top level runs once)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
