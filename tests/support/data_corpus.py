"""A tiny raw corpus for the data-processing tests: real face footage cut from the demo clip, a
hand-written synthetic-corpus sidecar, and crafted bad files (see ``BAD``)."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np

from lipsync.audio import load_audio
from lipsync.media import iter_frames
from tests.support.media_factory import (
    make_audio,
    make_text_file,
    make_video,
    speechlike,
    truncate_copy,
)
from tests.support.shared import MEDIA

DEMO = MEDIA / "demo1_video.mp4"
# A 432 x 432 window of the 1080 x 1920 demo around the face (its box is about x 460-730,
# y 600-890 px): the face keeps its full resolution (~200 px), frames stay small.
FACE_BOX = (380, 540, 812, 972)
BACKGROUND_BOX = (0, 1400, 432, 1832)  # a part of the frame without a face
SIZE = 432

# expected (step, reason) of the inputs that step 1 rejects
BAD = {
    "bad/empty.mp4": ("check", "empty_file"),
    "bad/not_media.mp4": ("check", "unreadable"),
    "bad/no_audio.mp4": ("check", "no_audio"),
    "bad/audio_only.mp4": ("check", "no_video"),
    "bad/truncated.mp4": ("check", "truncated"),
    "bad/odd_codec.mkv": ("check", "unsupported_codec"),
    "bad/corrupt.mp4": ("check", "corrupt"),
    "bad/huge_8k.mp4": ("check", "too_large"),
    "bad/three_hours.mp4": ("check", "too_long"),
    "bad/too_short.mp4": ("check", "too_short"),
}


def demo_frames(start: int, stop: int, box: tuple[int, int, int, int]) -> np.ndarray:
    x0, y0, x1, y1 = box
    out = []
    with iter_frames(DEMO, fps=25, batch=16, start=start, stop=stop) as reader:
        for batch in reader:
            out.append(batch.frames[:, y0:y1, x0:x1].copy())
    return np.concatenate(out)


def demo_audio(start: int, stop: int) -> np.ndarray:
    wav = load_audio(DEMO)
    return wav[start * 640 : stop * 640]


def _clip(path: Path, frames: np.ndarray, audio: np.ndarray, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return make_video(
        path, seconds=len(frames) / 25, size=(frames.shape[2], frames.shape[1]), audio=audio,
        draw=lambda i, t: frames[i], **kw,
    )  # fmt: skip


def sidecar(clip_id: str, frames: int, split: str = "val") -> dict:
    """A contract-shaped synth sidecar (CONTRACT-data.md section 1) with made-up labels: one
    word per second, phones of 0.2 s, viseme rows whose first value is the frame number."""
    dur = frames / 25
    words = [
        {"word": f"w{k}", "start": float(k), "end": min(dur, k + 0.8)} for k in range(int(dur))
    ]
    phones = []
    t, k = 0.0, 0
    while t + 0.2 <= dur + 1e-9:
        phones.append({"label": f"P{k % 7}", "start": round(t, 3), "end": round(t + 0.2, 3),
                       "viseme": "open"})  # fmt: skip
        t, k = t + 0.2, k + 1
    rows = [[i / 1000.0, 0.5, 0.0, 0.2, 0.0] for i in range(frames)]
    return {
        "schema": "lipsync.synth/1", "id": clip_id, "split": split, "fps": 25,
        "sample_rate": 16000, "frames": frames, "duration": dur, "identity": "demo1",
        "source": {"path": str(DEMO), "start_frame": 0, "augment": {}},
        "voice": {"name": "en-us", "variant": "m3", "rate": 165, "pitch": 48},
        "sentence_id": "s0001", "text": "made up", "words": words, "phones": phones,
        "phone_set": "lipsync-phones/1",
        "visemes": {"names": ["open", "width", "round", "teeth", "tongue"], "per_frame": rows},
        "seed": 1, "generator": "tests",
    }  # fmt: skip


def build_corpus(root: Path) -> Path:
    """Write the corpus under ``root``; returns ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    face = demo_frames(0, 250, FACE_BOX)
    background = demo_frames(0, 75, BACKGROUND_BOX)
    audio = demo_audio(0, 250)
    # 5 s with a sidecar: two segments of 2.5 s (min 2 s, max 4 s in the tests)
    _clip(root / "talk" / "a.mp4", face[:125], audio[: 125 * 640])
    (root / "talk" / "a.json").write_text(json.dumps(sidecar("syn-a", 125)))
    # VP9 + Opus in WebM (an unusual but valid codec): one 3 s segment
    _clip(root / "talk" / "b.webm", face[125:200], audio[125 * 640 : 200 * 640], codec="vp9")
    # a cut: 2.4 s of face, then 3 s of background (no face) -> two scenes
    cut = np.concatenate([face[190:250], background])
    _clip(root / "cuts.mp4", cut, np.concatenate([audio[190 * 640 :], audio[: 75 * 640]]))
    make_bad_files(root / "bad")
    return root


def make_bad_files(bad: Path) -> None:
    bad.mkdir(parents=True, exist_ok=True)
    (bad / "empty.mp4").write_bytes(b"")
    make_text_file(bad / "not_media.mp4")
    make_video(bad / "no_audio.mp4", seconds=3, size=(64, 64))
    make_audio(bad / "audio_only.m4a", seconds=3).rename(bad / "audio_only.mp4")
    good = make_video(bad / ".good.mp4", seconds=3, size=(128, 128), audio=speechlike(3))
    moov_first = make_video(bad / ".fs.mp4", seconds=3, size=(128, 128), audio=True, faststart=True)
    truncate_copy(moov_first, bad / "truncated.mp4", keep=0.6)
    moov_first.unlink()
    data = bytearray(good.read_bytes())
    noise = np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes()
    data[len(data) // 2 : len(data) // 2 + 3000] = noise
    (bad / "corrupt.mp4").write_bytes(bytes(data))
    good.unlink()
    odd = make_video(bad / "odd_codec.mkv", seconds=3, size=(64, 64), audio=speechlike(3))
    raw = bytearray(odd.read_bytes())
    at = raw.find(b"V_MPEG4/ISO/AVC")  # the Matroska codec id -> one FFmpeg does not know
    raw[at : at + 15] = b"V_XXXXX/ISO/AVC"
    odd.write_bytes(bytes(raw))
    make_video(bad / "huge_8k.mp4", seconds=0.08, size=(7680, 4320), audio=True,
               preset="ultrafast")  # fmt: skip
    # two frames three hours apart: the header says 3 h (nothing is decoded to find out)
    make_video(bad / "three_hours.mp4", pts=[0, 3 * 3600 * 1000], time_base=Fraction(1, 1000),
               size=(64, 64), audio=speechlike(1))  # fmt: skip
    make_video(bad / "too_short.mp4", seconds=1, size=(64, 64), audio=True)
