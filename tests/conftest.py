"""Fixtures shared by every test folder. Paths and helpers live in ``tests/support/``; the
job-service servers are in ``tests/serving/conftest.py``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.support import shared


@pytest.fixture(scope="session")
def reference() -> Path:
    return shared.REFERENCE


@pytest.fixture(scope="session")
def small_demo_frames() -> np.ndarray:
    """The demo's first 3 s as 320x320 face frames: (75, 320, 320, 3) uint8 (read-only, shared by
    the whole session)."""
    frames = shared.small_demo_frames(75)
    frames.flags.writeable = False
    return frames
