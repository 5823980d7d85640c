"""Whisper-tiny audio features: parity with the LatentSync reference, loading, windows."""

from __future__ import annotations

import math
import wave
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lipsync import audio as audio_mod
from lipsync.audio import (
    AudioEncoder,
    frame_window_indices,
    frame_windows,
    load_audio,
    log_mel_spectrogram,
    mel_filters,
    num_frame_windows,
    syncnet_mel,
    syncnet_mel_start,
    syncnet_mel_window,
    syncnet_mel_window_length,
)
from lipsync.errors import AudioError, CheckpointError, CheckpointNotFoundError
from lipsync.media import mux_encoded
from tests.support.shared import SHARED

WHISPER_CKPT = SHARED / "reference/whisper_tiny/encoder_random.pt"
EXPECTED = SHARED / "reference/whisper_tiny/expected_demo1_audio.safetensors"
DEMO_WAV = SHARED / "media/demo1_audio.wav"


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@pytest.fixture(scope="module")
def checkpoint() -> dict:
    return torch.load(WHISPER_CKPT, weights_only=True, map_location="cpu")


@pytest.fixture(scope="module")
def encoder(checkpoint) -> AudioEncoder:
    return AudioEncoder.from_state_dict(checkpoint["model_state_dict"], checkpoint["dims"])


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(EXPECTED))


@pytest.fixture(scope="module")
def demo_features(encoder) -> torch.Tensor:
    return encoder.features(load_audio(DEMO_WAV))


# ------------------------------------------------------------------------------------------
# parity with the reference


def test_demo_features_match_reference(demo_features, expected):
    ref = expected["features"]
    assert demo_features.shape == ref.shape == (480, 5, 384)
    assert demo_features.dtype == torch.float32
    for layer in range(5):  # input embedding + 4 blocks, each within tolerance on its own
        assert rel_err(demo_features[:, layer], ref[:, layer]) <= 1e-4
    assert rel_err(demo_features, ref) <= 1e-4  # measured: ~8e-7


def test_demo_frame_windows_match_reference(encoder, demo_features, expected):
    windows = encoder.frame_windows(demo_features, fps=25)
    assert windows.shape == (242, 50, 384)
    assert int(expected["num_chunks"]) == 242 == num_frame_windows(480, 25)
    assert encoder.num_windows(demo_features, 25) == 242
    assert rel_err(windows[:64], expected["chunks_first64"]) <= 1e-4  # measured: ~6e-7
    # the two windows past the audio end (centres 480, 482) repeat the last position (clamping)
    assert torch.equal(windows[240], demo_features[[476, 477, 478] + [479] * 7].reshape(50, 384))
    assert torch.equal(windows[241], demo_features[[478] + [479] * 9].reshape(50, 384))


def test_from_checkpoint_file_matches_state_dict_path(encoder):
    loaded = AudioEncoder.from_checkpoint(WHISPER_CKPT, device="cpu")
    assert loaded.dims.n_audio_state == 384 and loaded.dims.n_audio_layer == 4
    for (k, a), (_, b) in zip(
        loaded.encoder.state_dict().items(), encoder.encoder.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), k


def test_long_audio_is_encoded_in_independent_30s_windows(encoder):
    rng = np.random.default_rng(1)
    n = 30 * 16000 + 3 * 320 + 160  # 3000 + 7 mel frames: a second, odd-length window
    wav = (0.1 * rng.standard_normal(n)).astype(np.float32)
    feats = encoder.features(wav)
    assert feats.shape == (1500 + 3, 5, 384)  # 7 // 2 = 3 positions from the last window
    mel = log_mel_spectrogram(wav)  # global normalisation over both windows
    assert mel.shape == (80, 3007)
    with torch.inference_mode():
        first = encoder.encoder.forward_layers(mel[None, :, :3000])[0]
        second = encoder.encoder.forward_layers(F.pad(mel[None, :, 3000:], (0, 2993)))[0]
    assert rel_err(feats[:1500], first.transpose(0, 1)) < 1e-6
    assert rel_err(feats[1500:], second.transpose(0, 1)[:3]) < 1e-6
    assert not feats.is_inference()  # usable outside inference mode


# ------------------------------------------------------------------------------------------
# log-mel


