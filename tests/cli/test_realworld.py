"""What a new user meets on a real machine (issue 19): signals, leftovers, native log noise,
errors before heavy imports, the original audio in the output, damaged files, fp16 on the CPU,
and the command line's own output (tiny preset; small clips)."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from lipsync.audio import load_audio
from lipsync.errors import AudioError
from lipsync.media import VideoWriter, mux_encoded, validate_inputs
from lipsync.media.partials import STALE_AFTER_S, host_tag, remove_stale_partials
from tests.support.cli import lipsync_cli
from tests.support.media_factory import make_audio, make_video, speechlike
from tests.support.shared import MEDIA, REPO, face_clip

FAST = ["--preset", "tiny", "--steps", "1"]


def start_run(video, audio, out, *extra) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "lipsync.cli", "run", str(video), str(audio), "-o", str(out),
         "--preset", "tiny", "--quiet", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def wait_for_partial(folder: Path, proc: subprocess.Popen) -> Path:
    """The run's temporary output, once the encoder has made it (denoising has started)."""
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        found = list(folder.glob(".o.*.partial.mp4"))
        if found:
            return found[0]
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"the run never started writing: {proc.communicate()[1][-2000:]}")


@pytest.fixture()
def slow_job(tmp_path, small_demo_frames):
    """A clip whose run takes long enough to be interrupted mid-way (20 steps, 75 frames)."""
    (tmp_path / "in").mkdir()
    video = face_clip(tmp_path / "in" / "v.mp4", small_demo_frames, 3.0)
    audio = make_audio(tmp_path / "in" / "a.wav", seconds=3.0, signal=speechlike(3.0))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    return video, audio, out_dir


@pytest.mark.slow
@pytest.mark.e2e
def test_sigterm_mid_run_removes_the_partial_output(slow_job):
    video, audio, out_dir = slow_job
    proc = start_run(video, audio, out_dir / "o.mp4", "--steps", "20")
    wait_for_partial(out_dir, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-2000:]
    assert "terminated after" in err
    assert list(out_dir.iterdir()) == []


@pytest.mark.slow
@pytest.mark.e2e
def test_sigkill_leftover_is_removed_by_the_next_writer(slow_job):
    video, audio, out_dir = slow_job
    out = out_dir / "o.mp4"
    proc = start_run(video, audio, out, "--steps", "20")
    partial = wait_for_partial(out_dir, proc)
    proc.kill()  # SIGKILL: nothing can clean up
    proc.wait(timeout=60)
    assert partial.exists() and f"-{proc.pid}-" in partial.name
    writer = VideoWriter(out)  # what the next `lipsync run -o o.mp4` opens
    try:
        assert not partial.exists()
        assert [p.name for p in out_dir.iterdir()] == [Path(writer.temp_path).name]
    finally:
        writer.abort()
    assert list(out_dir.iterdir()) == []


def test_stale_partial_rules(tmp_path):
    out = tmp_path / "talk.mp4"
    host = host_tag()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    files = {
        f".talk.{host}-{dead.pid}-abcd1234.partial.mp4": False,  # this host, process gone
        f".talk.{host}-{os.getppid()}-abcd1234.partial.mp4": True,  # this host, running
        f".talk.{'f' * 6 if host != 'f' * 6 else 'e' * 6}-1-abcd1234.partial.mp4": True,  # fresh
        ".talk.old_name.partial.mp4": True,  # the older naming, fresh
        ".talk.x.1-abcd1234.partial.mp4": True,  # another output (talk.x.mp4)'s file
        ".talk.mp4": True,  # not a partial file
    }
    for name in files:
        (tmp_path / name).write_bytes(b"x")
    old = tmp_path / ".talk.zzzzzzzz.partial.mp4"  # older naming, untouched for over an hour
    old.write_bytes(b"x")
    past = time.time() - STALE_AFTER_S - 60
    os.utime(old, (past, past))
    files[old.name] = False
    removed = remove_stale_partials(out)
    assert sorted(p.name for p in removed) == sorted(n for n, keep in files.items() if not keep)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for n, k in files.items() if k)


