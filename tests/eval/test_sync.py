"""Sync scoring: the offset search finds a known shift; one clear error for bad input.

The SyncNet used here is ``tests/fixtures/syncnet_toy.safetensors``: the toy SyncNet trained by
``lipsync train syncnet tests/fixtures/syncnet_toy_train.json --out RUN`` (400 CPU steps on the toy
stand-in data, drawn mouths at 32 px; it knows nothing of real faces). The shift test is written
for any SyncNet: set ``LIPSYNC_TEST_SYNCNET`` (a checkpoint) and ``LIPSYNC_TEST_SYNC_CLIP`` (a
talking-head video whose own audio is in sync) to run it on real footage as well.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lipsync.audio import load_audio
from lipsync.data.toy_sync import SAMPLES_PER_FRAME, toy_clip
from lipsync.errors import MediaError, NoFaceError
from lipsync.eval.sync import SyncScorer, score_video
from tests.support.cli import CliResult, lipsync_main
from tests.support.media_factory import make_audio, make_text_file, make_video, truncate_copy
from tests.support.shared import FIXTURES, MEDIA, REPO

TOY_SYNCNET = FIXTURES / "syncnet_toy.safetensors"


@pytest.fixture(scope="module")
def toy_scorer() -> SyncScorer:
    torch.set_num_threads(2)
    return SyncScorer.from_checkpoint(TOY_SYNCNET, device="cpu")


def delay(wav: np.ndarray, frames: int) -> np.ndarray:
    """The audio heard ``frames`` video frames later (positive: the audio lags the video)."""
    n = frames * SAMPLES_PER_FRAME
    if n >= 0:
        return np.concatenate([np.zeros(n, wav.dtype), wav[: len(wav) - n]])
    return np.concatenate([wav[-n:], np.zeros(-n, wav.dtype)])


def check_finds_shift(scorer: SyncScorer, crops, wav: np.ndarray, shift: int = 3, **kw):
    """Any SyncNet: in-sync audio scores offset 0, audio delayed by ``shift`` frames scores
    ``+shift`` (and ``-shift`` for audio that leads), the in-sync clip with the higher
    confidence."""
    synced = scorer.score(crops, wav, **kw)
    late = scorer.score(crops, delay(wav, shift), **kw)
    early = scorer.score(crops, delay(wav, -shift), **kw)
    assert synced.offset == 0, synced.mean_distances
    assert late.offset == shift, late.mean_distances
    assert early.offset == -shift, early.mean_distances
    return synced, late


@pytest.mark.slow
def test_offset_search_finds_a_3_frame_shift_on_a_toy_clip(toy_scorer):
    clip = toy_clip(seed=20261129, num_frames=125, resolution=32)  # unseen in training
    synced, late = check_finds_shift(toy_scorer, clip.frames, clip.wav)
    assert synced.syncnet.startswith("lipsync toy SyncNet")
    assert synced.confidence > 0 and 0 <= synced.distance <= 2
    assert synced.offsets == list(range(-15, 16)) and len(synced.mean_distances) == 31
    # per-window values: windows whose full ±15 search fits, one per frame (stride 1)
    assert [w.start for w in synced.windows] == list(range(15, 125 - 16 - 15 + 1))
    d = synced.as_dict()
    assert {"offset", "confidence", "distance", "syncnet", "per_window", "note"} <= set(d)
    json.dumps(d)


def test_frames_without_face_are_left_out_and_too_short_clips_refused(toy_scorer):
    clip = toy_clip(seed=7, num_frames=80, resolution=32)
    usable = np.ones(80, bool)
    usable[40] = False
    res = toy_scorer.score(clip.frames, clip.wav, usable=usable)
    assert all(not (w.start <= 40 < w.start + 16) for w in res.windows)
    with pytest.raises(MediaError, match="needs 46 frames"):
        toy_scorer.score(clip.frames[:45], clip.wav[: 45 * SAMPLES_PER_FRAME])
    with pytest.raises(NoFaceError):
        toy_scorer.score(clip.frames, clip.wav, usable=np.zeros(80, bool))


def _aligned_video(path: Path, clip) -> Path:
    """An 'aligned face crop' video of a toy clip (drawn at 64 px): skin above, mouth below."""
    lower = clip.frames  # (T, 32, 64, 3)
    upper = np.broadcast_to(lower[:, :1, :1], lower.shape)  # the skin colour
    full = np.concatenate([upper, lower], axis=1)  # (T, 64, 64, 3)
    return make_video(path, seconds=len(full) / 25, size=(64, 64), audio=clip.wav,
                      draw=lambda i, t: np.ascontiguousarray(full[i]))  # fmt: skip


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}
    return subprocess.run(
        [sys.executable, "-m", "lipsync.cli", "eval", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def one_error_line(proc: subprocess.CompletedProcess | CliResult) -> str:
    """Exit code 2 and one ``error:`` line, the last on stderr, no traceback. (MediaPipe's
    native code may log its own start-up lines to stderr before it.)"""
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    return errors[0]


@pytest.mark.slow
def test_eval_sync_cli_on_an_aligned_video_with_shifted_audio(tmp_path):
    clip = toy_clip(seed=31337, num_frames=100, resolution=64)
    video = _aligned_video(tmp_path / "toy.mp4", clip)
    late = make_audio(tmp_path / "late.wav", signal=delay(clip.wav, 3))
    proc = run_cli("sync", str(video), "--aligned", "--syncnet", str(TOY_SYNCNET), "--json",
                   "--device", "cpu", "--plot", str(tmp_path / "sync.png"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    synced = json.loads(proc.stdout)
    proc = run_cli("sync", str(video), "--aligned", "--audio", str(late), "--syncnet",
                   str(TOY_SYNCNET), "--json", "--device", "cpu")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    shifted = json.loads(proc.stdout)
    assert (synced["offset"], shifted["offset"]) == (0, 3)
    assert synced["syncnet"].startswith("lipsync toy SyncNet")
    assert "not with published LSE-C" in synced["note"]
    assert (tmp_path / "sync.png").stat().st_size > 10_000


def test_shipped_syncnet_finds_a_3_frame_shift_on_a_held_out_clip(tmp_path):
    """The SyncNet shipped in the package (trained on the synthetic corpus, docs/EVAL.md) on a
    clip it never saw: a fresh corpus seed gives new sentences, voice settings and base-footage
    spans; through the real face pipeline it finds the in-sync offset and a 3-frame shift either
    way."""
    from lipsync.eval.faces import track_and_crop
    from lipsync.eval.sync import default_syncnet_path

    env = {**os.environ, "LIPSYNC_PROGRESS": "0"}
    env.pop("LIPSYNC_SYNCNET", None)
    out = tmp_path / "heldout"
    proc = subprocess.run(
        [sys.executable, "-m", "lipsync.cli", "data", "synth", str(out), "--clips", "1",
         "--seed", "90210", "--workers", "1"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    video = out / "clips" / "syn-000000.mp4"
    scorer = SyncScorer.from_checkpoint(default_syncnet_path())
    assert scorer.name.startswith("lipsync SyncNet synth-small")
    faces = track_and_crop(video, scorer.model.config.resolution)
    synced, late = check_finds_shift(scorer, faces.lower, load_audio(video), usable=faces.usable)
    zero = synced.offsets.index(0)  # at offset 0, shifted audio is farther than in-sync audio
    assert late.mean_distances[zero] > synced.mean_distances[zero] + 0.05


def test_corrupt_and_faceless_input_give_one_error_line(tmp_path, capsys):
    def sync(*args):  # `lipsync eval sync` in this process: each ends before any heavy work
        return lipsync_main(capsys, "eval", "sync", *args)

    text = make_text_file(tmp_path / "notes.mp4")
    assert "error:" in one_error_line(sync(text, "--syncnet", TOY_SYNCNET))
    broken = truncate_copy(MEDIA / "demo1_video.mp4", tmp_path / "broken.mp4", keep=0.3)
    one_error_line(sync(broken, "--syncnet", TOY_SYNCNET))
    faceless = make_video(tmp_path / "faceless.mp4", seconds=2.0, size=(96, 96), audio=True)
    assert "no face" in one_error_line(sync(faceless, "--syncnet", TOY_SYNCNET))
    no_audio = make_video(tmp_path / "silent_track.mp4", seconds=2.0, size=(96, 96))
    assert "audio" in one_error_line(sync(no_audio, "--syncnet", TOY_SYNCNET))
    assert "not found" in one_error_line(sync(faceless, "--syncnet", tmp_path / "x.pt"))


@pytest.mark.slow
def test_score_video_tracks_the_real_demo_face(toy_scorer):
    # the face pipeline end to end on real footage (the toy SyncNet's numbers mean nothing
    # here; the crops are real 32 px lower faces, the offset is within the search)
    res = score_video(toy_scorer, MEDIA / "demo1_video.mp4")
    assert res.frames == 250 and res.frames_with_face == 250  # 10 s of video
    # windows start at 15 .. (the last audio window's start - 15)
    mel_frames = len(load_audio(MEDIA / "demo1_video.mp4")) // 200 + 1
    last_audio = max(t for t in range(300) if int(3.2 * t) + 52 <= mel_frames)
    assert [w.start for w in res.windows] == list(range(15, min(last_audio - 15, 250 - 16) + 1))
    assert -15 <= res.offset <= 15
