"""The engine tests' model and chunk: the tiny preset, 4 frames of random faces and audio."""

from __future__ import annotations

import pytest
import torch

from lipsync.face.mask import make_mask
from lipsync.loading import load_models

FRAMES = 4


@pytest.fixture(scope="module")
def bundle():
    return load_models("tiny")


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(7)
    faces = torch.rand(FRAMES, 3, 128, 128, generator=g) * 2 - 1
    audio = torch.randn(FRAMES, 50, 384, generator=g)
    return faces, audio


@pytest.fixture(scope="module")
def mask():
    return torch.from_numpy(make_mask(128))
