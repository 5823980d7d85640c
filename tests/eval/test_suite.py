"""``lipsync eval suite``: two real face clips through the whole benchmark (tiny random-weight
U-Net, toy SyncNet: the numbers mean nothing, the files and their structure are what is tested),
and resumption: a second run reuses the finished clips."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lipsync.audio import load_audio
from lipsync.errors import MediaError
from lipsync.eval.suite import SuiteOptions, list_clips, run_suite
from lipsync.media import read_frames
from tests.support.media_factory import make_video
from tests.support.shared import FIXTURES, MEDIA

FRAMES = 48  # the sync search needs 46


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Two 48-frame, 256 x 256 clips of the demo video around the face (like processed-corpus
    segments), with their own audio."""
    root = tmp_path_factory.mktemp("clips")
    wav = load_audio(MEDIA / "demo1_audio.wav")
    for name, start in (("a", 0), ("b", 120)):
        frames = read_frames(MEDIA / "demo1_video.mp4", start=start, stop=start + FRAMES)
        face = torch.from_numpy(frames[:, 520:920, 400:800])  # the face and some margin
        small = (
            torch.nn.functional.interpolate(
                face.permute(0, 3, 1, 2).float(), size=(256, 256), mode="area"
            )
            .round()
            .byte()
            .permute(0, 2, 3, 1)
            .numpy()
        )
        audio = wav[start * 640 : (start + FRAMES) * 640]
        make_video(root / f"{name}.mp4", seconds=FRAMES / 25, size=(256, 256), audio=audio,
                   draw=lambda i, t, s=small: np.ascontiguousarray(s[i]))  # fmt: skip
    return root


@pytest.mark.slow
@pytest.mark.e2e
def test_suite_writes_table_report_and_resumes(clips, tmp_path):
    out = tmp_path / "suite"
    options = SuiteOptions(model="tiny", steps=2, device="cpu",
                           syncnet=FIXTURES / "syncnet_toy.safetensors")  # fmt: skip
    torch.set_num_threads(2)
    summary = run_suite(clips, out, options, show_progress=False)
    assert summary["clips"] == 2 and summary["clips_run_now"] == 2
    assert summary["model"] == "tiny (random weights)"
    assert summary["syncnet"].startswith("lipsync toy SyncNet") and summary["clips_per_s"] > 0
    table = json.loads((out / "suite.json").read_text())
    tasks = sorted((r["clip"], r["task"]) for r in table["rows"])
    assert tasks == sorted((c, t) for c in "ab" for t in ("original", "reconstruction", "dubbing"))
    recon = [r for r in table["rows"] if r["task"] == "reconstruction"]
    assert all(r["psnr"] is not None and 0 < r["ssim"] <= 1 for r in recon)
    assert all(-15 <= r["offset"] <= 15 for r in table["rows"])
    md = (out / "suite.md").read_text()
    assert "| clip | task | offset |" in md and "not with published LSE-C" in md
    page = (out / "report.html").read_text()
    assert "suite.png" in page and "strips/a.png" in page and "strips/b.png" in page
    for png in ("suite.png", "strips/a.png", "strips/b.png"):
        assert (out / png).stat().st_size > 10_000
    dub = json.loads((out / "clips" / "a.json").read_text())["tasks"]["dubbing"]
    assert dub["audio_from"] == "b"

    again = run_suite(clips, out, options, show_progress=False)  # finished clips are reused
    assert again["clips_run_now"] == 0 and again["means"] == summary["means"]


def test_suite_input_errors(tmp_path):
    with pytest.raises(MediaError, match="data folder not found"):
        list_clips(tmp_path / "nowhere", "test")
    with pytest.raises(MediaError, match="no clips"):
        list_clips(tmp_path, "test")
    final = tmp_path / "corpus" / "final"
    final.mkdir(parents=True)
    (final / "s1.json").write_text(json.dumps({"split": "train"}))
    make_video(final / "s1.mp4", seconds=0.2)
    with pytest.raises(MediaError, match="no 'test' segments"):
        list_clips(tmp_path / "corpus", "test")
    assert list_clips(tmp_path / "corpus", "train") == [final / "s1.mp4"]
