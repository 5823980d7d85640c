"""``lipsync.data.datasets`` on a corpus processed in the test (real face footage of the demo
clip, one clip with a synthetic-corpus sidecar): item contents against the inference code,
determinism, DataLoader workers, shards, the feature cache."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lipsync.audio import AudioEncoder, frame_windows, load_audio, syncnet_mel, syncnet_mel_window
from lipsync.data.datasets import (
    MIN_NEGATIVE_OFFSET,
    FeatureCache,
    ProcessedCorpus,
    SyncNetPairs,
    UNetWindows,
)
from lipsync.data.process import ProcessOptions, process_corpus
from lipsync.face.mask import make_mask
from lipsync.media import read_frames
from lipsync.models.whisper import WhisperDims, WhisperEncoder
from tests.support.data_corpus import build_corpus, sidecar

pytestmark = [pytest.mark.slow]

PHONES = [f"P{k}" for k in range(7)]  # the inventory of the test sidecar's made-up phones


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> ProcessedCorpus:
    raw = build_corpus(tmp_path_factory.mktemp("raw"))
    src = tmp_path_factory.mktemp("in")
    for name in ("a.mp4", "a.json", "b.webm"):
        shutil.copy(raw / "talk" / name, src / name)
    out = tmp_path_factory.mktemp("out")
    opts = ProcessOptions(min_seconds=2.0, max_seconds=4.0, min_face_size=64, progress=False)
    process_corpus(src, out, opts, executor="inline")
    return ProcessedCorpus(out)


@pytest.fixture(scope="module")
def encoder() -> AudioEncoder:
    torch.manual_seed(0)  # Whisper-tiny's shape with random weights: the features' exactness
    return AudioEncoder(WhisperEncoder(WhisperDims()))  # does not depend on the values


def test_corpus_lists_kept_segments(corpus):
    segs = corpus.segments()
    assert [s.frames for s in segs] == [62, 63, 75]
    assert [s.split for s in corpus.segments("val")] == ["val", "val"]  # from the sidecar
    assert all(s.path.is_file() and s.resolution == 256 for s in segs)


def test_unet_window_matches_inference(corpus, encoder, tmp_path):
    cache = FeatureCache(encoder, tmp_path / "cache")
    ds = UNetWindows(corpus, split=None, num_frames=16, audio_features=cache, seed=3,
                     phones=PHONES)  # fmt: skip
    assert len(ds) == 3 + 3 + 4  # whole 16-frame windows per segment
    lazy: dict[str, object] = {}
    for i in range(len(ds)):
        item = ds[i]
        seg = next(s for s in corpus.segments() if s.id == item["segment"])
        start = item["start"]
        assert item["frames"].shape == (16, 3, 256, 256) and item["frames"].dtype == torch.float32
        crops = read_frames(seg.path, start=start, stop=start + 16)
        want = (torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.5
        assert torch.equal(item["frames"], want)
        assert item["frames"].min() >= -1 and item["frames"].max() <= 1
        assert item["reference"].shape == (16, 3, 256, 256)
        assert not torch.equal(item["reference"], item["frames"])
        assert torch.equal(item["mask"], torch.from_numpy(make_mask(256))[None])
        # Whisper windows as the pipeline builds them: lazy 30 s features + frame_windows
        wav = load_audio(seg.path)
        if seg.id not in lazy:
            lazy[seg.id] = encoder.lazy_features(wav)
        want_windows = frame_windows(lazy[seg.id], 25, start=start, stop=start + 16)
        assert item["audio_windows"].shape == (16, 50, 384)
        assert torch.equal(item["audio_windows"], want_windows)
        mel = syncnet_mel_window(syncnet_mel(wav), start, 16)[None]
        assert item["mel"].shape == (1, 80, 52) and torch.equal(item["mel"], mel)
        if seg.labels:
            assert item["has_labels"]
            rows = item["visemes"][:, 0].numpy()
            first = seg.record["video_start"] + start
            np.testing.assert_allclose(rows, (first + np.arange(16)) / 1000, atol=1e-6)
            full = sidecar("syn-a", 125)["phones"]
            t = (seg.record["audio_start"] + start + np.arange(16) + 0.5) / 25  # clip time
            want_ids = [
                next(PHONES.index(p["label"]) for p in full if p["start"] <= x < p["end"])
                for x in t
            ]
            assert item["phones"].tolist() == want_ids
        else:
            assert not item["has_labels"]
            assert (item["phones"] == -1).all() and torch.isnan(item["visemes"]).all()
    assert len(list(cache.dir.glob("*.npy"))) == 3


def test_feature_cache_is_keyed_by_weights_and_reused(corpus, encoder, tmp_path):
    cache = FeatureCache(encoder, tmp_path)
    seg = corpus.segments()[0]
    feats = cache.features(seg)
    assert torch.equal(feats, encoder.features(load_audio(seg.path)))

    def boom(*_):
        raise AssertionError("recomputed")

    again = FeatureCache(encoder, tmp_path)
    again.encoder = type("E", (), {"features": boom})()
    assert torch.equal(again.features(seg), feats)
    torch.manual_seed(1)
    other = FeatureCache(AudioEncoder(WhisperEncoder(WhisperDims())), tmp_path)
    assert other.dir != cache.dir


def _keys(ds) -> list[tuple]:
    return [ds.window(i) for i in range(len(ds))]


def test_windows_are_deterministic_per_seed_and_epoch(corpus):
    a = UNetWindows(corpus, split=None, seed=7, mel=False)
    b = UNetWindows(corpus, split=None, seed=7, mel=False)
    assert _keys(a) == _keys(b)
    c = UNetWindows(corpus, split=None, seed=8, mel=False)
    assert _keys(c) != _keys(a)
    b.set_epoch(1)
    assert _keys(b) != _keys(a)
    a.set_epoch(1)
    assert _keys(a) == _keys(b)
    item_a, item_b = a[2], b[2]  # the items themselves, not only their windows
    assert (item_a["segment"], item_a["start"]) == a.window(2)
    for key in ("frames", "reference", "phones"):
        assert torch.equal(item_a[key], item_b[key])


def test_dataloader_workers_and_shards(corpus):
    ds = SyncNetPairs(corpus, split=None, num_frames=16, seed=5)
    ref = [ds[i] for i in range(len(ds))]
    # forkserver: this test process ran MediaPipe's and PyAV's threads (processing the corpus),
    # and forking a process with live native threads can deadlock the child
    loader = DataLoader(ds, batch_size=4, num_workers=2, shuffle=False,
                        multiprocessing_context="forkserver")  # fmt: skip
    got = [item for batch in loader for item in _unbatch(batch)]
    assert [(g["segment"], g["start"], g["audio_start"]) for g in got] == [
        (r["segment"], r["start"], r["audio_start"]) for r in ref
    ]
    for g, r in zip(got, ref, strict=True):
        assert torch.equal(g["image"], r["image"]) and torch.equal(g["audio"], r["audio"])
    shards = [SyncNetPairs(corpus, split=None, seed=5).shard(k, 3) for k in range(3)]
    keys = [set(_keys(s)) for s in shards]
    assert sum(len(s) for s in shards) == len(ds)
    assert not (keys[0] & keys[1]) and not (keys[1] & keys[2]) and not (keys[0] & keys[2])
    assert set().union(*keys) == {(r["segment"], r["start"]) for r in ref}


def _unbatch(batch: dict) -> list[dict]:
    n = len(batch["segment"])
    return [{k: (v[i].item() if k.endswith("start") else v[i]) for k, v in batch.items()}
            for i in range(n)]  # fmt: skip


def test_syncnet_pairs(corpus):
    ds = SyncNetPairs(corpus, split=None, num_frames=16, seed=0)
    labels = []
    for i in range(len(ds)):
        item = ds[i]
        seg = next(s for s in corpus.segments() if s.id == item["segment"])
        assert item["image"].shape == (48, 128, 256) and item["audio"].shape == (1, 80, 52)
        crops = read_frames(seg.path, start=item["start"], stop=item["start"] + 16)
        lower = (torch.from_numpy(crops[:, 128:]).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
        assert torch.equal(item["image"], lower.reshape(48, 128, 256))  # frame-major RGB
        mel = syncnet_mel_window(syncnet_mel(load_audio(seg.path)), item["audio_start"], 16)
        assert torch.equal(item["audio"], mel[None])
        y = item["y"].item()
        labels.append(y)
        if y == 1.0:
            assert item["audio_start"] == item["start"]
        else:
            assert abs(item["audio_start"] - item["start"]) >= MIN_NEGATIVE_OFFSET
    assert 0 < sum(labels) < len(labels)
