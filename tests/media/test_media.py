"""lipsync.media: probe, decode (25 fps timeline, rotation, VFR), encode (atomic), validation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import warnings
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from lipsync.audio import load_audio
from lipsync.errors import AudioError, MediaError, OutputPathError, VideoError
from lipsync.media import (
    FpsResampler,
    VideoWriter,
    audio_samples_for_frames,
    fps_resample_indices,
    frames_for_audio,
    has_decoder,
    has_encoder,
    iter_frames,
    nvenc_available,
    orientation_from_matrix,
    output_frame_indices,
    pingpong_indices,
    probe,
    read_frames,
    rescale_near,
    scan_timeline,
    select_video_encoder,
    validate_inputs,
    write_video,
)
from lipsync.media.validate import SilentAudioWarning
from tests.support.media_factory import (
    index_pattern,
    make_audio,
    make_text_file,
    make_video,
    quadrants,
    read_indices,
    solid,
    speechlike,
    truncate_copy,
)
from tests.support.shared import MEDIA, REPO

# --------------------------------------------------------------------------------------------
# timeline: pure index functions


def test_rescale_near_rounds_halves_away_from_zero():
    tb = Fraction(1, 30)
    out = Fraction(1, 25)
    # i * 25 / 30 = i * 5 / 6
    assert [rescale_near(i, tb, out) for i in range(7)] == [0, 1, 2, 3, 3, 4, 5]  # 2.5 -> 3
    assert rescale_near(-3, tb, out) == -3  # -2.5 -> -3
    assert rescale_near(1, Fraction(1, 2), 1) == 1  # 0.5 -> 1
    assert rescale_near(1, Fraction(1, 3), 1) == 0


def _ffmpeg_fps_by_hand(ticks: list[int], end_tick: int) -> list[int]:
    """Independent statement of the rule: tick n shows the last frame i with q_i <= n."""
    out = []
    for n in range(ticks[0], end_tick):
        out.append(max(i for i, q in enumerate(ticks) if q <= n))
    return out


def test_fps_30_to_25_hand_computed():
    idx = fps_resample_indices(range(90), Fraction(1, 30), 90, fps=25)
    assert len(idx) == 75  # 3 s
    # q_i = round(i * 5/6): 0 1 2 3 3 4 5 | 6 7 8 8 9 10 ...: frames 3, 9, 15, ... are dropped
    assert idx[:13].tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 10, 11, 12, 13, 14]
    assert 3 not in idx and 9 not in idx and 89 in idx
    ticks = [rescale_near(i, Fraction(1, 30), Fraction(1, 25)) for i in range(90)]
    assert idx.tolist() == _ffmpeg_fps_by_hand(ticks, 75)


def test_fps_24_to_25_duplicates_and_50_to_25_decimates():
    idx = fps_resample_indices(range(72), Fraction(1, 24), 72)
    assert len(idx) == 75
    # frame 12 is at 12.5 ticks -> tick 13, so tick 12 repeats frame 11
    assert idx[:14].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 11, 12]
    assert len(set(idx.tolist())) == 72  # every input frame is shown
    idx50 = fps_resample_indices(range(100), Fraction(1, 50), 100)
    assert idx50.tolist() == list(range(0, 100, 2))  # frames 2k-1 and 2k share tick k: 2k wins
    same = fps_resample_indices(range(40), Fraction(1, 25), 40)
    assert same.tolist() == list(range(40))


def test_fps_variable_frame_rate_hand_computed():
    # ms: 0 10 20 | 100 110 | 200, last frame lasts 40 ms (end 240 ms)
    # ticks (40 ms): 0 0.25 0.5->1 | 2.5->3 2.75->3 | 5, end 6
    idx = fps_resample_indices([0, 10, 20, 100, 110, 200], Fraction(1, 1000), 240)
    assert idx.tolist() == [1, 2, 2, 4, 4, 5]
    # a gap is filled by holding the last frame; the end tick cuts frames at/after it
    idx = fps_resample_indices([0, 40, 400], Fraction(1, 1000), 420)  # end 10.5 -> 11
    assert idx.tolist() == [0] + [1] * 9 + [2]


def test_fps_resampler_first_tick_and_streaming():
    rs: FpsResampler[str] = FpsResampler()
    out = []
    for tick, name in [(5, "a"), (6, "b"), (8, "c")]:
        out += rs.push(tick, name)
    out += rs.finish(10)
    assert rs.first_tick == 5
    assert out == [(0, "a"), (1, "b"), (2, "b"), (3, "c"), (4, "c")]


def _libavfilter_fps(pts: list[int], durations: list[int], tb: Fraction) -> list[int]:
    """Ground truth: run FFmpeg's own ``fps`` filter through PyAV's filter graph."""
    graph = av.filter.Graph()
    src = graph.add_buffer(width=16, height=16, format="gray16le", time_base=tb)
    fps = graph.add("fps", "25")
    sink = graph.add("buffersink")
    src.link_to(fps)
    fps.link_to(sink)
    graph.configure()
    out: list[int] = []

    def pull() -> None:
        while True:
            try:
                frame = sink.pull()
            except (av.error.BlockingIOError, av.error.EOFError):
                return
            out.append(int(frame.to_ndarray()[0, 0]))

    for i, (p, d) in enumerate(zip(pts, durations, strict=True)):
        frame = av.VideoFrame.from_ndarray(np.full((16, 16), i, np.uint16), format="gray16le")
        frame.pts, frame.time_base, frame.duration = p, tb, d
        src.push(frame)
        pull()
    src.push(None)
    pull()
    return out


def test_fps_matches_libavfilter_on_random_vfr():
    rng = np.random.default_rng(1234)
    for trial in range(60):
        den = int(rng.choice([1000, 90000, 12800, 30000, 600, 48]))
        tb = Fraction(1, den)
        n = int(rng.integers(1, 50))
        if trial % 3 == 0:
            d = np.full(n, int(rng.integers(1, max(2, den // 5))))
        else:
            d = rng.integers(1, max(2, den // 5), size=n)
        start = int(rng.integers(0, den))
        pts = (start + np.concatenate([[0], np.cumsum(d[:-1])])).tolist()
        durs = d.tolist()
        ours = fps_resample_indices(pts, tb, pts[-1] + durs[-1]).tolist()
        assert ours == _libavfilter_fps(pts, durs, tb), (tb, pts, durs)


def _reference_loop(n: int, m: int) -> list[int]:
    """LatentSync ``loop_video`` on frame numbers: [v, v[::-1], v, ...] concatenated, cut."""
    v = np.arange(n)
    loops = -(-m // n)
    parts = [v if i % 2 == 0 else v[::-1] for i in range(loops)]
    return np.concatenate(parts)[:m].tolist() if parts else []


def test_pingpong_indices():
    assert pingpong_indices(3, 10).tolist() == [0, 1, 2, 2, 1, 0, 0, 1, 2, 2]
    assert pingpong_indices(1, 4).tolist() == [0, 0, 0, 0]
    assert pingpong_indices(5, 3).tolist() == [0, 1, 2]  # audio shorter: video cut
    assert pingpong_indices(4, 0).tolist() == []
    for n in range(1, 9):
        for m in range(0, 40):
            assert pingpong_indices(n, m).tolist() == _reference_loop(n, m), (n, m)
    with pytest.raises(ValueError):
        pingpong_indices(0, 5)


def test_output_length_helpers():
    assert output_frame_indices(10, 4).tolist() == [0, 1, 2, 3]  # output ends with the audio
    assert output_frame_indices(3, 5).tolist() == [0, 1, 2, 2, 1]
    assert output_frame_indices(3, 5, loop=False).tolist() == [0, 1, 2]
    assert frames_for_audio(16000) == 25
    assert frames_for_audio(16001) == 26
    assert frames_for_audio(640) == 1 and frames_for_audio(0) == 0
    assert audio_samples_for_frames(241) == 154240  # reference: int(241 / 25 * 16000)
    assert audio_samples_for_frames(250) == 160000


# --------------------------------------------------------------------------------------------
# probe / decode


def test_codec_support_in_this_build():
    assert has_decoder("h264") and has_decoder("hevc") and has_decoder("vp9")
    assert has_encoder("libx264") and has_encoder("aac")
    assert not has_decoder("no-such-codec")


def test_probe_demo_clip():
    info = probe(MEDIA / "demo1_video.mp4")
    assert info.has_video and info.has_audio
    assert (info.width, info.height) == (1080, 1920) and info.rotation == 0
    assert info.video_codec == "hevc" and info.audio_codec == "aac"
    assert info.frame_rate == 25 and info.num_frames == 250
    assert info.video_duration == pytest.approx(10.0)
    assert info.output_frames(25) == 250
    audio = probe(MEDIA / "demo1_audio.wav")
    assert not audio.has_video and audio.has_audio and audio.sample_rate == 16000
    assert audio.duration == pytest.approx(9.6)


def test_demo_clip_first_frames():
    path = MEDIA / "demo1_video.mp4"
    assert scan_timeline(path).tolist() == list(range(250))  # 25 fps in, 25 fps out
    with iter_frames(path, batch=4, stop=6) as reader:
        batches = list(reader)
    assert [b.indices.tolist() for b in batches] == [[0, 1, 2, 3], [4, 5]]
    assert batches[0].frames.shape == (4, 1920, 1080, 3) and batches[0].frames.dtype == np.uint8
    assert 20 < batches[0].frames.mean() < 235


CODEC_CASES = [
    (".mp4", "libx264", "h264"),
    (".mov", "libx264", "h264"),
    (".mkv", "libx265", "hevc"),
    (".webm", "libvpx-vp9", "vp9"),
    (".mkv", "libsvtav1", "av1"),
]


@pytest.mark.parametrize(("ext", "encoder", "decoder"), CODEC_CASES)
def test_decode_containers_and_codecs(tmp_path, ext, encoder, decoder):
    if not (has_encoder(encoder) and has_decoder(decoder)):
        pytest.skip(f"{encoder}/{decoder} not in this PyAV build")
    size = (80, 64)
    path = make_video(tmp_path / f"clip{ext}", seconds=1.0, fps=25, size=size, codec=encoder)
    info = probe(path)
    assert info.video_codec in (decoder, "libdav1d", "libvpx-vp9")
    assert (info.width, info.height) == size
    frames = read_frames(path)
    assert frames.shape == (25, 64, 80, 3)
    assert read_indices(frames) == list(range(25))


def test_decode_30fps_follows_ffmpeg_fps_rule(tmp_path):
    path = make_video(tmp_path / "30.mp4", seconds=3.0, fps=30, size=(80, 48))
    frames = read_frames(path)
    expected = fps_resample_indices(range(90), Fraction(1, 30), 90).tolist()
    assert len(frames) == 75
    assert read_indices(frames) == expected
    assert scan_timeline(path).tolist() == expected


@pytest.mark.parametrize("ext", [".mp4", ".mkv"])
def test_decode_variable_frame_rate_uses_pts(tmp_path, ext):
    pts = [0, 10, 20, 100, 110, 200]  # ms; last frame lasts 40 ms in both muxers
    path = make_video(tmp_path / f"vfr{ext}", pts=pts, time_base=Fraction(1, 1000), size=(80, 48))
    assert read_indices(read_frames(path)) == [1, 2, 2, 4, 4, 5]
    assert scan_timeline(path).tolist() == [1, 2, 2, 4, 4, 5]


def test_decode_native_rate_when_fps_none(tmp_path):
    path = make_video(tmp_path / "30.mkv", seconds=1.0, fps=30, size=(80, 48))
    frames = read_frames(path, fps=None)
    assert read_indices(frames) == list(range(30))


@pytest.mark.parametrize(
    ("rotation", "transform"),
    [
        (90, lambda q: np.rot90(q, 1)),
        (-90, lambda q: np.rot90(q, -1)),
        (180, lambda q: q[::-1, ::-1]),
    ],
)
def test_rotation_gives_upright_frames(tmp_path, rotation, transform):
    size = (64, 48)
    path = make_video(
        tmp_path / "rot.mp4",
        seconds=0.2,
        size=size,
        rotation=rotation,
        draw=lambda i, t: quadrants(size),
    )
    info = probe(path)
    expected = transform(quadrants(size))
    assert info.rotation == rotation
    assert (info.height, info.width) == expected.shape[:2]
    frames = read_frames(path)
    assert frames.shape == (5, *expected.shape)
    # quadrant centres carry the expected colours (codec noise only)
    h, w = expected.shape[:2]
    for y, x in [
        (h // 4, w // 4),
        (h // 4, 3 * w // 4),
        (3 * h // 4, w // 4),
        (3 * h // 4, 3 * w // 4),
    ]:
        assert np.abs(frames[0, y, x].astype(int) - expected[y, x]).max() <= 12


def test_orientation_from_display_matrices():
    assert orientation_from_matrix([0, 65536, 0, -65536, 0, 0, 0, 0, 1 << 30]).transform == "clock"
    assert orientation_from_matrix([0, -65536, 0, 65536, 0, 0, 0, 0, 1 << 30]).transform == "cclock"
    hflip = orientation_from_matrix([-65536, 0, 0, 0, 65536, 0, 0, 0, 1 << 30])
    assert hflip.transform == "hflip"
    img = np.arange(6).reshape(2, 3, 1)
    assert hflip.apply(img)[:, :, 0].tolist() == [[2, 1, 0], [5, 4, 3]]
    assert orientation_from_matrix(None).transform == "none"


def test_iter_frames_batches_and_selection(tmp_path):
    path = make_video(tmp_path / "ten.mp4", seconds=0.4, size=(80, 48))  # 10 frames
    with iter_frames(path, batch=4) as reader:
        batches = list(reader)
    assert [len(b.indices) for b in batches] == [4, 4, 2]
    assert np.concatenate([b.indices for b in batches]).tolist() == list(range(10))
    assert read_indices(np.concatenate([b.frames for b in batches])) == list(range(10))
    frames = read_frames(path, start=3, stop=7)
    assert read_indices(frames) == [3, 4, 5, 6]


@pytest.mark.parametrize(("ext", "fps"), [(".mp4", 30), (".mkv", 24), (".mp4", 25)])
def test_start_seeks_to_the_same_frames(tmp_path, ext, fps):
    path = make_video(tmp_path / f"gop{ext}", seconds=3.0, fps=fps, size=(80, 48), gop=12)
    full = read_indices(read_frames(path))
    for start, stop in [(1, 4), (13, 20), (40, 47), (len(full) - 3, None)]:
        with iter_frames(path, batch=4, start=start, stop=stop) as reader:
            batches = list(reader)
        got = np.concatenate([b.indices for b in batches]).tolist()
        assert got == list(range(start, stop or len(full)))
        # decoding began at the keyframe before `start`, not at the beginning of the file
        wanted = ((stop or len(full)) - start) * fps / 25
        assert reader.frames_decoded <= wanted + 12 + 4
        frames = np.concatenate([b.frames for b in batches])
        assert read_indices(frames) == full[start:stop]


def test_iter_frames_early_close_stops_thread(tmp_path):
    path = make_video(tmp_path / "long.mp4", seconds=2.0, size=(80, 48))
    before = threading.active_count()
    reader = iter_frames(path, batch=2, prefetch=1)
    it = iter(reader)
    first = next(it)
    assert first.indices.tolist() == [0, 1]
    reader.close()
    assert reader._thread is not None and not reader._thread.is_alive()
    assert threading.active_count() == before
    with pytest.raises(RuntimeError):
        iter(reader)  # a reader is single-use


def test_iter_frames_errors_are_typed(tmp_path):
    with pytest.raises(VideoError, match="not found"):
        iter_frames(tmp_path / "missing.mp4")
    audio_only = make_audio(tmp_path / "a.m4a", seconds=0.5)
    with pytest.raises(VideoError, match="no video stream"):
        iter_frames(audio_only)


# --------------------------------------------------------------------------------------------
# encode


COLORS = [(200, 30, 40), (20, 180, 60), (30, 60, 220), (128, 128, 128), (250, 250, 250), (5, 5, 5)]


def test_encode_decode_colours_survive(tmp_path):
    size = (160, 120)
    frames = np.stack([solid(c, size) for c in COLORS] * 3)
    out = write_video(tmp_path / "c.mp4", frames, fps=25, crf=18, preset="veryfast")
    info = probe(out)
    assert (info.width, info.height, info.num_frames, info.video_codec) == (160, 120, 18, "h264")
    assert info.colorspace == 1 and info.color_range == 1  # tagged BT.709, limited range
    back = read_frames(out)
    assert back.shape == frames.shape
    err = np.abs(back.astype(int) - frames.astype(int))
    assert err[:, 8:-8, 8:-8].max() <= 4  # solid colours: only rounding / codec noise


def test_encode_index_patterns_in_order(tmp_path):
    size = (160, 48)
    frames = np.stack([index_pattern(i, size) for i in range(40)])
    with VideoWriter(tmp_path / "i.mkv", fps=25, size=size, preset="ultrafast") as w:
        for start in range(0, 40, 16):
            w.write(frames[start : start + 16])
    assert read_indices(read_frames(tmp_path / "i.mkv")) == list(range(40))


def test_audio_mux_round_trip_and_trim(tmp_path):
    wav = speechlike(2.0)  # 2 s of audio, 1 s of video: trimmed to 16000 samples
    frames = np.stack([solid((90, 100, 110), (64, 48))] * 25)
    out = write_video(tmp_path / "av.mp4", frames, audio=wav, preset="ultrafast")
    info = probe(out)
    assert info.audio_codec == "aac" and info.sample_rate == 16000 and info.channels == 1
    assert info.audio_duration == pytest.approx(1.0, abs=0.07)
    back = load_audio(out)
    assert 16000 <= len(back) <= 16000 + 1024  # AAC pads the last frame
    n = 16000 - 512  # the encoder's last frame fades: compare the body
    corr = np.corrcoef(back[:n], wav[:n])[0, 1]
    assert corr >= 0.99
    lag = np.argmax(np.correlate(back[2000:6000], wav[2000 - 50 : 6000 + 50], "valid")) - 50
    assert lag == 0  # no priming offset after the round trip


def test_audio_shorter_than_video_ends_early(tmp_path):
    wav = speechlike(0.5)
    frames = np.stack([solid((90, 100, 110), (64, 48))] * 25)
    out = write_video(tmp_path / "short.mp4", frames, audio=wav, preset="ultrafast")
    info = probe(out)
    assert info.video_duration == pytest.approx(1.0)
    assert info.audio_duration == pytest.approx(0.5, abs=0.07)


def test_odd_frame_size_is_padded(tmp_path):
    frames = np.stack([solid((10, 200, 10), (63, 47))] * 3)
    out = write_video(tmp_path / "odd.mp4", frames, preset="ultrafast")
    info = probe(out)
    assert (info.width, info.height) == (64, 48)


def _dir_listing(path: Path) -> list[str]:
    return sorted(os.listdir(path))


@pytest.mark.parametrize("exc_type", [RuntimeError, KeyboardInterrupt])
def test_atomic_write_on_exception(tmp_path, exc_type):
    dest = tmp_path / "out.mp4"
    frames = np.stack([index_pattern(i, (80, 48)) for i in range(8)])
    with pytest.raises(exc_type):
        with VideoWriter(dest, size=(80, 48), audio=speechlike(1.0), preset="ultrafast") as w:
            tmp = Path(w.temp_path)
            assert tmp.parent == tmp_path and tmp.name.startswith(".out.")
            w.write(frames)
            raise exc_type("boom")
    assert _dir_listing(tmp_path) == []  # neither a temp file nor a destination


def test_atomic_write_keeps_existing_destination(tmp_path):
    dest = tmp_path / "out.mp4"
    dest.write_bytes(b"precious")
    frames = np.stack([solid((1, 2, 3), (64, 48))] * 4)
    with pytest.raises(ValueError):
        with VideoWriter(dest, size=(64, 48), overwrite=True, preset="ultrafast") as w:
            w.write(frames)
            w.write(np.zeros((1, 10, 10, 3), np.uint8))  # wrong size: fails mid-write
    assert dest.read_bytes() == b"precious"
    assert _dir_listing(tmp_path) == ["out.mp4"]
    with pytest.raises(OutputPathError, match="exists"):
        VideoWriter(dest, size=(64, 48))  # overwrite=False: refused up front
    write_video(dest, frames, overwrite=True, preset="ultrafast")
    assert probe(dest).num_frames == 4
    assert _dir_listing(tmp_path) == ["out.mp4"]


def test_encoder_thread_failure_is_raised_and_cleaned(tmp_path, monkeypatch):
    dest = tmp_path / "out.mp4"
    calls = {"n": 0}
    original = VideoWriter._encode_batch

    def failing(self, arr):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return original(self, arr)

    monkeypatch.setattr(VideoWriter, "_encode_batch", failing)
    frames = np.stack([solid((1, 2, 3), (64, 48))] * 4)
    with pytest.raises(MediaError, match="no space left"):
        with VideoWriter(dest, size=(64, 48), preset="ultrafast", queue_size=1) as w:
            for _ in range(20):
                w.write(frames)
    assert _dir_listing(tmp_path) == []


def test_writer_rejects_bad_arguments(tmp_path):
    with pytest.raises(OutputPathError, match="unsupported output"):
        VideoWriter(tmp_path / "out.avi", size=(64, 48))
    with pytest.raises(OutputPathError, match="does not exist"):
        VideoWriter(tmp_path / "nodir" / "out.mp4", size=(64, 48))
    w = VideoWriter(tmp_path / "out.mp4", size=(64, 48))
    with pytest.raises(ValueError, match="uint8"):
        w.write(np.zeros((1, 48, 64, 3), np.float32))
    with pytest.raises(MediaError, match="no frames"):
        w.close()
    assert _dir_listing(tmp_path) == []
    with pytest.raises(RuntimeError, match="aborted"):
        w.close()  # a failed writer stays failed
    with pytest.raises(RuntimeError, match="closed"):
        w.write(np.zeros((1, 48, 64, 3), np.uint8))


def test_select_video_encoder():
    assert select_video_encoder("libx264") == "libx264"
    if not nvenc_available():  # CPU machine: auto and an explicit request fall back
        assert select_video_encoder("auto") == "libx264"
        assert select_video_encoder("h264_nvenc") == "libx264"
    else:  # pragma: no cover - GPU machine
        assert select_video_encoder("auto") == "h264_nvenc"
    with pytest.raises(ValueError):
        select_video_encoder("mpeg2")


def _mouth_box() -> np.ndarray:
    box = np.zeros((1, 320, 320, 1))
    box[:, 180:260, 110:210] = 1
    return box


def test_same_frames_encode_to_the_same_bytes(tmp_path):
    """libx264's AVX-512 code gives a different file on some runs for the same frames (on this
    CI's AVX-512 CPU); the writer must be reproducible, or a seeded run is not (the face-cache
    and Triton parity tests caught it)."""
    # the demo's face, area-downscaled to 320x320, with seeded noise over the mouth (40 frames:
    # without the fix, 3-4 different files in 10 encodes, in each of 3 trials)
    big = torch.from_numpy(read_frames(MEDIA / "demo1_video.mp4", stop=40)[:, 380:980, 295:895])
    small = (
        torch.nn.functional.interpolate(
            big.permute(0, 3, 1, 2).float(), size=(320, 320), mode="area"
        )
        .round()
        .permute(0, 2, 3, 1)
        .numpy()
    )
    noisy = small + np.random.default_rng(0).integers(-40, 40, (40, 320, 320, 3)) * _mouth_box()
    noisy = np.clip(noisy, 0, 255).astype(np.uint8)
    files = set()
    for _ in range(10):
        with VideoWriter(tmp_path / "o.mp4", fps=25, codec="libx264", overwrite=True) as w:
            w.write(noisy)
        files.add((tmp_path / "o.mp4").read_bytes())
    assert len(files) == 1


def test_x264_deterministic_params(monkeypatch):
    from lipsync.media import encode

    monkeypatch.setattr(encode, "_cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    assert encode.x264_deterministic_params() == "asm=avx2"
    assert encode.x264_deterministic_params("ref=2") == "ref=2:asm=avx2"
    assert encode.x264_deterministic_params("asm=sse2") == "asm=sse2"  # the caller's choice
    monkeypatch.setattr(encode, "_cpu_flags", lambda: frozenset({"avx2", "sse2"}))
    assert encode.x264_deterministic_params("ref=2") == "ref=2"  # no AVX-512: nothing to limit
    monkeypatch.setattr(encode, "_cpu_flags", lambda: frozenset())
    assert encode.x264_deterministic_params() == ""


def test_stream_decode_process_encode(tmp_path):
    src = make_video(tmp_path / "src.mp4", seconds=2.0, fps=30, size=(160, 48), audio=True)
    wav = load_audio(src)
    info = probe(src)
    out = tmp_path / "dst.mp4"
    with (
        iter_frames(src, batch=8) as reader,
        VideoWriter(out, size=(info.width, info.height), audio=wav, preset="ultrafast") as writer,
    ):
        for _, frames in reader:
            writer.write(frames)
    expected = fps_resample_indices(range(60), Fraction(1, 30), 60).tolist()
    assert read_indices(read_frames(out)) == expected
    assert probe(out).audio_duration == pytest.approx(2.0, abs=0.07)


# --------------------------------------------------------------------------------------------
# validation: one typed error each, nothing written


@pytest.fixture()
def av_clip(tmp_path):
    return make_video(tmp_path / "in.mp4", seconds=1.0, size=(80, 48), audio=True)


def _assert_fails(tmp_path, error, match, *args, **kwargs):
    before = _dir_listing(tmp_path)
    with pytest.raises(error, match=match):
        validate_inputs(*args, **kwargs)
    assert _dir_listing(tmp_path) == before  # writes nothing


def test_validate_ok(tmp_path, av_clip):
    res = validate_inputs(av_clip, av_clip, tmp_path / "out.mp4")
    assert res.video.has_video and res.audio.has_audio and not res.audio_silent
    assert res.waveform is not None and res.waveform.dtype == np.float32
    assert res.audio_duration == pytest.approx(1.0, abs=0.07)
    assert res.output_path == (tmp_path / "out.mp4").resolve()


def test_validate_truncated_files(tmp_path):
    moov_last = make_video(tmp_path / "a.mp4", seconds=2.0, size=(160, 120), audio=True)
    cut1 = truncate_copy(moov_last, tmp_path / "cut1.mp4", 0.6)
    _assert_fails(tmp_path, VideoError, "damaged or truncated", cut1, moov_last, tmp_path / "o.mp4")
    moov_first = make_video(
        tmp_path / "b.mp4", seconds=2.0, size=(160, 120), audio=True, faststart=True
    )
    cut2 = truncate_copy(moov_first, tmp_path / "cut2.mp4", 0.6)
    _assert_fails(tmp_path, VideoError, "truncated", cut2, moov_first, tmp_path / "o.mp4")
    _assert_fails(tmp_path, AudioError, "truncated", moov_first, cut2, tmp_path / "o.mp4")
    with pytest.raises(VideoError, match="truncated"):
        iter_frames(cut2)


def test_validate_not_media(tmp_path, av_clip):
    text = make_text_file(tmp_path / "notes.mp4")
    _assert_fails(tmp_path, VideoError, "not a media file", text, av_clip, tmp_path / "o.mp4")
    _assert_fails(tmp_path, AudioError, "not a media file", av_clip, text, tmp_path / "o.mp4")
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    _assert_fails(tmp_path, AudioError, "empty", av_clip, empty, tmp_path / "o.mp4")
    _assert_fails(
        tmp_path, VideoError, "not found", tmp_path / "nope.mp4", av_clip, tmp_path / "o.mp4"
    )


def test_validate_stream_kinds(tmp_path):
    audio_only = make_audio(tmp_path / "voice.m4a", seconds=1.0)
    silent_video = make_video(tmp_path / "mute.mp4", seconds=1.0, size=(80, 48))
    _assert_fails(
        tmp_path, VideoError, "no video stream", audio_only, audio_only, tmp_path / "o.mp4"
    )
    _assert_fails(
        tmp_path, AudioError, "no audio stream", silent_video, silent_video, tmp_path / "o.mp4"
    )
    res = validate_inputs(silent_video, audio_only, tmp_path / "o.mp4")
    assert res.audio.audio_codec == "aac"
    # an mp3 with cover art has a (picture) video stream, but it is not a video
    mp3 = make_audio(tmp_path / "song.mp3", seconds=1.0, cover_art=True)
    assert not probe(mp3).has_video
    _assert_fails(tmp_path, VideoError, "no video stream", mp3, mp3, tmp_path / "o.mp4")
    assert validate_inputs(silent_video, mp3, tmp_path / "o.mp4").audio.has_audio


def test_validate_empty_and_silent_audio(tmp_path, av_clip):
    zero = make_audio(tmp_path / "zero.wav", signal=np.zeros(0, np.float32))
    _assert_fails(tmp_path, AudioError, "empty", av_clip, zero, tmp_path / "o.mp4")
    silent = make_audio(tmp_path / "silent.wav", signal=np.zeros(16000, np.float32))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = validate_inputs(av_clip, silent, tmp_path / "o.mp4")
    assert res.audio_silent and res.audio_peak == 0.0
    assert any(issubclass(w.category, SilentAudioWarning) for w in caught)
    quiet = make_audio(tmp_path / "quiet.wav", signal=speechlike(1.0) * 0.0005)  # -68 dBFS peak
    with pytest.warns(SilentAudioWarning):
        assert validate_inputs(av_clip, quiet, tmp_path / "o.mp4").audio_silent


def test_validate_absurd_size_and_duration(tmp_path, av_clip):
    huge = make_video(
        tmp_path / "8k.mp4",
        seconds=0.04,
        size=(7696, 16),
        draw=lambda i, t: solid((9, 9, 9), (7696, 16)),
    )
    _assert_fails(
        tmp_path, VideoError, "larger than the 7680-pixel limit", huge, av_clip, tmp_path / "o.mp4"
    )
    _assert_fails(
        tmp_path, VideoError, "over the", av_clip, av_clip, tmp_path / "o.mp4", max_duration_s=0.5
    )
    long_audio = make_audio(tmp_path / "long.wav", seconds=2.0)
    _assert_fails(
        tmp_path,
        AudioError,
        "over the",
        av_clip,
        long_audio,
        tmp_path / "o.mp4",
        max_duration_s=1.5,
    )


def test_validate_output_paths(tmp_path, av_clip, monkeypatch):
    # equal to an input, through a relative path and through a symlink
    monkeypatch.chdir(tmp_path)
    _assert_fails(
        tmp_path, OutputPathError, "same file", av_clip, av_clip, Path("in.mp4"), force=True
    )
    link = tmp_path / "link.mp4"
    link.symlink_to(av_clip)
    _assert_fails(tmp_path, OutputPathError, "same file", av_clip, av_clip, link, force=True)
    audio = make_audio(tmp_path / "voice.wav", seconds=1.0)
    hard = tmp_path / "hard.mp4"
    os.link(audio, hard)
    _assert_fails(tmp_path, OutputPathError, "same file", av_clip, audio, hard, force=True)
    # exists without force; with force it is accepted
    existing = tmp_path / "done.mp4"
    existing.write_bytes(b"x")
    _assert_fails(tmp_path, OutputPathError, "exists", av_clip, av_clip, existing)
    assert validate_inputs(av_clip, av_clip, existing, force=True).output_path == existing.resolve()
    # unsupported type, directory, missing directory, parent is a file
    _assert_fails(
        tmp_path, OutputPathError, "unsupported output", av_clip, av_clip, tmp_path / "o.txt"
    )
    (tmp_path / "d.mp4").mkdir()
    _assert_fails(tmp_path, OutputPathError, "is a directory", av_clip, av_clip, tmp_path / "d.mp4")
    _assert_fails(
        tmp_path, OutputPathError, "does not exist", av_clip, av_clip, tmp_path / "no" / "o.mp4"
    )
    _assert_fails(
        tmp_path, OutputPathError, "not a directory", av_clip, av_clip, existing / "o.mp4"
    )


def test_validate_unwritable_directory(tmp_path, av_clip, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.geteuid() == 0:  # root writes anywhere: emulate the permission check's answer
            real_access = os.access

            def access(path, mode, *a, **k):
                if Path(path) == locked and mode & os.W_OK:
                    return False
                return real_access(path, mode, *a, **k)

            monkeypatch.setattr(os, "access", access)
        _assert_fails(tmp_path, OutputPathError, "not writable", av_clip, av_clip, locked / "o.mp4")
        assert os.listdir(locked) == []
    finally:
        locked.chmod(0o755)


# --------------------------------------------------------------------------------------------
# bounded memory: streaming a 60 s clip needs no more than a 10 s one


_STREAM_SCRIPT = r"""
import json, resource, sys
import numpy as np
import torch
from lipsync.media import VideoWriter, iter_frames, probe
src, dst, stop = sys.argv[1], sys.argv[2], int(sys.argv[3])
info = probe(src)
wav = np.zeros(int(stop / 25 * 16000), np.float32)
wav[::7] = 0.1
n = 0
with iter_frames(src, batch=4, stop=stop) as reader, VideoWriter(
    dst, size=(info.width, info.height), audio=wav, preset="ultrafast"
) as writer:
    for idx, frames in reader:
        frames = frames.copy()
        frames[:, :16, :16] = 255  # "processing"
        writer.write(frames)
        n += len(idx)
