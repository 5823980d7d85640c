"""Training from a pack without PyAV, for several GPUs: the decoded-pack cache that processes
share, U-Net windows from a pack (``data.pack`` of ``lipsync train unet``), and a stage-2 run on
them. A tiny processed corpus (64 px toy faces) is packed once per module."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from lipsync.audio import frame_windows, syncnet_mel, syncnet_mel_window
from lipsync.errors import ConfigError, MediaError
from lipsync.face.mask import make_mask
from lipsync.own_checkpoints import seeded_audio_encoder
from lipsync.train.config import load_unet_config
from lipsync.train.metrics import read_jsonl
from lipsync.train.pack import SAMPLES_PER_FRAME, read_pack, write_pack
from lipsync.train.pack_windows import PackUNetWindows
from lipsync.train.unet import train_unet
from tests.support.train_fixtures import make_processed_corpus, unet_config_dict, write_tiny_syncnet


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    corpus = make_processed_corpus(tmp_path_factory.mktemp("corpus"))
    out = tmp_path_factory.mktemp("pack")
    write_pack(corpus, out, max_mb=1.0, log=lambda _: None)
    return out


@pytest.fixture(scope="module")
def encoder():
    return seeded_audio_encoder(0)


def test_pack_cache_decodes_once_and_later_reads_need_no_video(pack, tmp_path):
    plain = read_pack(pack, ("train",))
    copy = shutil.copytree(pack, tmp_path / "pack")
    first = read_pack(copy, ("train",), cache=tmp_path / "cache")
    (npy,) = [p for p in (tmp_path / "cache").rglob("frames-train.npy")]
    assert isinstance(first.frames["train"], np.memmap)
    assert np.array_equal(first.frames["train"], plain.frames["train"])
    assert np.array_equal(first.audio["train"], plain.audio["train"])
    for video in copy.glob("video-*.mp4"):  # a second reader must not decode again
        video.unlink()
    second = read_pack(copy, ("train",), cache=tmp_path / "cache")
    assert np.array_equal(second.frames["train"], plain.frames["train"])
    assert not list(npy.parent.glob(".*.part"))  # atomic writes leave no scraps
    with pytest.raises(MediaError):  # without the cache: the videos are gone
        read_pack(copy, ("train",))


def test_windows_have_the_unet_items_of_the_pack(pack, encoder):
    data = read_pack(pack, ("train",))
    ds = PackUNetWindows(data, "train", num_frames=16, audio=encoder, seed=5)
    assert len(ds) == 4 * 3  # 4 segments of 56 frames: 3 whole 16-frame windows each
    item = ds[7]
    assert item["frames"].shape == item["reference"].shape == (16, 3, 64, 64)
    assert item["audio_windows"].shape == (16, 50, 384)
    assert item["mel"].shape == (1, 80, 52)
    assert item["visemes"].shape == (16, 5) and item["has_labels"]
    torch.testing.assert_close(item["mask"][0], torch.from_numpy(make_mask(64)))
    seg = next(s for s in ds.segments if s.id == item["segment"])
    start = item["start"]
    first = seg.start + start
    pixels = torch.from_numpy(data.frames["train"][first : first + 16]).permute(0, 3, 1, 2)
    torch.testing.assert_close(item["frames"], pixels.float() / 127.5 - 1.0)
    wav = data.audio["train"][seg.start * SAMPLES_PER_FRAME : (seg.start + seg.frames) * 640]
    expected = frame_windows(encoder.features(wav), 25, start=start, stop=start + 16)
    torch.testing.assert_close(item["audio_windows"], expected)
    torch.testing.assert_close(item["mel"][0], syncnet_mel_window(syncnet_mel(wav), start, 16))
    # the reference window is another time of the same segment, not overlapping
    _, s, ref = ds.window(7)
    assert s == start and abs(ref - start) >= 16
    # items are a function of (seed, epoch, index): another instance agrees, another epoch not
    again = PackUNetWindows(data, "train", num_frames=16, audio=None, seed=5)
    assert [again.window(i) for i in range(len(ds))] == [ds.window(i) for i in range(len(ds))]
    again.set_epoch(1)
    assert [again.window(i) for i in range(len(ds))] != [ds.window(i) for i in range(len(ds))]
    # shards are disjoint and cover the split
    halves = [PackUNetWindows(data, "train", 16, None, 5).shard(r, 2) for r in range(2)]
    seen = [h.window(i) for h in halves for i in range(len(h))]
    assert sorted(seen) == sorted(ds.window(i) for i in range(len(ds)))


def test_lipsync_train_unet_trains_stage_2_from_a_pack(pack, tmp_path):
    syncnet = write_tiny_syncnet(tmp_path / "syncnet.safetensors")
    out = tmp_path / "run"
    cfg = unet_config_dict(
        out, stage=2, data={"pack": str(pack), "factory": None, "batch_size": 2},
        syncnet={"path": str(syncnet)}, losses={"recon": 1.0, "sync": 0.1, "pixel_space": True},
        train={"max_steps": 2},
    )  # fmt: skip
    summary = train_unet(load_unet_config(cfg), device="cpu", show_progress=False)
    assert summary["steps"] == 2 and summary["peak_memory_gib"] is None  # CPU: no CUDA peak
    records = [r for r in read_jsonl(out / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["sync"] > 0 and r["unix_s"] > 1.7e9 for r in records)
    assert (out / "unet.safetensors").is_file()


def test_a_pack_and_a_corpus_at_once_is_one_config_error(pack, tmp_path):
    cfg = unet_config_dict(tmp_path / "run", data={"pack": str(pack), "root": str(tmp_path)})
    with pytest.raises(ConfigError, match="data.pack and data.root are both set"):
        load_unet_config(cfg)
