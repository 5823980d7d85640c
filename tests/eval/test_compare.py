"""``lipsync eval compare``: reconstruction metrics on real footage, FID/FVD plumbing, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from lipsync.errors import CheckpointError, CheckpointNotFoundError, MediaError
from lipsync.eval.compare import LIPS, compare_videos, frechet_distance
from lipsync.face.detect import MediaPipeDetector
from lipsync.media import read_frames
from tests.support.media_factory import make_video
from tests.support.shared import MEDIA, REPO

N = 12


@pytest.fixture(scope="module")
def demo_small() -> np.ndarray:
    """The first 12 frames of the demo clip at a quarter size (270 x 480)."""
    frames = torch.from_numpy(read_frames(MEDIA / "demo1_video.mp4", stop=N))
    small = torch.nn.functional.interpolate(
        frames.permute(0, 3, 1, 2).float(), size=(480, 270), mode="area"
    )
    return small.round().byte().permute(0, 2, 3, 1).numpy()


def write(path, frames: np.ndarray):
    h, w = frames.shape[1:3]
    return make_video(path, seconds=len(frames) / 25, size=(w, h), crf=12,
                      draw=lambda i, t: np.ascontiguousarray(frames[i]))  # fmt: skip


def test_identical_videos(tmp_path, demo_small):
    ref = write(tmp_path / "ref.mp4", demo_small)
    res = compare_videos(ref, ref, device="cpu")
    d = res.as_dict()
    assert d["frames"] == N and d["frames_with_landmarks"] == N
    assert d["psnr"] is None  # identical: infinite PSNR, null in JSON
    assert d["ssim"] == pytest.approx(1.0) and d["mouth_ssim"] == pytest.approx(1.0)
    assert d["landmark_error"] == 0.0 and d["mouth_flicker"] == 0.0
    assert d["lip_opening_corr"] == pytest.approx(1.0)
    json.dumps(d)


def test_a_frozen_mouth_is_measured(tmp_path, demo_small):
    """Output = reference with the lower face frozen at frame 0: PSNR finite, mouth metrics
    worse than the whole frame's, lip motion no longer follows, flicker appears."""
    ref = write(tmp_path / "ref.mp4", demo_small)
    with MediaPipeDetector(min_face_size=1) as det:
        lips = det.detect_all(demo_small[:1])[0][0].landmarks[list(LIPS)]
    (x0, y0), (x1, y1) = lips.min(0).astype(int) - 4, lips.max(0).astype(int) + 4
    out_frames = demo_small.copy()
    out_frames[:, y0:y1, x0:x1] = demo_small[0, y0:y1, x0:x1]  # the mouth frozen at frame 0
    out = write(tmp_path / "out.mp4", out_frames)
    res = compare_videos(out, ref, device="cpu")
    assert 25 < res.psnr < 60 and res.mouth_psnr < res.psnr
    assert res.mouth_ssim < res.ssim < 1.0
    assert res.landmark_error > 1.0  # % of the eye distance
    assert res.mouth_flicker > 0.5
    assert res.lip_opening_corr is None or res.lip_opening_corr < 0.9


def test_size_mismatch_and_missing_fid_weights_are_one_line_errors(tmp_path, demo_small):
    ref = write(tmp_path / "ref.mp4", demo_small)
    other = write(tmp_path / "other.mp4", demo_small[:, :240, :240])
    with pytest.raises(MediaError, match="frame sizes differ"):
        compare_videos(other, ref)
    with pytest.raises(CheckpointNotFoundError, match="--fid-weights FILE"):
        compare_videos(ref, ref, want_fid=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "lipsync.cli", "eval", "compare", str(ref), str(ref), "--fvd"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: FVD needs its network's weights: pass --fvd-weights FILE (the TorchScript file "
        "the StyleGAN2-ADA / StyleGAN-V metrics use); they are not downloaded automatically"
    ]


class _FakeInception(torch.nn.Module):
    """Stands in for inception-2015-12-05.pt: uint8 (B, 3, H, W) -> (B, 4) features."""

    def forward(self, x: torch.Tensor, return_features: bool = True) -> torch.Tensor:
        x = x.float() / 255.0
        return torch.stack([x.mean((1, 2, 3)), x[:, 0].mean((1, 2)), x.std((1, 2, 3)),
                            x[:, :, ::2].mean((1, 2, 3))], dim=1)  # fmt: skip


class _FakeI3D(torch.nn.Module):
    """Stands in for i3d_torchscript.pt: uint8 (B, 3, T, H, W) -> (B, 3) features."""

    def forward(
        self, x: torch.Tensor, rescale: bool = True, resize: bool = True,
        return_features: bool = True,
    ) -> torch.Tensor:  # fmt: skip
        x = x.float() / 127.5 - 1
        return torch.stack([x.mean((1, 2, 3, 4)), x.std((1, 2, 3, 4)), x[:, 1].mean((1, 2, 3))], 1)


def test_fid_and_fvd_through_torchscript_networks(tmp_path):
    ref = make_video(tmp_path / "ref.mp4", seconds=1.6, size=(64, 48))  # 40 patterned frames
    frames = read_frames(ref)
    out = write(tmp_path / "out.mp4", np.clip(frames.astype(int) + 20, 0, 255).astype(np.uint8))
    torch.jit.script(_FakeInception()).save(str(tmp_path / "inception.pt"))
    torch.jit.script(_FakeI3D()).save(str(tmp_path / "i3d.pt"))
    res = compare_videos(out, ref, fid_weights=tmp_path / "inception.pt",
                         fvd_weights=tmp_path / "i3d.pt", device="cpu")  # fmt: skip
    assert res.frames == 40 and res.fid > 0 and res.fvd is not None and res.fvd >= 0
    assert "FVD from 2 clips of 16 frames" in res.notes
    assert res.frames_with_landmarks == 0 and res.landmark_error is None  # no face here
    same = compare_videos(ref, ref, fid_weights=tmp_path / "inception.pt", device="cpu")
    assert same.fid == pytest.approx(0.0, abs=1e-9)
    (tmp_path / "junk.pt").write_bytes(b"not a network")
    with pytest.raises(CheckpointError, match="not a TorchScript network"):
        compare_videos(ref, ref, fid_weights=tmp_path / "junk.pt")


def test_frechet_distance_closed_form():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4000, 3)) * [1.0, 2.0, 0.5]
    b = rng.standard_normal((4000, 3)) * [2.0, 1.0, 0.5] + [1.0, 0.0, 0.0]
    # independent Gaussians: |mu_a - mu_b|^2 + sum (sigma_a - sigma_b)^2
    sa, sb = a.std(0, ddof=1), b.std(0, ddof=1)
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + ((sa - sb) ** 2).sum()
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.02)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
