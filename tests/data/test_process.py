"""``lipsync data process``: the seven steps on real face footage and crafted bad files, the
manifest, resuming after SIGKILL, step 6 driven by a scripted scorer, and a real local Ray
cluster of two worker processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lipsync.audio import iter_audio, load_audio
from lipsync.data.manifest import read_manifest
from lipsync.data.process import ProcessOptions, SyncEstimate, process_corpus
from lipsync.data.process.hyperiqa import HyperIQA
from lipsync.data.process.quality import HeuristicScorer, HyperIQAScorer, QualityInput
from lipsync.data.process.resample import read_wav
from lipsync.data.process.segments import split_scenes
from lipsync.data.process.sync import shift_plan
from lipsync.errors import CheckpointError, ConfigError, LipSyncError
from lipsync.face.align import crops_to_model_input, estimate_transforms, warp_faces
from lipsync.face.detect import MediaPipeDetector
from lipsync.media import probe, read_frames
from tests.support.data_corpus import BAD, build_corpus, sidecar
from tests.support.media_factory import make_video, solid
from tests.support.shared import DEMO_VIDEO, FIXTURES, REPO

TOY_SYNCNET = FIXTURES / "syncnet_toy.safetensors"
OPTS = dict(min_seconds=2.0, max_seconds=4.0, min_face_size=64)
CLI_OPTS = ["--min-seconds", "2", "--max-seconds", "4", "--min-face-size", "64", "-q"]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "lipsync.cli", "data", "process", *args]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return build_corpus(tmp_path_factory.mktemp("raw"))


@pytest.fixture(scope="module")
def processed(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    report = process_corpus(corpus, out, ProcessOptions(**OPTS, workers=2, progress=False))
    return out, report


def _by_source(entries: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for e in entries:
        out.setdefault(e["source"], []).append(e)
    return out


def _tree(root: Path) -> dict[str, bytes]:
    """Every deterministic file under a processing folder (not the run logs), by path."""
    files = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and not rel.startswith("runs/") and rel != ".lock":
            files[rel] = p.read_bytes()
    return files


# --------------------------------------------------------------------------------------------
# the whole run


@pytest.mark.slow
def test_manifest_has_every_input_and_segment_with_reasons(processed):
    out, report = processed
    entries = read_manifest(out / "manifest.jsonl")
    assert entries == report.entries
    by = _by_source(entries)
    assert len(by) == 3 + len(BAD)
    for source, (step, reason) in BAD.items():
        (line,) = by[source]
        assert line["kind"] == "input" and line["status"] == "dropped", line
        assert (line["step"], line["reason"]) == (step, reason), line
        assert line["message"]
    assert by["bad/three_hours.mp4"][0]["stats"]["duration"] > 3 * 3600 - 1

    a_input, *a_segs = by["talk/a.mp4"]
    assert a_input["status"] == "kept" and a_input["kept_segments"] == 2
    assert [s["status"] for s in a_segs] == ["kept", "kept"]
    assert [s["frames"] for s in a_segs] == [62, 63]  # 125 frames in two equal segments
    assert {s["split"] for s in a_segs} == {"val"}  # inherited from the sidecar
    (b_seg,) = by["talk/b.webm"][1:]
    assert b_seg["status"] == "kept" and b_seg["frames"] == 75
    cut_input, face_seg, bg_seg = by["cuts.mp4"]
    assert cut_input["stats"]["scenes"] == 2
    assert face_seg["status"] == "kept" and face_seg["frames"] == 60  # cut on the scene change
    assert (bg_seg["status"], bg_seg["step"], bg_seg["reason"]) == ("dropped", "faces", "no_face")
    for seg in (*a_segs, b_seg, face_seg):
        stats = seg["stats"]
        assert stats["fps"] == 25 and stats["duration"] == seg["frames"] / 25
        assert 150 < stats["face_size"] < 260  # the demo face is about 200 px
        assert stats["sync_confidence"] is None and stats["sync_offset"] is None
        assert 50 <= stats["quality"] <= 100
        assert seg["path"] == f"final/{seg['id']}.mp4" and (out / seg["path"]).is_file()
    sync = json.loads((out / "6_sync" / f"{face_seg['id']}.json").read_text())
    assert sync["status"] == "skipped" and "--syncnet" in sync["message"]

    s = report.summary
    assert (s.inputs, s.inputs_kept, s.segments_kept, s.errors) == (13, 3, 4, 0)
    assert s.dropped[("segment", "faces", "no_face")][0] == 1
    assert s.dropped[("input", "check", "unreadable")][0] == 1
    assert abs(s.hours_kept - (62 + 63 + 75 + 60) / 25 / 3600) < 1e-9
    assert report.worker_pids == 2 and report.cpu_seconds > 0


@pytest.mark.slow
def test_final_segment_is_the_inference_face_crop_with_its_audio(processed):
    out, _ = processed
    rec = json.loads(next((out / "final").glob("a-*-s001.json")).read_text())
    assert rec["frames"] == 63 and rec["resolution"] == 256 and rec["split"] == "val"
    media = out / "final" / rec["media"]
    info = probe(media)
    assert (info.width, info.height, info.fps) == (256, 256, 25.0)
    assert (info.video_codec, info.audio_codec, info.sample_rate) == ("h264", "aac", 16000)
    got = read_frames(media)
    assert got.shape == (63, 256, 256, 3)

    # the inference face stage on the same 25 fps frames
    src = next((out / "2_resample").glob("a-*.mp4"))
    start = rec["video_start"]
    frames = read_frames(src, start=start, stop=start + 63)
    with MediaPipeDetector(min_face_size=64) as detector:
        faces = detector.detect(frames)
    points = np.stack([f.points3 for f in faces]).astype(np.float32)
    mats = estimate_transforms(points, 256, smooth=True)
    unit = crops_to_model_input(warp_faces(frames, mats, 256), 256).numpy()
    want = np.rint((unit * 0.5 + 0.5) * 255).astype(np.uint8).transpose(0, 2, 3, 1)
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    assert diff.mean() < 2.0, diff.mean()  # H.264 crf 15 only
    unsmoothed = estimate_transforms(points, 256, smooth=False)
    other = crops_to_model_input(warp_faces(frames, unsmoothed, 256), 256).numpy()
    other = np.rint((other * 0.5 + 0.5) * 255).astype(np.uint8).transpose(0, 2, 3, 1)
    assert np.abs(got.astype(np.int16) - other.astype(np.int16)).mean() > diff.mean()

    # the audio is the input's 16 kHz track for these frames (AAC-coded, no delay)
    wav = next((out / "2_resample").glob("a-*.wav"))
    want_audio = read_wav(wav, start * 640, (start + 63) * 640)
    got_audio = load_audio(media)[: len(want_audio)]
    assert abs(len(load_audio(media)) - len(want_audio)) <= 1024
    lags = range(-200, 201, 10)
    corr = [np.dot(np.roll(got_audio, k), want_audio) for k in lags]
    assert list(lags)[int(np.argmax(corr))] == 0
    snr = 10 * np.log10(np.sum(want_audio**2) / np.sum((got_audio - want_audio) ** 2))
    assert snr > 15, snr


@pytest.mark.slow
def test_sidecar_labels_are_cut_and_rebased(processed):
    out, _ = processed
    full = sidecar("syn-a", 125)
    for rec_path in sorted((out / "final").glob("a-*.json")):
        rec = json.loads(rec_path.read_text())
        labels, start, n = rec["labels"], rec["video_start"], rec["frames"]
        assert rec["audio_start"] == start and labels["synth_id"] == "syn-a"
        rows = labels["visemes"]["per_frame"]
        assert len(rows) == n and rows[0][0] == pytest.approx(start / 1000)
        t0, dur = start / 25, n / 25
        want = [p for p in full["phones"] if p["end"] > t0 and p["start"] < t0 + dur]
        assert [p["label"] for p in labels["phones"]] == [p["label"] for p in want]
        for got, p in zip(labels["phones"], want, strict=True):
            assert got["start"] == pytest.approx(max(0.0, p["start"] - t0), abs=1e-6)
            assert got["end"] == pytest.approx(min(dur, p["end"] - t0), abs=1e-6)
        assert all(0 <= w["start"] < w["end"] <= dur for w in labels["words"])


@pytest.mark.slow
def test_rerun_does_no_work_and_gives_the_same_files(processed, corpus):
    out, _ = processed
    before = _tree(out)
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "final").iterdir()}
    report = process_corpus(corpus, out, ProcessOptions(**OPTS, progress=False),
                            executor="inline")  # fmt: skip
    assert report.tasks["segment"] == 0  # every segment was decided by its records
    assert "faces" not in report.timings  # step records read back, no work
    assert report.cpu_seconds < 1.0, report.timings
    assert _tree(out) == before
    assert {p: p.stat().st_mtime_ns for p in (out / "final").iterdir()} == mtimes


@pytest.mark.slow
def test_changed_settings_are_refused(processed, corpus):
    out, _ = processed
    with pytest.raises(ConfigError, match="resolution"):
        process_corpus(corpus, out, ProcessOptions(**{**OPTS, "resolution": 512}))


def _wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited early with {proc.returncode}")
        time.sleep(0.05)
    raise AssertionError("timed out")


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_gives_identical_results(processed, corpus, tmp_path):
    ref, _ = processed
    out = tmp_path / "out"
    proc = subprocess.Popen(
        _cli(str(corpus), str(out), "--workers", "2", *CLI_OPTS), env=_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:  # kill the driver and its workers as soon as the first segment has its crops
        _wait_for(lambda: any((out / "5_faces").glob("*.json")), 240, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "manifest.jsonl").exists()  # it really was mid-run
    assert len(list((out / "final").glob("*.json"))) < 4
    # every finished record's data files are complete (a later step may read them)
    for rec_path in (out / "2_resample").glob("*.json"):
        rec = json.loads(rec_path.read_text())
        assert len(read_frames(out / "2_resample" / rec["video"])) == rec["stats"]["frames"]
        assert len(read_wav(out / "2_resample" / rec["wav"])) == rec["stats"]["samples"]
    for rec_path in (out / "5_faces").glob("*.json"):
        rec = json.loads(rec_path.read_text())
        if rec["status"] == "done":
            assert len(read_frames(out / "5_faces" / rec["media"])) == rec["frames"]

    done = subprocess.run(
        _cli(str(corpus), str(out), "--workers", "2", *CLI_OPTS), env=_env(),
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "kept segments" in done.stderr
    assert not [p for p in out.rglob(".*") if p.name != ".lock"]  # no temporary files left
    got, want = _tree(out), _tree(ref)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name] == want[name], name


class ScriptedSync:
    """A SyncNet stand-in whose estimates the test chooses (one per call, in order)."""

    def __init__(self, estimates: list[SyncEstimate]):
        self.estimates = list(estimates)
        self.calls: list[tuple[tuple, int]] = []

    def estimate(self, faces: np.ndarray, audio: np.ndarray) -> SyncEstimate:
        self.calls.append((faces.shape, len(audio)))
        return self.estimates[len(self.calls) - 1]


@pytest.mark.slow
def test_sync_step_shifts_to_offset_zero_and_drops_low_confidence(corpus, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for name in ("a.mp4", "a.json"):
        shutil.copy(corpus / "talk" / name, src / name)
    scorer = ScriptedSync([SyncEstimate(-3, 8.5), SyncEstimate(0, 1.5)])
    out = tmp_path / "out"
    report = process_corpus(src, out, ProcessOptions(**OPTS, progress=False),
                            executor="inline", sync_scorer=scorer)  # fmt: skip
    assert scorer.calls == [((62, 128, 256, 3), 62 * 640), ((63, 128, 256, 3), 63 * 640)]
    first, second = (e for e in report.entries if e["kind"] == "segment")
    # offset -3 (the audio leads): frame i gets the audio of frame i - 3; frames 0-2 have none
    assert first["status"] == "kept" and first["frames"] == 59
    assert (first["stats"]["sync_offset"], first["stats"]["sync_confidence"]) == (-3, 8.5)
    rec = json.loads((out / "final" / f"{first['id']}.json").read_text())
    assert (rec["video_start"], rec["audio_start"], rec["frames"]) == (3, 0, 59)
    assert rec["sync"] == {"status": "done", "offset": -3, "confidence": 8.5}
    faces = read_frames(out / "5_faces" / f"{first['id']}.mp4")
    final = read_frames(out / "final" / rec["media"])
    assert final.shape[0] == 59
    errors = [np.abs(final[:56].astype(int) - faces[k : k + 56]).mean() for k in range(7)]
    assert int(np.argmin(errors)) == 3 and errors[3] < 2.5, errors  # re-encoded once
    wav = read_wav(next((out / "2_resample").glob("*.wav")))
    got = load_audio(out / "final" / rec["media"])[: 59 * 640]
    lags = list(range(-4 * 640, 4 * 640 + 1, 64))
    corr = [np.dot(got, wav[max(0, k) : max(0, k) + len(got)]) if k >= 0 else -1e9 for k in lags]
    assert lags[int(np.argmax(corr))] == 0  # the final audio starts at the input's frame 0
    assert rec["labels"]["phones"][0]["start"] == 0.0  # labels follow the audio
    assert (second["status"], second["step"], second["reason"]) == (
        "dropped", "sync", "low_sync_confidence",
    )  # fmt: skip
    assert "1.50" in second["message"]


def test_shift_plan_keeps_frames_with_audio():
    assert shift_plan(0, 62, 0, 125) == (0, 62)
    assert shift_plan(0, 62, -3, 125) == (3, 62)
    assert shift_plan(100, 25, 5, 125) == (100, 120)
    assert shift_plan(100, 25, 30, 125) == (100, 100)


# --------------------------------------------------------------------------------------------
# pieces


def test_iter_audio_and_wav_are_exactly_load_audio(tmp_path):
    video = DEMO_VIDEO  # 44.1 kHz stereo AAC: resampled and down-mixed
    want = load_audio(video)
    got = np.concatenate(list(iter_audio(video))).astype(np.float32) / np.float32(32768)
    np.testing.assert_array_equal(got, want)


def test_split_scenes_rule():
    pieces = split_scenes("x", [(0, 30), (30, 130), (130, 631)], 620, 2.0, 4.0)
    assert [(p.start, p.stop, p.ok) for p in pieces] == [
        (0, 30, False),  # 1.2 s: too short
        (30, 130, True),  # 4 s: one segment
        # 490 usable frames (the audio ends at 620): ceil(490 / 100) = 5 equal segments
        (130, 228, True), (228, 326, True), (326, 424, True), (424, 522, True), (522, 620, True),
    ]  # fmt: skip
    assert [p.id for p in pieces][:2] == ["x-s000", "x-s001"]
    assert all(50 <= p.frames <= 100 for p in pieces if p.ok)


@pytest.mark.slow
def test_heuristic_quality_separates_good_from_bad_crops(processed):
    import cv2

    out, _ = processed
    crops = read_frames(next((out / "final").glob("a-*-s000.mp4")))[::8]
    with np.load(next((out / "5_faces").glob("a-*-s000.npz"))) as z:
        patches = [z[k] for k in z.files]
    scorer = HeuristicScorer(256)
    good, details = scorer.score(QualityInput(crops, 200.0, patches))
    assert good >= 90, details
    blurred = np.stack([cv2.GaussianBlur(c, (0, 0), 1.2) for c in crops])
    score, details = scorer.score(QualityInput(blurred, 200.0, patches))
    assert score < 50 and details["limiting"] == "sharpness"
    dark = (crops.astype(np.float32) * 0.15).astype(np.uint8)
    score, details = scorer.score(QualityInput(dark, 200.0, patches))
    assert score < 50 and details["limiting"] == "exposure"
    score, details = scorer.score(QualityInput(crops, 60.0, patches))
    assert score < 50 and details["limiting"] == "face_size"
    blocky = [cv2.resize(cv2.resize(p, None, fx=1 / 8, fy=1 / 8, interpolation=cv2.INTER_AREA),
                         (p.shape[1] // 8 * 8, p.shape[0] // 8 * 8),
                         interpolation=cv2.INTER_NEAREST) for p in patches]  # fmt: skip
    score, details = scorer.score(QualityInput(crops, 200.0, blocky))
    assert score < 50 and details["limiting"] == "blockiness"


def test_hyperiqa_weights_load_strictly_and_score(tmp_path):
    torch.manual_seed(0)
    model = HyperIQA()
    weights = tmp_path / "koniq_pretrained.pkl"
    torch.save(model.state_dict(), weights)
    scorer = HyperIQAScorer(weights)
    crops = np.random.default_rng(0).integers(0, 256, (3, 256, 256, 3), dtype=np.uint8)
    score, details = scorer.score(QualityInput(crops, None, []))
    assert np.isfinite(score) and len(details["frames"]) == 3
    # the per-image target network equals a plain loop over the images
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        both = model.eval()(x)
        one = torch.cat([model(x[i : i + 1]) for i in range(2)])
    torch.testing.assert_close(both, one, rtol=1e-4, atol=1e-4)
    bad = tmp_path / "bad.pkl"
    torch.save({"res.conv1.weight": torch.zeros(1)}, bad)
    with pytest.raises(CheckpointError, match="not a hyperIQA"):
        HyperIQAScorer(bad)


def test_unreadable_sync_checkpoint_is_a_clear_error_before_any_work(corpus, tmp_path):
    ckpt = tmp_path / "syncnet.pt"
    ckpt.write_bytes(b"x")
    with pytest.raises(LipSyncError):
        process_corpus(corpus, tmp_path / "out", ProcessOptions(syncnet=str(ckpt)))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_sync_step_with_a_real_syncnet_records_offset_and_confidence(corpus, tmp_path):
    """Step 6 through a real SyncNet (the toy one shipped with the tests): the offset search
    runs on the segment's aligned lower halves; a threshold above any confidence drops it."""
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(corpus / "talk" / "a.mp4", src / "a.mp4")
    options = ProcessOptions(
        **{**OPTS, "max_seconds": 5.0}, syncnet=str(TOY_SYNCNET), sync_threshold=1e9,
        progress=False,
    )  # fmt: skip
    process_corpus(src, tmp_path / "out", options, executor="inline")
    lines = [json.loads(x) for x in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    segments = [x for x in lines if x["kind"] == "segment"]
    assert segments
    for seg in segments:
        assert (seg["status"], seg["step"], seg["reason"]) == (
            "dropped", "sync", "low_sync_confidence"
        )  # fmt: skip
        assert -15 <= seg["stats"]["sync_offset"] <= 15
        assert 0 <= seg["stats"]["sync_confidence"] < 1e9


def test_a_bad_file_never_stops_the_run_even_inline(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "zero.mp4").write_bytes(b"")
    grey = solid((90, 120, 150), (96, 96))
    make_video(src / "plain.mp4", seconds=3, size=(96, 96), audio=True, draw=lambda i, t: grey)
    report = process_corpus(src, tmp_path / "out", ProcessOptions(**OPTS, progress=False),
                            executor="inline")  # fmt: skip
    reasons = {(e["source"], e["kind"]): (e["step"], e["reason"]) for e in report.entries}
    assert reasons[("zero.mp4", "input")] == ("check", "empty_file")
    assert reasons[("plain.mp4", "segment")] == ("faces", "no_face")  # no face at all
    assert report.summary.segments_kept == 0


# --------------------------------------------------------------------------------------------
# Ray


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
@pytest.mark.ray
def test_ray_cluster_of_two_workers_gives_the_pool_result(processed, corpus, tmp_path):
    ref, _ = processed
    port = _free_port()
    # a token of our own (explicit mode): nothing is read from or written to ~/.ray
    env = {**_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": os.urandom(32).hex()}
    # a short temp dir: Ray's unix sockets live there (paths are limited to 107 bytes)
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
         f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
         "--disable-usage-stats", f"--temp-dir={ray_tmp}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    out = tmp_path / "out"
    try:
        _wait_for(lambda: _port_open(port), 120, head)
        done = subprocess.run(
            _cli(str(corpus), str(out), "--ray-address", f"127.0.0.1:{port}", *CLI_OPTS),
            env=env, capture_output=True, text=True, timeout=400,
        )  # fmt: skip
    finally:  # stop the cluster we started: its process group (head, GCS, raylet, workers)
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        time.sleep(2)
        try:
            os.killpg(head.pid, signal.SIGKILL)  # the GCS can outlive the head's SIGTERM
        except ProcessLookupError:
            pass
        head.wait()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    (log,) = (out / "runs").glob("*.json")
    run = json.loads(log.read_text())
    assert run["executor"] == "ray" and run["workers"] == 2
    assert run["worker_processes"] == 2  # the tasks ran in the cluster's two workers
    got, want = _tree(out), _tree(ref)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name] == want[name], name