DETECT = """
import numpy as np
from lipsync.face.detect import MediaPipeDetector
from lipsync.media import read_frames
frames = read_frames({video!r}, stop=2)
with MediaPipeDetector() as det:
    faces = det.detect(frames)
print(sum(f is not None for f in faces))
"""


def test_mediapipe_prints_nothing(tmp_path):
    """MediaPipe's C++ side (absl, TensorFlow Lite) logs 4-5 lines per graph straight to file
    descriptor 2; a subprocess's stderr catches them whatever Python's logging says."""
    proc = subprocess.run(
        [sys.executable, "-c", DETECT.format(video=str(MEDIA / "demo1_video.mp4"))],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "2"  # the faces were found
    assert proc.stderr == ""


def test_no_face_error_is_the_only_line_after_the_bar(tmp_path):
    """Without --quiet: the faces bar, then one error line; no blank line, no MediaPipe lines."""
    video = make_video(tmp_path / "noface.mp4", seconds=1.0, size=(160, 120))
    audio = make_audio(tmp_path / "a.wav", seconds=1.0)
    proc = lipsync_cli("run", video, audio, "-o", tmp_path / "o.mp4", "--preset", "tiny")
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert lines[-1].startswith("error: no face found"), proc.stderr
    assert all(line.strip() for line in lines), proc.stderr  # no blank line
    assert all(line.lstrip().startswith("faces") for line in lines[:-1]), proc.stderr


CHECK_FIRST = """
import json, sys
from lipsync.cli import main
try:
    main({argv!r})
except SystemExit as e:
    code = e.code
print(json.dumps({{"code": code, "heavy": sorted(m for m in ("torch", "diffusers", "mediapipe")
                                                 if m in sys.modules)}}))
"""


def _cli_in_process(argv) -> tuple[dict, str]:
    proc = subprocess.run(
        [sys.executable, "-c", CHECK_FIRST.format(argv=[str(a) for a in argv])],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def damaged_wav(path: Path) -> Path:
    """The demo's WAV with its 44-byte header zeroed: FFmpeg then probes it as raw video."""
    data = (MEDIA / "demo1_audio.wav").read_bytes()
    path.write_bytes(bytes(44) + data[44:])
    return path


def test_run_checks_its_inputs_before_importing_torch(tmp_path):
    video = MEDIA / "demo1_video.mp4"
    cases = [
        (["run", tmp_path / "missing.mp4", MEDIA / "demo1_audio.wav"], "video file not found"),
        (["run", video, damaged_wav(tmp_path / "broken_header.wav")], "not a readable WAV file"),
        (["run", video, MEDIA / "demo1_audio.wav", "--preset", "v9"], "unknown preset"),
    ]
    for argv, text in cases:
        result, err = _cli_in_process([*argv, "-o", tmp_path / "o.mp4"])
        assert result == {"code": 2, "heavy": []}, (argv, err)
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and text in lines[0], err


def test_damaged_wav_header_names_the_audio_file(tmp_path):
    wav = damaged_wav(tmp_path / "broken_header.wav")
    with pytest.raises(AudioError) as info:
        validate_inputs(MEDIA / "demo1_video.mp4", wav, tmp_path / "o.mp4")
    message = str(info.value)
    assert "broken_header.wav is not a readable WAV file" in message
    assert "no audio" in message and "header" in message
    assert "cannot decode" not in message  # not reported as a video decoding failure


def stereo_mp3(path: Path, seconds: float, rate: int = 44100) -> tuple[Path, np.ndarray]:
    """A stereo mp3 whose channels differ (left: speech-like noise, right: a 440 Hz tone)."""
    n = int(seconds * rate)
    left = speechlike(seconds, sample_rate=rate, seed=3)[:n] * 0.8
    right = 0.4 * np.sin(2 * np.pi * 440 * np.arange(n) / rate).astype(np.float32)
    planes = np.stack([left, right]).astype(np.float32)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libmp3lame", rate=rate)
        stream.layout = "stereo"
        for start in range(0, n, 1152):
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(planes[:, start : start + 1152]), format="fltp",
                layout="stereo",
            )  # fmt: skip
            frame.sample_rate, frame.pts, frame.time_base = rate, start, Fraction(1, rate)
            mux_encoded(out, stream, frame)
        mux_encoded(out, stream, None)
    return path, planes


def decode_audio(path: Path) -> tuple[int, int, np.ndarray]:
    """(rate, channels, planar float32 samples) of the first audio stream, as stored."""
    with av.open(str(path)) as c:
        s = c.streams.audio[0]
        rate, channels = s.codec_context.sample_rate, s.codec_context.channels
        blocks = [f.to_ndarray() for f in c.decode(s)]
    data = np.concatenate(blocks, axis=1).astype(np.float32)
    if data.shape[0] != channels:  # packed formats come as (1, n * channels)
        data = data.reshape(-1, channels).T
    return rate, channels, data


def best_correlation(ours: np.ndarray, ref: np.ndarray, max_lag: int = 4096) -> float:
    n = min(len(ours) - max_lag, len(ref))
    return max(np.corrcoef(ours[lag : lag + n], ref[:n])[0, 1] for lag in range(0, max_lag, 8))


@pytest.mark.slow
@pytest.mark.e2e
def test_output_keeps_the_original_audio(tmp_path, small_demo_frames):
    """A 44.1 kHz stereo mp3 comes out as 44.1 kHz stereo, each channel itself, trimmed to the
    video (--no-loop: the clip is shorter than the audio). Also the command's own output:
    the encoding bar counts frames, and the summary is not wrapped when piped."""
    video = face_clip(tmp_path / "v.mp4", small_demo_frames, 0.64)
    audio, planes = stereo_mp3(tmp_path / "speech.mp3", 1.5)
    out = tmp_path / "a-rather-long-output-name-so-the-summary-line-is-wide.mp4"
    proc = lipsync_cli("run", video, audio, "-o", out, *FAST, "--no-loop")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rate, channels, data = decode_audio(out)
    assert (rate, channels) == (44100, 2)
    # 16 frames = 0.64 s; AAC adds its priming and pads the last frame (< 2 x 1024 samples)
    assert 0.64 * 44100 <= data.shape[1] <= 0.64 * 44100 + 2048, data.shape
    assert best_correlation(data[0], planes[0]) > 0.95
    assert best_correlation(data[1], planes[1]) > 0.95
    assert abs(best_correlation(data[0], planes[1])) < 0.3  # not mixed down
    lines = proc.stderr.splitlines()
    (bar,) = [line for line in lines if line.strip().startswith("encoding")]
    assert re.search(r"\b16/16\b", bar), bar
    (summary,) = [line for line in lines if line.startswith("wrote ")]
    assert summary.endswith("frames/s end to end") and len(summary) > 80, lines


@pytest.mark.e2e
def test_the_model_hears_16khz_mono(tmp_path, small_demo_frames, monkeypatch):
    from lipsync import LipSync
    from lipsync.engine import LocalEngine

    heard = []
    original = LocalEngine.lazy_features

    def spy(self, waveform):
        heard.append(np.array(waveform))
        return original(self, waveform)

    monkeypatch.setattr(LocalEngine, "lazy_features", spy)
    video = face_clip(tmp_path / "v.mp4", small_demo_frames, 0.64)
    audio, _ = stereo_mp3(tmp_path / "speech.mp3", 0.64)
    ls = LipSync.from_pretrained("tiny", device="cpu")
    report = ls.run(video, audio, tmp_path / "o.mp4", steps=1)
    (wav,) = heard
    assert wav.ndim == 1 and wav.dtype == np.float32
    np.testing.assert_array_equal(wav, load_audio(audio))  # 16 kHz mono, as the model needs
    assert report.frames == 16


def test_fp16_on_the_cpu_warns(caplog):
    from lipsync.loading import CPU_FP16_WARNING, load_models

    with caplog.at_level(logging.WARNING, logger="lipsync"):
        bundle = load_models("tiny", device="cpu", dtype="fp16")
    assert CPU_FP16_WARNING in bundle.notes  # and so in every RunReport.warnings
    assert [r.getMessage() for r in caplog.records] == [CPU_FP16_WARNING]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lipsync"):
        assert load_models("tiny", device="cpu").notes == []
    assert caplog.records == []


def test_download_version_offers_the_real_versions_only():
    proc = lipsync_cli("download", "--version", "tiny", timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: unknown version 'tiny'; choose 1.6 or 1.5"
    help_text = lipsync_cli("download", "--help", timeout=120).stdout
    assert "1.6 or 1.5" in help_text and "tiny" not in help_text


def test_help_has_no_type_column_on_flags():
    out = lipsync_cli("run", "--help", timeout=120).stdout
    assert "--force" in out and "--json" in out
    assert "<bool>" not in out and "BOOLEAN" not in out


def test_encoder_reports_frames_as_it_finishes(tmp_path):
    frames = np.zeros((30, 48, 64, 3), np.uint8)
    frames[:, :, :, 0] = np.arange(30, dtype=np.uint8)[:, None, None] * 8
    counts = []
    writer = VideoWriter(tmp_path / "o.mp4", preset="ultrafast")
    for i in range(0, 30, 10):
        writer.write(frames[i : i + 10])
    writer.close(on_frames=counts.append)
    assert sum(counts) == 30 and all(n > 0 for n in counts)


CORE_ONLY = """
import importlib.abc, importlib.machinery, json, sys
blocked = set(json.loads(sys.argv[1]))

class Installed(importlib.abc.MetaPathFinder):
    # the path finder, blind to the extras' packages: to importers they are simply not there
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in blocked:
            return None
        return importlib.machinery.PathFinder.find_spec(name, path, target)

    def find_distributions(self, *args, **kwargs):  # package metadata stays visible
        return importlib.machinery.PathFinder.find_distributions(*args, **kwargs)

sys.meta_path = [Installed() if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
from lipsync.cli import main
main(sys.argv[2:])
"""


def extras_only_modules() -> set[str]:
    """Top-level modules of the packages only the extras bring (not needed by the core ones)."""
    import tomllib
    from importlib import metadata

    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

    def closure(names: list[str]) -> set[str]:
        seen, todo = set(), [Requirement(n).name.lower().replace("_", "-") for n in names]
        while todo:
            name = todo.pop()
            if name in seen or name == "lipsync":
                continue
            seen.add(name)
            try:
                requires = metadata.requires(name) or []
            except metadata.PackageNotFoundError:
                continue
            for req in map(Requirement, requires):
                if req.marker is None or req.marker.evaluate({"extra": ""}):
                    todo.append(req.name.lower().replace("_", "-"))
        return seen

    core = closure(project["dependencies"])
    extras = closure([r for reqs in project["optional-dependencies"].values() for r in reqs])
    only = extras - core
    modules = set()
    for module, dists in metadata.packages_distributions().items():
        if {d.lower().replace("_", "-") for d in dists} <= only:
            modules.add(module)
    return modules


@pytest.mark.slow
@pytest.mark.e2e
def test_the_core_install_runs_lipsync_run(tmp_path, small_demo_frames):
    """`pip install .` without extras is enough for `lipsync run` (README: the lighter install):
    a run with every extra-only package unimportable."""
    blocked = extras_only_modules()
    assert {"gradio", "fastapi", "procrastinate", "ray", "onnxruntime", "pytest"} <= blocked
    video = face_clip(tmp_path / "v.mp4", small_demo_frames, 0.64)
    audio = make_audio(tmp_path / "a.wav", seconds=0.64, signal=speechlike(0.64))
    proc = subprocess.run(
        [sys.executable, "-c", CORE_ONLY, json.dumps(sorted(blocked)), "run", str(video),
         str(audio), "-o", str(tmp_path / "o.mp4"), *FAST, "--quiet", "--json"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["frames"] == 16


@pytest.mark.slow
@pytest.mark.e2e
def test_silent_audio_is_one_warning_line(tmp_path, small_demo_frames):
    video = face_clip(tmp_path / "v.mp4", small_demo_frames, 0.64)
    audio = make_audio(tmp_path / "silence.wav", signal=np.zeros(10240, np.float32))
    proc = lipsync_cli("run", video, audio, "-o", tmp_path / "o.mp4", *FAST, "--quiet")
    assert proc.returncode == 0, proc.stderr[-2000:]
    warned = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1 and "silence.wav is silent" in warned[0], proc.stderr
    assert "closed mouth" in warned[0] and "SilentAudioWarning" not in proc.stderr