def test_mel_filters_band_limited_like_librosa():
    # librosa.filters.mel(sr=16000, n_fft=800, n_mels=80, fmin=55, fmax=7600): the band limits
    # move the first and last filters, the normalisation keeps each filter's area 2 / bandwidth
    m = mel_filters(16000, 800, 80, 55.0, 7600.0)
    assert m.shape == (80, 401) and m.dtype == np.float32
    freqs = np.fft.rfftfreq(800, 1 / 16000)
    assert freqs[np.nonzero(m[0])[0]].min() > 55.0
    assert freqs[np.nonzero(m[79])[0]].max() < 7600.0
    assert not np.array_equal(m, mel_filters(16000, 800, 80))
    with pytest.raises(ValueError, match="fmin < fmax"):
        mel_filters(16000, 800, 80, 100.0, 50.0)


def test_mel_filters_are_librosa_slaney():
    m = mel_filters(16000, 400, 80)
    assert m.shape == (80, 201) and m.dtype == np.float32
    # values from Whisper's mel_filters.npz (librosa.filters.mel(sr=16000, n_fft=400, n_mels=80))
    assert np.nonzero(m[0])[0].tolist() == [1]
    assert m[0, 1] == pytest.approx(0.0248625949, abs=1e-9)
    assert np.nonzero(m[40])[0].tolist() == [42, 43, 44]
    np.testing.assert_allclose(m[40, 42:45], [0.0054111048, 0.0147355665, 0.0065181898], atol=1e-9)
    assert np.nonzero(m[79])[0].tolist() == list(range(186, 200))
    assert m[79, 192] == pytest.approx(0.0031647119, abs=1e-9)
    assert float(m.astype(np.float64).sum()) == pytest.approx(1.999024092387117, abs=1e-6)


def test_log_mel_blocks_match_one_full_stft(monkeypatch):
    rng = np.random.default_rng(2)
    wav = torch.from_numpy((0.2 * rng.standard_normal(16000 + 123)).astype(np.float32))
    # the reference formula on the whole clip at once
    stft = torch.stft(wav, 400, 160, window=torch.hann_window(400), return_complex=True)
    power = stft[:, :-1].abs() ** 2
    ref = torch.clamp(torch.from_numpy(np.array(mel_filters())) @ power, min=1e-10).log10()
    ref = (torch.maximum(ref, ref.max() - 8.0) + 4.0) / 4.0
    monkeypatch.setattr(audio_mod, "_MEL_BLOCK_FRAMES", 7)  # many blocks, both padded edges
    ours = log_mel_spectrogram(wav)
    assert ours.shape == ref.shape == (80, 100)
    assert (ours - ref).abs().max().item() < 1e-5


def test_log_mel_dynamic_range_is_global():
    wav = np.zeros(16000, np.float32)
    wav[:8000] = 0.5 * np.sin(2 * np.pi * 440 * np.arange(8000) / 16000)
    mel = log_mel_spectrogram(wav)
    # the silent half sits exactly at the floor: (max - 8 + 4) / 4 = max_norm - 2
    assert mel[:, 60:].max().item() == pytest.approx(mel.max().item() - 2.0, abs=1e-6)
    assert mel[:, 60:].min().item() == pytest.approx(mel.max().item() - 2.0, abs=1e-6)


# ------------------------------------------------------------------------------------------
# frame windows


def _reference_style_windows(num_features: int, fps: float) -> list[list[int]]:
    """Independent re-statement of LatentSync's loop: append, then test the start index."""
    out, i = [], 0
    while True:
        start = int(i * (50.0 / fps))
        centre = int(i * 50 / fps)
        out.append([min(max(j, 0), num_features - 1) for j in range(centre - 4, centre + 6)])
        i += 1
        if start > num_features:
            return out


