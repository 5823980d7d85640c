"""The demo recipe end to end on a CPU, with a tiny corpus, tiny models and budgets of seconds:
pack → (vae, unet1) in one round → unet2 in a second round resumed from the first → a bundle
that loads strictly and denoises. Also the pack's fidelity and the bundle's strict checks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from lipsync.audio import load_audio, syncnet_mel_window
from lipsync.data.pair_sources import open_syncnet_pairs
from lipsync.diffusion import ChunkDenoiser, DenoiseOptions
from lipsync.errors import CheckpointError
from lipsync.face.mask import make_mask
from lipsync.media import read_frames
from lipsync.own_checkpoints import MANIFEST, load_bundle, read_manifest
from lipsync.train.metrics import read_jsonl
from lipsync.train.pack import PackSyncPairs, read_pack, write_pack
from tests.support.shared import REPO
from tests.support.train_fixtures import TINY_UNET, make_processed_corpus, write_tiny_syncnet_16

ENV = {
    **os.environ,
    "PYTHONPATH": str(REPO),
    "OMP_NUM_THREADS": "2",
    "LIPSYNC_PROGRESS": "0",
}
TINY = [
    "vae.batch=4", "vae.block_out_channels=[8,16,16,16]", "vae.norm_num_groups=8",
    "vae.eval_frames=16", "vae.eval_reserve_s=1",
    "unet1.batch=2", "unet1.eval_windows=2", "unet1.sample_windows=2", "unet1.sample_steps=2",
    "unet1.eval_reserve_s=1", "unet1.warmup=2",
    "unet2.batch=1", "unet2.eval_windows=2", "unet2.sample_windows=2", "unet2.sample_steps=2",
    "unet2.eval_reserve_s=1", "unet2.warmup=2",
]  # fmt: skip


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_processed_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def pack(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("pack")
    write_pack(corpus, out, max_mb=1.0, log=lambda _: None)
    return out


def test_pack_keeps_frames_audio_and_labels(corpus, pack):
    meta = json.loads((pack / "pack.json").read_text())
    assert meta["splits"]["train"] == {"frames": 224, "segments": 4, "minutes": 0.15}
    size = sum(p.stat().st_size for p in pack.iterdir())
    assert size <= 1.0 * 2**20
    data = read_pack(pack)
    seg = next(s for s in data.segments if s.id == "seg-001")
    source = read_frames(corpus / "final" / "seg-001.mp4")
    frames = data.frames["train"][seg.start : seg.start + seg.frames]
    assert frames.shape == source.shape
    assert np.abs(frames.astype(int) - source.astype(int)).mean() < 3.0
    # the pack's video decodes the same with OpenCV (the GPU machine) and PyAV (tagged BT.601)
    cap = cv2.VideoCapture(str(pack / "video-train-0.mp4"))
    ok, bgr = cap.read()
    cap.release()
    pyav = read_frames(pack / "video-train-0.mp4", stop=1)[0]
    assert ok and np.array_equal(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), pyav)
    # Opus keeps the samples in place: no lag, small error
    wav = load_audio(corpus / "final" / "seg-001.mp4")[: seg.frames * 640]
    got = data.audio["train"][seg.start * 640 : (seg.start + seg.frames) * 640]
    lags = range(-20, 21)
    best = max(lags, key=lambda lag: float(np.dot(np.roll(got, lag)[500:-500], wav[500:-500])))
    assert best == 0
    assert np.abs(got - wav).mean() < 0.1 * np.abs(wav).mean()
    record = json.loads((corpus / "final" / "seg-001.json").read_text())
    opening = [row[0] for row in record["labels"]["visemes"]["per_frame"]]
    vis = data.visemes["train"][seg.start : seg.start + seg.frames, 0]
    np.testing.assert_allclose(vis, opening, atol=1e-3)
    assert data.phones["train"][seg.start + 3] == meta["phone_inventory"].index("AA")


def recipe(*args: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "lipsync.train.demo_recipe", "train", *args, "--device", "cpu",
         *[x for item in TINY for x in ("--set", item)]],
        env=ENV, check=True, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def round1(pack, tmp_path_factory):
    """Round 1: the VAE and stage 1 in one call."""
    tmp = tmp_path_factory.mktemp("round1")
    syncnet = write_tiny_syncnet_16(tmp / "syncnet.safetensors")
    config = tmp / "unet.json"
    config.write_text(json.dumps(TINY_UNET))
    common = ["--pack", str(pack), "--unet-config", str(config), "--syncnet", str(syncnet)]
    out = tmp / "out"
    first = recipe(*common, "--stage", "vae,unet1", "--max-minutes", "0.1,0.15", "--out", str(out),
                   "--lean")  # fmt: skip
    return out, first, common


@pytest.mark.slow
def test_recipe_trains_in_rounds_into_a_bundle(round1, tmp_path):
    round1, first, common = round1
    round2 = tmp_path / "round2"
    assert set(first["stages"]) == {"vae", "unet1"}
    assert first["stages"]["vae"]["steps"] > 0 and first["stages"]["unet1"]["steps"] > 0
    files = sorted(p.name for p in round1.iterdir())
    assert len(files) <= 8 and all((round1 / f).stat().st_size <= 15 * 2**20 for f in files)
    # --lean: the bundle, metrics and summary only
    assert {"manifest.json", "vae.safetensors", "metrics.jsonl", "summary.json"} <= set(files)
    assert "loss.png" not in files and "preview.png" not in files
    unet1_steps = first["stages"]["unet1"]["steps"]
    # round 2: stage 2 from round 1's bundle; the earlier stages' records are carried along
    second = recipe(*common, "--stage", "unet2", "--max-minutes", "0.15",
                    "--resume-from", str(round1), "--out", str(round2))  # fmt: skip
    assert second["stages"]["unet1"]["steps"] == unet1_steps
    assert second["stages"]["unet2"]["steps"] > 0
    assert (round2 / "loss.png").is_file() and (round2 / "preview.png").is_file()
    summary = json.loads((round2 / "summary.json").read_text())
    ev = summary["stages"]["unet2"]["eval"]
    for key in (
        "val_mse",
        "val_sync",
        "sample_psnr_mouth",
        "sync_cos_generated",
        "sync_cos_generated_shuffled_audio",
        "sync_cos_dubbed",
        "sync_cos_ground_truth",
    ):
        assert np.isfinite(ev[key]), key  # fmt: skip
    assert summary["stages"]["vae"]["eval"]["psnr"] > 5
    assert [h["stages"] for h in summary["history"]] == [["vae", "unet1"], ["unet2"]]
    stages = {r["stage"] for r in read_jsonl(round2 / "metrics.jsonl")}
    assert stages == {"vae", "unet1", "unet2"}
    # the bundle: strict load, motion modules present, a real denoising call
    bundle = load_bundle(round2)
    assert bundle.manifest["training"]["last_stage"] == "unet2"
    assert any(".motion_modules." in k for k in bundle.unet.state_dict())
    assert summary["bundle_bytes"] == sum(
        (round2 / f).stat().st_size for f in [*bundle.manifest["sha256"], MANIFEST]
    )
    faces = torch.rand(16, 3, 64, 64) * 2 - 1
    windows = torch.randn(16, 50, 384)
    out = ChunkDenoiser(bundle.unet, bundle.vae, make_mask(64), DenoiseOptions(steps=2))(
        faces, windows, torch.randn(1, 4, 1, 8, 8).expand(1, 4, 16, 8, 8)
    )
    assert out.shape == faces.shape and torch.isfinite(out).all()


@pytest.mark.slow
def test_bundle_refuses_damaged_or_edited_files(round1, tmp_path):
    round1 = Path(shutil.copytree(round1[0], tmp_path / "bundle"))
    assert load_bundle(round1).num_frames == 16
    manifest = read_manifest(round1)
    # a flipped byte in a weights file
    weights = round1 / manifest["unet"]["files"][0]
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_bundle(round1)
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    # another audio seed than the recorded weights' hash
    edited = dict(manifest, audio={**manifest["audio"], "seed": 1})
    (round1 / MANIFEST).write_text(json.dumps(edited))
    with pytest.raises(CheckpointError, match="seeded audio encoder"):
        load_bundle(round1)
    (round1 / MANIFEST).write_text(json.dumps({**manifest, "extra": 1}))
    with pytest.raises(CheckpointError, match="unknown manifest keys extra"):
        load_bundle(round1)


def test_pack_gives_syncnet_pairs_for_lipsync_train_syncnet(pack):
    pairs = open_syncnet_pairs(f"pack:{pack}", "train", num_frames=16, seed=3)
    assert isinstance(pairs, PackSyncPairs) and len(pairs) > 0
    item = pairs[0]
    assert item["image"].shape == (48, 32, 64) and item["audio"].shape == (1, 80, 52)
    assert item["image"].dtype == torch.uint8  # 8-bit through the loader, [-1, 1] on device
    k0, s0 = pairs._items[0]
    half = read_pack(pack, ("train",)).frames["train"][pairs.segments[k0].start + s0]
    assert torch.equal(item["image"][:3], torch.from_numpy(half[32:]).permute(2, 0, 1))
    labels = [float(pairs[i]["y"]) for i in range(len(pairs))]
    assert 0.25 < sum(labels) / len(labels) < 0.75
    # a negative's audio is the same segment's, at least 5 frames away: its mel differs
    neg = next(i for i, y in enumerate(labels) if y == 0)
    k, start = pairs._items[neg]
    same = syncnet_mel_window(pairs._mel(k), start, 16)
    assert not torch.equal(pairs[neg]["audio"][0], same)
    pos = next(i for i, y in enumerate(labels) if y == 1)
    k, start = pairs._items[pos]
    assert torch.equal(pairs[pos]["audio"][0], syncnet_mel_window(pairs._mel(k), start, 16))
    # deterministic per epoch, different across epochs
    again = PackSyncPairs(pack, "train", 16, seed=3)
    assert [float(again[i]["y"]) for i in range(len(again))] == labels
    again.set_epoch(1)
    assert [float(again[i]["y"]) for i in range(len(again))] != labels


def test_gpu_side_modules_need_neither_pyav_nor_mediapipe(pack):
    """The GPU machine has no PyAV and no mediapipe: the recipe, the pack reader and the
    measurement script must import and read packs without them."""
    code = (
        "import sys\n"
        "sys.modules['av'] = None; sys.modules['mediapipe'] = None\n"
        "import torch\n"
        "import lipsync.train.demo_recipe, lipsync.train.unet\n"
        "from lipsync.train.pack import read_pack\n"
        "from lipsync.train.pack_data import PackData\n"
        f"data = PackData(read_pack({str(pack)!r}), 'train', torch.device('cpu'))\n"
        "assert data.frames.shape[0] == 224\n"
        "assert not [m for m in sys.modules if m.startswith('lipsync.media')]\n"
    )
    subprocess.run([sys.executable, "-c", code], env=ENV, check=True, timeout=300)
