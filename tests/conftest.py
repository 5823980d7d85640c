"""Shared test helpers: where the reference fixtures and demo media live.

The fixtures are required, never skipped: a parity test that silently skips is a defect. They are
looked up in ``$LIPSYNC_SHARED`` or in ``shared/`` beside the repository checkout (as in CI).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    env = os.environ.get("LIPSYNC_SHARED")
    candidates = [Path(env)] if env else []
    candidates += [REPO.parent / "shared", REPO / "shared"]
    for path in candidates:
        if (path / "reference").is_dir():
            return path
    raise RuntimeError(
        "reference fixtures not found: set LIPSYNC_SHARED or put shared/ beside the checkout "
        f"(looked in {', '.join(map(str, candidates))})"
    )


SHARED = shared_dir()
REFERENCE = SHARED / "reference"
MEDIA = SHARED / "media"


@pytest.fixture(scope="session")
def reference() -> Path:
    return REFERENCE


@pytest.fixture(scope="session")
def media() -> Path:
    return MEDIA


def demo_source_frames(n: int):
    """The first ``n`` frames of ``demo1_video.mp4`` exactly as PyAV decodes them (RGB uint8,
    no frame-rate resampling): what the reference fixtures were computed from."""
    import av
    import numpy as np

    out = []
    with av.open(str(MEDIA / "demo1_video.mp4")) as container:
        for frame in container.decode(video=0):
            out.append(frame.to_ndarray(format="rgb24"))
            if len(out) == n:
                break
    return np.stack(out)


# The job-service fixtures (real PostgreSQL, moto S3, short face clips): tests/serving_fixtures.py
from serving_fixtures import moto_server_url, postgres_server, serving_media  # noqa: E402, F401