def test_frame_window_edges_at_25fps():
    t, layers, ch = 10, 5, 3
    feats = torch.arange(t, dtype=torch.float32)[:, None, None].expand(t, layers, ch).clone()
    feats += torch.arange(layers, dtype=torch.float32)[None, :, None] / 10  # tag the layer
    win = frame_windows(feats, fps=25)
    assert win.shape == (7, 50, 3)  # 1 + min{i : 2i > 10} = 7
    positions = win[:, ::5, 0].round().long()  # position of each group of 5 tokens
    assert positions[0].tolist() == [0, 0, 0, 0, 0, 1, 2, 3, 4, 5]  # start clamped to 0
    assert positions[1].tolist() == [0, 0, 0, 1, 2, 3, 4, 5, 6, 7]
    assert positions[3].tolist() == [2, 3, 4, 5, 6, 7, 8, 9, 9, 9]
    assert positions[5].tolist() == [6, 7, 8, 9, 9, 9, 9, 9, 9, 9]
    assert positions[6].tolist() == [8, 9, 9, 9, 9, 9, 9, 9, 9, 9]  # past the end
    # tokens are position-major, layer-minor
    layer_tags = (win[2, :, 0] - win[2, :, 0].floor()) * 10
    assert layer_tags.round().long().tolist() == [0, 1, 2, 3, 4] * 10


@pytest.mark.parametrize(
    ("num_features", "fps", "expected_n"),
    [(480, 25, 242), (1, 25, 2), (2, 25, 3), (481, 25, 242), (480, 30, 290), (123, 29.97, 76)],
)
def test_frame_window_count_and_indices_follow_reference_loop(num_features, fps, expected_n):
    ref = _reference_style_windows(num_features, fps)
    assert len(ref) == expected_n == num_frame_windows(num_features, fps)
    assert frame_window_indices(num_features, fps).tolist() == ref


def test_frame_window_slices_match_full():
    feats = torch.randn(37, 5, 4)
    full = frame_windows(feats, 25)
    assert full.shape == (20, 50, 4)
    assert torch.equal(frame_windows(feats, 25, start=16, stop=32), full[16:])  # clipped stop
    assert torch.equal(frame_windows(feats, 25, start=3, stop=9), full[3:9])
    assert frame_windows(feats, 25, start=25).shape == (0, 50, 4)
    with pytest.raises(ValueError):
        frame_windows(feats, 0)


# ------------------------------------------------------------------------------------------
# checkpoint loading


def _load(state: dict, dims: dict) -> AudioEncoder:
    return AudioEncoder.from_state_dict(state, dims)


def test_decoder_keys_are_ignored(checkpoint):
    state = dict(checkpoint["model_state_dict"])
    state["decoder.token_embedding.weight"] = torch.zeros(51865, 384)
    state["decoder.blocks.0.attn.query.weight"] = torch.zeros(7, 7)  # any shape: not ours
    enc = _load(state, checkpoint["dims"])
    assert enc.encoder.conv1.weight.shape == (384, 80, 3)


def test_missing_encoder_key_is_named(checkpoint):
    state = dict(checkpoint["model_state_dict"])
    del state["encoder.blocks.2.mlp_ln.bias"]
    with pytest.raises(
        CheckpointError, match=r"1 missing keys \(e\.g\. encoder\.blocks\.2\.mlp_ln\.bias\)"
    ):
        _load(state, checkpoint["dims"])


def test_unexpected_encoder_key_is_named(checkpoint):
    state = dict(checkpoint["model_state_dict"])
    state["encoder.blocks.0.attn.key.bias"] = torch.zeros(384)
    state["encoder.extra"] = torch.zeros(1)
    with pytest.raises(
        CheckpointError, match=r"2 unexpected keys \(e\.g\. encoder\.blocks\.0\.attn\.key\.bias"
    ):
        _load(state, checkpoint["dims"])


def test_mis_shaped_encoder_key_is_named(checkpoint):
    state = dict(checkpoint["model_state_dict"])
    state["encoder.positional_embedding"] = torch.zeros(1499, 384)
    with pytest.raises(
        CheckpointError,
        match=r"encoder\.positional_embedding: file \[1499, 384\] vs model \[1500, 384\]",
    ):
        _load(state, checkpoint["dims"])


def test_many_missing_keys_are_counted(checkpoint):
    state = {k: v for k, v in checkpoint["model_state_dict"].items() if "blocks.3" not in k}
    with pytest.raises(
        CheckpointError,
        match=r"15 missing keys \(e\.g\. encoder\.blocks\.3\.[^,]+, [^,]+, [^,]+, [^,]+, [^,]+\)",
    ):
        _load(state, checkpoint["dims"])