# ru_maxrss of a child inherits its parent's high-water mark across fork/exec on Linux (it
# reports max(parent RSS at spawn, own peak)); VmHWM is the peak of this process image alone.
peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    with open("/proc/self/status") as f:
        peak_kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
except (OSError, StopIteration):
    pass
print(json.dumps({"frames": n, "peak_mb": peak_kb / 1024}))
"""


def _stream_peak_mb(src: Path, dst: Path, stop: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-c", _STREAM_SCRIPT, str(src), str(dst), str(stop)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_streaming_memory_is_bounded(tmp_path):
    w, h = 1280, 720
    base = np.zeros((h, w, 3), np.uint8)
    base[:] = np.linspace(0, 255, w, dtype=np.uint8)[None, :, None]

    def draw(i, t):
        img = base.copy()
        x = (i * 8) % (w - 64)
        img[h // 3 : h // 3 + 64, x : x + 64] = (255, 0, 0)
        return img

    src = make_video(tmp_path / "60s.mp4", seconds=60, size=(w, h), draw=draw, preset="ultrafast")
    short = _stream_peak_mb(src, tmp_path / "o10.mp4", stop=250)  # first 10 s
    long = _stream_peak_mb(src, tmp_path / "o60.mp4", stop=1500)  # all 60 s
    assert (short["frames"], long["frames"]) == (250, 1500)
    # 1250 more 720p frames are 3.4 GB decoded; streaming keeps ~5 batches of 4 in flight
    print(f"peak RSS: 10 s {short['peak_mb']:.0f} MB, 60 s {long['peak_mb']:.0f} MB")
    assert long["peak_mb"] <= short["peak_mb"] + 64


def test_yuv420_path_round_trips_like_the_rgb_path(tmp_path):
    from lipsync.media import VideoWriter, read_frames
    from lipsync.media.color import rgb_to_yuv420

    rng = np.random.default_rng(0)
    base = np.kron(rng.integers(0, 256, (6, 9, 16, 3)), np.ones((1, 8, 8, 1)))
    frames = base.astype(np.uint8)[:, :, :, :3]  # (6, 72, 128, 3) blocky colours
    rgb_out, yuv_out = tmp_path / "rgb.mp4", tmp_path / "yuv.mp4"
    with VideoWriter(rgb_out, crf=10) as w:
        w.write(frames)
    with VideoWriter(yuv_out, crf=10) as w:
        w.write(rgb_to_yuv420(torch.from_numpy(frames)))
    a = read_frames(rgb_out).astype(np.int16)
    b = read_frames(yuv_out).astype(np.int16)
    src = frames.astype(np.int16)
    err_rgb, err_yuv = np.abs(a - src).mean(), np.abs(b - src).mean()
    assert a.shape == b.shape == src.shape
    assert err_yuv < 3.0 and err_yuv <= err_rgb + 0.5, (err_rgb, err_yuv)
