"""``lipsync data synth``: exact phone timings from eSpeak NG, the phone inventory, the viseme
track, splits, and a real generated corpus (MediaPipe sees the mouth move with the track,
audio aligned, deterministic, resumable)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lipsync.data.synth import corpus as synth_corpus
from lipsync.data.synth.corpus import (
    LANGUAGES,
    SPLITS,
    SynthOptions,
    all_voices,
    clip_labels,
    plan_clip,
    run_synth,
    split_plan,
)
from lipsync.data.synth.faces import FaceSource, discover_sources
from lipsync.data.synth.phones import (
    ESPEAK_TO_PHONE,
    PHONE_TO_VISEME,
    PHONES,
    VISEMES,
    normalise_espeak,
    phone_id,
)
from lipsync.data.synth.text import lexicon, sentence_text
from lipsync.data.synth.tts import (
    ESPEAK_SAMPLE_RATE,
    Espeak,
    VoiceSettings,
    resample,
    synthesize,
)
from lipsync.data.synth.visemes import viseme_track
from lipsync.errors import ConfigError
from tests.support.cli import lipsync_main
from tests.support.shared import MEDIA, REPO

DEMO = MEDIA / "demo1_video.mp4"
PAUSES = {"_", "_:", "_!", "_;_", "_^_", "_#"}


# -- speech ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "voice",
    [VoiceSettings("en-us", "m3", 175, 50), VoiceSettings("en-gb-scotland", "f2", 140, 70)],
    ids=["en-us", "en-gb-scotland"],
)
def test_phone_events_tile_the_audio_and_line_up_with_words_and_pauses(voice):
    text = "The quick brown fox jumps over the lazy dog, and then it sleeps. Did Anna open it?"
    speech = synthesize(text, voice, noise_seed=7)
    n = len(speech.samples)
    phones = speech.phones
    # the phones cover the audio exactly: no gap, no overlap, no empty phone
    assert phones[0].start == 0 and phones[-1].end == n
    assert all(a.end == b.start for a, b in zip(phones, phones[1:], strict=False))
    assert all(p.start < p.end for p in phones)
    # every boundary is a sample where eSpeak itself put a phoneme or word marker
    markers = {s for _, s, _, _ in speech.raw_events} | {0}
    assert {p.start for p in phones} <= markers
    # words: in text order, made of whole phones, not overlapping
    spoken = [w.text for w in speech.words]
    assert spoken[:4] == ["The", "quick", "brown", "fox"] and spoken[-3:] == ["Anna", "open", "it"]
    starts = {p.start for p in phones}
    ends = {p.end for p in phones}
    for w, nxt in zip(speech.words, speech.words[1:], strict=False):
        assert w.start in starts and w.end in ends and w.start < w.end <= nxt.start
    # where eSpeak says pause, the audio is digital silence; speech phones are not. The f2
    # variant adds an echo (140 ms at 10 % amplitude), whose tail runs into the pauses.
    pauses = [p for p in phones if p.label in PAUSES]
    assert len(pauses) >= 2  # the comma and the sentence end
    x = speech.samples.astype(np.float64)
    speech_rms = np.sqrt(np.mean(x[x != 0] ** 2))
    for p in pauses:
        if voice.variant == "f2":
            assert np.sqrt(np.mean(x[p.start : p.end] ** 2)) < 0.1 * speech_rms, p
        else:
            assert np.all(x[p.start : p.end] == 0), p
    vowels = [p for p in phones if normalise_espeak(p.label) in {"AA", "AE", "AH", "IH", "IY"}]
    assert all(np.abs(speech.samples[p.start : p.end]).max() > 1000 for p in vowels)
    # the same call gives the same samples and events, whatever was spoken before
    synthesize("Something else first.", VoiceSettings("en", "f1", 200, 80))
    again = synthesize(text, voice, noise_seed=7)
    assert np.array_equal(again.samples, speech.samples) and again.phones == phones


def test_resampling_to_16k_keeps_times():
    x = np.zeros(2 * ESPEAK_SAMPLE_RATE, np.int16)
    where = [1000, 5000, 22050, 30001, 44000]
    x[where] = 20000
    y = resample(x)
    assert len(y) == 32000
    for s in where:
        expect = s * 16000 / ESPEAK_SAMPLE_RATE
        k = int(round(expect))
        k = k - 3 + int(np.argmax(y[k - 3 : k + 4]))
        a, b, c = y[k - 1], y[k], y[k + 1]
        peak = k + 0.5 * (a - c) / (a - 2 * b + c)  # parabolic interpolation
        assert abs(peak - expect) < 0.2, (s, peak, expect)


# -- phones and visemes ---------------------------------------------------------------------------


def test_phone_inventory_is_consistent():
    assert len(set(PHONES)) == len(PHONES) and phone_id("SIL") == 0
    assert [phone_id(p) for p in PHONES] == list(range(len(PHONES)))
    assert set(ESPEAK_TO_PHONE.values()) <= set(PHONES)
    assert set(PHONE_TO_VISEME) == set(PHONES)  # every phone has exactly one viseme class
    assert sum(len(v.phones) for v in VISEMES) == len(PHONES)
    for v in VISEMES:
        assert all(0 <= x <= 1 for x in v.target) and all(d > 0 for d in v.dominance)


def test_every_phoneme_of_the_shipped_voices_is_in_the_inventory():
    lex = lexicon()
    words = lex.names + lex.nouns + lex.adjectives + [w for v in lex.verbs for w in v]
    words += lex.adverbs + lex.places + lex.times
    chunks = [" ".join(words[i : i + 40]) + "." for i in range(0, len(words), 40)]
    unknown = {}
    with Espeak() as engine:  # one library load for all (no need for a fresh state here)
        spoken = [engine.synth(t, VoiceSettings(lang)) for lang in LANGUAGES for t in chunks]
    for language, speech in zip([x for x in LANGUAGES for _ in chunks], spoken, strict=True):
        for p in speech.phones:
            if p.label not in ESPEAK_TO_PHONE and p.label != ";":
                unknown.setdefault(p.label, language)
    assert unknown == {}


def test_viseme_track_closes_for_bilabials_and_anticipates_rounding():
    # "a-p-a", then a pause, then "w-oo"
    phones = [("SIL", 0.0, 0.2), ("AA", 0.2, 0.4), ("P", 0.4, 0.48), ("AA", 0.48, 0.7)]
    phones += [("SIL", 0.7, 1.2), ("W", 1.2, 1.28), ("UW", 1.28, 1.5), ("SIL", 1.5, 2.0)]
    track = viseme_track(phones, 50)
    assert track.shape == (50, 5) and track.dtype == np.float32
    opening, rounding = track[:, 0], track[:, 2]
    assert opening[6] > 0.55 and opening[15] > 0.55  # mid-vowel frames
    assert opening[10] < 0.1  # the /p/ closure (0.40 - 0.48 s: frames 10, 11)
    assert opening[0] < 0.03 and opening[45] < 0.02  # silence: closed
    assert rounding[28] > 0.2 > rounding[20]  # rounding starts before the /w/ (1.2 s = frame 30)
    assert rounding[32] > 0.8
    # the open gain scales the opening only
    louder = viseme_track(phones, 50, open_gain=0.5)
    assert np.allclose(louder[:, 0], opening * 0.5, atol=1e-6)
    assert np.array_equal(louder[:, 1:], track[:, 1:])


def test_sentences_are_deterministic_and_within_the_word_range():
    a = [sentence_text(np.random.default_rng([3, i]), 10, 14) for i in range(200)]
    b = [sentence_text(np.random.default_rng([3, i]), 10, 14) for i in range(200)]
    assert a == b and len(set(a)) == 200
    assert all(10 <= len(t.split()) <= 14 for t in a)
    assert len({len(t.split()) for t in a}) >= 3
    assert len(sentence_text(np.random.default_rng(0), 1, 2).split()) >= 6  # one sentence


# -- splits ---------------------------------------------------------------------------------------


def _plans(identities: list[str], n: int = 1000, seed: int = 11):
    sources = [
        FaceSource(identity=i, key=i, path=Path(f"/x/{i}.mp4"), kind="video") for i in identities
    ]
    splits = split_plan(seed, identities)
    frames = {s.key: 100 for s in sources}
    return splits, [plan_clip(i, seed, splits, sources, frames) for i in range(n)]


@pytest.mark.parametrize("identities", [["demo1"], ["a", "b"], ["a", "b", "c", "d", "e"]])
def test_held_out_splits_share_no_sentence_no_voice_and_identities_when_possible(identities):
    splits, plans = _plans(identities)
    by = {s: [p for p in plans if p.split == s] for s in SPLITS}
    assert all(by[s] for s in SPLITS)
    assert 0.75 < len(by["train"]) / len(plans) < 0.85
    voice = {s: {f"{p.voice.language}+{p.voice.variant}" for p in by[s]} for s in SPLITS}
    text = {s: {p.sentence for p in by[s]} for s in SPLITS}
    who = {s: {p.identity for p in by[s]} for s in SPLITS}
    for held in ("val", "test"):
        assert not voice[held] & voice["train"]
        assert not text[held] & text["train"]
        if len(identities) > 1:
            assert not who[held] & who["train"]
    assert not voice["val"] & voice["test"] and not text["val"] & text["test"]
    assert splits.identity_split == (len(identities) > 1)
    if len(identities) >= 3:
        assert not who["val"] & who["test"]
    # the plan of a clip does not depend on how many clips are planned
    assert _plans(identities, n=10)[1] == plans[:10]
    # a sentence is spoken by two clips with two different voices
    for p, q in zip(plans[0::2], plans[1::2], strict=True):
        assert p.sentence == q.sentence and p.text == q.text and p.voice != q.voice
    assert sorted(sum(splits.voices.values(), [])) == sorted(all_voices())


def test_sources_from_a_faces_folder(tmp_path):
    (tmp_path / "alice").mkdir()
    for name in ("alice/one.mp4", "alice/two.png", "Bob Smith.jpg", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    sources = discover_sources([DEMO], tmp_path)
    assert [(s.identity, s.kind) for s in sources] == [
        ("demo1", "video"),
        ("bob-smith", "image"),
        ("alice", "video"),
        ("alice", "image"),
    ]
    assert len({s.key for s in sources}) == 4
    with pytest.raises(ConfigError):
        discover_sources([tmp_path / "missing.mp4"], None)


# -- a real corpus --------------------------------------------------------------------------------

CLIPS = 3
OPTIONS = dict(clips=CLIPS, seed=5, resolution=192, min_words=6, max_words=9, max_source_seconds=3)


def _mouth_opening(frames: np.ndarray) -> np.ndarray:
    """MediaPipe's mouth opening per frame: mean inner-lip distance (13-14, 82-87, 312-317)
    over the distance between the outer eye corners; NaN where no face is found."""
    from lipsync.face.detect import MediaPipeDetector

    out = []
    with MediaPipeDetector(max_num_faces=1) as det:
        for face in det.detect(frames):
            if face is None:
                out.append(np.nan)
                continue
            lm = face.landmarks
            lips = [np.linalg.norm(lm[a] - lm[b]) for a, b in ((13, 14), (82, 87), (312, 317))]
            out.append(np.mean(lips) / np.linalg.norm(lm[33] - lm[263]))
    return np.array(out)


def _cli(out: Path, *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "lipsync.cli", "data", "synth", str(out), "--base", str(DEMO)]
    for key, value in OPTIONS.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    return cmd + list(extra)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A 3-clip corpus made by the command line (2 worker processes)."""
    out = tmp_path_factory.mktemp("synth") / "corpus"
    run = subprocess.run(
        _cli(out, "--workers", "2"), cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["generated"] == CLIPS and report["frames_per_s"] > 0
    return out


def _sidecars(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((root / "clips").glob("*.json"))]


@pytest.mark.slow
def test_corpus_files_follow_the_contract(corpus):
    from lipsync.media import probe, read_frames

    sidecars = _sidecars(corpus)
    assert [s["id"] for s in sidecars] == [f"syn-{i:06d}" for i in range(CLIPS)]
    lines = [json.loads(x) for x in (corpus / "corpus.jsonl").read_text().splitlines()]
    assert [line["id"] for line in lines] == [s["id"] for s in sidecars]
    splits = json.loads((corpus / "splits.json").read_text())
    assert splits["identity_split"] is False and splits["train"]["identities"] == ["demo1"]
    for s, line in zip(sidecars, lines, strict=True):
        assert s["schema"] == "lipsync.synth/1" and s["generator"] == "lipsync.data.synth 1"
        assert s["phone_set"] == "lipsync-phones/1" and s["seed"] == 5
        assert line == {
            "id": s["id"],
            "split": s["split"],
            "identity": "demo1",
            "voice": f"{s['voice']['name']}+{s['voice']['variant']}",
            "sentence_id": s["sentence_id"],
            "frames": s["frames"],
        }
        assert s["sentence_id"] in splits[s["split"]]["sentences"]
        assert line["voice"] in splits[s["split"]]["voices"]
        info = probe(corpus / "clips" / f"{s['id']}.mp4")
        assert (info.video_codec, info.audio_codec) == ("h264", "aac")
        assert (info.width, info.height, info.fps) == (192, 192, 25.0)
        assert (info.sample_rate, info.channels) == (16000, 1)
        frames = read_frames(corpus / "clips" / f"{s['id']}.mp4")
        assert len(frames) == s["frames"] == len(s["visemes"]["per_frame"])
        assert s["duration"] == s["frames"] / 25 and s["fps"] == 25 and s["sample_rate"] == 16000
        phones = s["phones"]
        assert phones[0]["start"] == 0 and phones[-1]["end"] == s["duration"]
        assert all(a["end"] == b["start"] for a, b in zip(phones, phones[1:], strict=False))
        for p in phones:
            assert p["label"] in PHONES and p["viseme"] == PHONE_TO_VISEME[p["label"]]
        assert " ".join(w["word"] for w in s["words"]).replace(" ", "") == "".join(
            c for c in s["text"] if c.isalnum() or c == "'"
        )
        assert np.asarray(s["visemes"]["per_frame"]).min() >= 0
        assert s["source"]["augment"]["zoom"] > 0 and s["identity"] == "demo1"
    assert (corpus / "sources" / "demo1" / "landmarks.npy").is_file()


@pytest.mark.slow
def test_mouth_opening_seen_by_mediapipe_follows_the_viseme_track(corpus):
    from lipsync.media import read_frames

    for s in _sidecars(corpus):
        frames = read_frames(corpus / "clips" / f"{s['id']}.mp4")
        seen = _mouth_opening(frames)
        assert not np.isnan(seen).any(), f"{s['id']}: face lost in {np.isnan(seen).sum()} frames"
        track = np.asarray(s["visemes"]["per_frame"])[:, 0]
        r = np.corrcoef(seen, track)[0, 1]
        assert r >= 0.9, f"{s['id']}: Pearson r = {r:.3f}"


@pytest.mark.slow
def test_audio_in_the_mp4_is_aligned_with_the_labels(corpus):
    from lipsync.audio import load_audio

    s = _sidecars(corpus)[0]
    decoded = load_audio(corpus / "clips" / f"{s['id']}.mp4")
    splits = split_plan(5, ["demo1"])
    source = discover_sources([DEMO], None)[0]
    plan = plan_clip(0, 5, splits, [source], {"demo1": s["source"]["frames"]}, 6, 9)
    labels = clip_labels(plan)
    assert labels.phones == s["phones"] and labels.words == s["words"]
    ref = labels.audio
    n = min(len(ref), len(decoded))
    assert abs(len(decoded) - len(ref)) <= 1024
    lags = range(-40, 41)
    corr = [float(np.dot(ref[40 : n - 40], decoded[40 + k : n - 40 + k])) for k in lags]
    assert lags[int(np.argmax(corr))] == 0  # AAC keeps the audio where the labels say
    # digital silence in the sidecar's pauses stays quiet after AAC, speech stays loud
    sr = 16000
    for p in s["phones"]:
        a, b = int(p["start"] * sr) + 320, int(p["end"] * sr) - 320
        if b - a < 800:
            continue
        level = np.sqrt(np.mean(decoded[a:b] ** 2))
        if p["label"] == "SIL":
            assert level < 0.003, p
        elif p["label"] in {"AA", "AE", "AH", "EH", "IY", "OW"}:
            assert level > 0.01, p


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_clips_with_one_worker(corpus, tmp_path):
    from lipsync.media import read_frames

    again = tmp_path / "again"
    # SIGKILL a one-worker run as soon as its first clip is finished
    proc = subprocess.Popen(
        _cli(again, "--workers", "1"),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 600
        while not (again / "clips" / "syn-000000.json").is_file():
            assert proc.poll() is None and time.monotonic() < deadline, "run ended early"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = sorted(p.name for p in (again / "clips").glob("syn-*.json"))
    assert 1 <= len(done) < CLIPS
    summary = run_synth(SynthOptions(out=again, base=(DEMO,), workers=1, **OPTIONS))
    assert (summary.generated, summary.skipped) == (CLIPS - len(done), len(done))
    assert not list((again / "clips").glob(".*"))  # no temporary file left behind
    # same seed: the same sidecars and decoded frames as the 2-worker run
    assert _sidecars(again) == _sidecars(corpus)
    for s in _sidecars(corpus):
        a = read_frames(corpus / "clips" / f"{s['id']}.mp4")
        b = read_frames(again / "clips" / f"{s['id']}.mp4")
        assert np.array_equal(a, b), s["id"]
    # a clip whose sidecar is missing (killed between mp4 and sidecar) is made again
    (again / "clips" / "syn-000001.json").unlink()
    (again / "clips" / "syn-000001.mp4").write_bytes(b"partial")
    meta = again / "sources" / "demo1" / "meta.json"
    stamp = meta.stat().st_mtime_ns
    summary = run_synth(SynthOptions(out=again, base=(DEMO,), workers=1, **OPTIONS))
    assert (summary.generated, summary.skipped) == (1, CLIPS - 1)
    assert meta.stat().st_mtime_ns == stamp  # the footage cache is reused
    assert _sidecars(again) == _sidecars(corpus)
    b = read_frames(again / "clips" / "syn-000001.mp4")
    assert np.array_equal(read_frames(corpus / "clips" / "syn-000001.mp4"), b)
    # the folder belongs to these settings
    with pytest.raises(ConfigError, match="other settings"):
        run_synth(SynthOptions(out=again, base=(DEMO,), workers=1, **{**OPTIONS, "seed": 6}))


def test_cli_errors_are_one_line(tmp_path, capsys):
    run = lipsync_main(capsys, "data", "synth", tmp_path / "x", "--clips", "0")
    assert run.returncode == 2 and "error:" in run.stderr and "--clips" in run.stderr


def test_image_sources_render_with_synthetic_head_motion(tmp_path):
    """A still image as base footage: cached as one frame, moved by the augmentation."""
    import cv2

    from lipsync.data.synth.corpus import render_clip_frames
    from lipsync.data.synth.faces import build_footage, load_footage
    from lipsync.media import read_frames

    frame = read_frames(DEMO, stop=1)[0]
    faces = tmp_path / "faces"
    faces.mkdir()
    cv2.imwrite(str(faces / "still.png"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    (source,) = discover_sources([], faces)
    assert source.kind == "image" and source.identity == "still"
    footage = load_footage(build_footage(source, tmp_path / "sources", 128), source)
    assert footage.num_frames == 1 and footage.static
    splits = split_plan(1, ["still"])
    plan = plan_clip(0, 1, splits, [source], {source.key: 1}, 6, 8)
    assert plan.augment.motion is not None
    track = np.zeros((20, 5), np.float32)
    track[:, 1] = 0.45
    frames = np.stack(list(render_clip_frames(plan, footage, track, 128)))
    assert frames.shape == (20, 128, 128, 3)
    assert np.abs(frames[0].astype(int) - frames[-1].astype(int)).mean() > 1.0  # it moves


def test_synth_modules_import_nothing_above_them():
    text = "\n".join(p.read_text() for p in Path(synth_corpus.__file__).parent.glob("*.py"))
    for above in ("lipsync.pipeline", "lipsync.engine", "lipsync.cli", "lipsync.api"):
        assert f"import {above}" not in text and f"from {above}" not in text