def test_bad_checkpoint_files(tmp_path, checkpoint):
    with pytest.raises(CheckpointNotFoundError):
        AudioEncoder.from_checkpoint(tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read .*junk.pt"):
        AudioEncoder.from_checkpoint(junk)
    bare = tmp_path / "bare.pt"
    torch.save(checkpoint["model_state_dict"], bare)
    with pytest.raises(CheckpointError, match="not an OpenAI Whisper checkpoint"):
        AudioEncoder.from_checkpoint(bare)
    broken = tmp_path / "broken.pt"
    state = dict(checkpoint["model_state_dict"])
    state["encoder.conv2.bias"] = torch.zeros(383)
    torch.save({"dims": checkpoint["dims"], "model_state_dict": state}, broken)
    with pytest.raises(
        CheckpointError, match=r"encoder\.conv2\.bias: file \[383\] vs model \[384\]"
    ):
        AudioEncoder.from_checkpoint(broken)


# ------------------------------------------------------------------------------------------
# audio loading


def _write_wav(path: Path, data: np.ndarray, rate: int, layout: str) -> None:
    """data: (channels, samples) int16."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=rate, layout=layout)
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(data.T).reshape(1, -1), format="s16", layout=layout
        )
        frame.sample_rate = rate
        mux_encoded(container, stream, frame)
        mux_encoded(container, stream, None)


def test_stereo_44k_is_resampled_to_16k_mono(tmp_path):
    rate, n = 44100, 2 * 44100 + 441  # 2.01 s
    t = np.arange(n) / rate
    left = 0.5 * np.sin(2 * np.pi * 440 * t)
    data = np.stack([left, np.zeros(n)])  # mono = (L + R) / 2
    path = tmp_path / "stereo.wav"
    _write_wav(path, np.round(data * 32767).astype(np.int16), rate, "stereo")
    wav = load_audio(path)
    assert wav.dtype == np.float32 and wav.ndim == 1
    assert wav.shape[0] == 32160  # 2.01 s at 16 kHz
    t16 = np.arange(wav.shape[0]) / 16000
    expected = 0.25 * np.sin(2 * np.pi * 440 * t16)
    assert np.abs(wav[200:-200] - expected[200:-200]).max() < 2e-3
    assert np.all(np.round(wav * 32768) == wav * 32768)  # int16-quantised like the reference


def test_demo_wav_loads_exactly():
    wav = load_audio(DEMO_WAV)
    assert wav.shape == (153600,)  # 9.6 s, already 16 kHz mono s16
    with wave.open(str(DEMO_WAV)) as w:
        raw = np.frombuffer(w.readframes(w.getnframes()), np.int16)
    assert np.array_equal(wav, raw.astype(np.float32) / 32768)


def test_unreadable_and_empty_files_raise_audio_error(tmp_path):
    text = tmp_path / "notes.wav"
    text.write_text("this is not audio\n" * 50)
    with pytest.raises(AudioError, match="cannot read audio from"):
        load_audio(text)
    with pytest.raises(AudioError, match="not found"):
        load_audio(tmp_path / "missing.wav")
    with pytest.raises(AudioError, match="not an audio file"):
        load_audio(tmp_path)
    empty = tmp_path / "empty.wav"
    with wave.open(str(empty), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"")
    with pytest.raises(AudioError, match="empty"):
        load_audio(empty)


def test_video_without_audio_raises_audio_error(tmp_path):
    path = tmp_path / "silent_video.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for _ in range(2):
            frame = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")
            mux_encoded(container, stream, frame)
        mux_encoded(container, stream, None)
    with pytest.raises(AudioError, match="no audio stream"):
        load_audio(path)


@pytest.mark.parametrize(
    ("wav", "message"),
    [
        (np.zeros(0, np.float32), "empty"),
        (np.zeros(319, np.float32), "too short"),
        (np.zeros(16000, np.int16), "float waveform"),
        (np.zeros((2, 16000), np.float32), "mono"),
        (np.full(16000, np.nan, np.float32), "NaN"),
    ],
)
def test_bad_waveforms_raise_audio_error(encoder, wav, message):
    with pytest.raises(AudioError, match=message):
        encoder.features(wav)


def test_shortest_clip_gives_one_position(encoder):
    feats = encoder.features(np.zeros(320, np.float32))
    assert feats.shape == (1, 5, 384)
    assert encoder.frame_windows(feats).shape == (2, 50, 384)  # int(1 * 2) = 2 > 1 stops at i=1
    assert math.isfinite(feats.abs().max().item())


def test_lazy_features_equal_eager_features_on_long_audio(encoder):
    # 70 s: three 30 s windows, the last one partial; windows built from either are identical
    rng = np.random.default_rng(3)
    wav = (0.1 * rng.standard_normal(70 * 16000)).astype(np.float32)
    eager = encoder.features(wav)
    lazy = encoder.lazy_features(wav)
    assert lazy.shape == tuple(eager.shape)
    for start, stop in [(0, 16), (740, 760), (1730, 1760)]:
        a = frame_windows(eager, 25, start=start, stop=stop)
        b = frame_windows(lazy, 25, start=start, stop=stop)
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert len(lazy._cache) <= 2


# ------------------------------------------------------------------------------------------
# SyncNet's Wav2Lip-style mel spectrogram

SYNCNET_MEL = SHARED / "reference/syncnet/mel_demo1.safetensors"


@pytest.fixture(scope="module")
def syncnet_mel_expected() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(SYNCNET_MEL))


def test_syncnet_mel_matches_reference(syncnet_mel_expected):
    wav = syncnet_mel_expected["wav"]
    assert np.array_equal(load_audio(DEMO_WAV), wav.numpy())  # same samples as the reference
    for given in (wav, wav.numpy(), wav.double()):
        mel = syncnet_mel(given)
        assert mel.dtype == torch.float32 and mel.shape == (80, 769)
        assert (mel - syncnet_mel_expected["mel"]).abs().max().item() <= 1e-3


def test_syncnet_mel_window_matches_reference(syncnet_mel_expected):
    mel = syncnet_mel(syncnet_mel_expected["wav"])
    window = syncnet_mel_window(mel, 40)
    assert window.shape == (80, 52)
    assert (window - syncnet_mel_expected["window_frame40"]).abs().max().item() <= 1e-3


def test_syncnet_mel_window_rule():
    assert syncnet_mel_window_length(16) == 52  # ceil(16 / 5 * 16)
    assert syncnet_mel_window_length(5) == 16
    assert [syncnet_mel_start(f) for f in (0, 1, 2, 3, 40)] == [0, 3, 6, 9, 128]
    assert syncnet_mel_start(3, fps=30) == 8  # int(80 * 3 / 30)
    mel = torch.arange(80 * 60, dtype=torch.float32).reshape(80, 60)
    assert torch.equal(syncnet_mel_window(mel, 2), mel[:, 6:58])
    with pytest.raises(AudioError, match="too short for a SyncNet window at frame 3"):
        syncnet_mel_window(mel, 3)  # needs mel frames 9..60


def test_syncnet_mel_blocks_match_one_stft(monkeypatch):
    rng = np.random.default_rng(3)
    wav = (0.3 * rng.standard_normal(16000 + 77)).astype(np.float32)
    whole = syncnet_mel(wav)
    monkeypatch.setattr(audio_mod, "_SYNCNET_BLOCK_FRAMES", 7)
    assert torch.equal(syncnet_mel(wav), whole)
    assert whole.shape == (80, (16000 + 77) // 200 + 1)


def test_syncnet_mel_range_and_silence():
    mel = syncnet_mel(np.zeros(4000, np.float32))
    assert mel.shape == (80, 21) and torch.all(mel == -4.0)  # below the -100 dB floor
    loud = syncnet_mel(np.sin(np.arange(16000) * 0.3).astype(np.float32))
    assert loud.min() >= -4.0 and loud.max() <= 4.0


@pytest.mark.parametrize(
    ("wav", "message"),
    [
        (np.zeros(0, np.float32), "empty"),
        (np.zeros(16000, np.int16), "float waveform"),
        (np.full(16000, np.inf, np.float32), "NaN or infinite"),
    ],
)
def test_syncnet_mel_rejects_bad_waveforms(wav, message):
    with pytest.raises(AudioError, match=message):
        syncnet_mel(wav)
