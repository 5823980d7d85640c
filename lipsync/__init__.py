"""lipsync: fast, dependable LatentSync-compatible lip sync.

``from lipsync import LipSync`` — see :mod:`lipsync.api`. Heavy modules load on first use.
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
