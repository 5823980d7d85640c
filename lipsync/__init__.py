"""lipsync: fast, dependable LatentSync-compatible lip sync.

``from lipsync import LipSync`` — see :mod:`lipsync.api`. Heavy modules load on first use.

Layers, each importing only its own and the ones below (README "Architecture";
``tests/repo/test_import_graph.py`` checks it):

* front doors: :mod:`lipsync.cli`, :mod:`lipsync.app`, :mod:`lipsync.serving`
* the Python API and the tools: :mod:`lipsync.api`, :mod:`lipsync.tools`, and the rooms
  :mod:`lipsync.data`, :mod:`lipsync.train`, :mod:`lipsync.eval`, :mod:`lipsync.export`
* :mod:`lipsync.pipeline` (the run, stage by stage)
* the model side: :mod:`lipsync.engine`, :mod:`lipsync.diffusion`, :mod:`lipsync.loading`,
  :mod:`lipsync.accel`
* beside the model: :mod:`lipsync.media`, :mod:`lipsync.face`, :mod:`lipsync.audio`,
  :mod:`lipsync.checkpoints`
* :mod:`lipsync.models` (``nn.Module`` s and their configs)
* base: :mod:`lipsync.constants`, :mod:`lipsync.config`, :mod:`lipsync.errors`,
  :mod:`lipsync.transfer`, :mod:`lipsync.runtime`, :mod:`lipsync.progress`
"""

__version__ = "0.1.0"

__all__ = ["LipSync", "RunOptions", "RunReport", "__version__"]


def __getattr__(name: str):
    if name == "LipSync":
        from lipsync.api import LipSync

        return LipSync
    if name in ("RunOptions", "RunReport"):
        from lipsync import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'lipsync' has no attribute {name!r}")
