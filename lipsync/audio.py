"""Audio loading and Whisper-tiny audio features, numerically matching LatentSync.

Pipeline (each step as in LatentSync's ``latentsync/whisper``):

1. :func:`load_audio` decodes any file PyAV/FFmpeg can read, down-mixes to mono and resamples to
   16 kHz through libswresample, **as signed 16-bit samples**, then scales by 1/32768. The
   reference pipes ``ffmpeg -f s16le -ac 1 -ar 16000`` output into numpy the same way, so the
   int16 quantisation is reproduced bit for bit (for a 16 kHz s16 wav the samples are exact).
2. :func:`log_mel_spectrogram`: STFT (n_fft 400, hop 160, periodic Hann window, centred with
   reflect padding), the last STFT frame dropped (so ``len(wav) // 160`` mel frames, 100/s),
   power spectrum, 80 Slaney-normalised mel filters (librosa's defaults, computed here in numpy),
   ``log10(max(x, 1e-10))``, floor at *global* max - 8 (over the whole clip, not per window),
   then ``(x + 4) / 4``.
3. The encoder runs on consecutive 30 s windows of 3000 mel frames; the last one is padded with
   zeros *in the normalised log-mel domain* (the reference pads the mel, not the audio). Each
   window yields its input embedding (conv stem + positional embedding) and the 4 residual block
   outputs, 1500 positions (20 ms each); only the first ``valid_mel_frames // 2`` are kept and the
   windows are concatenated: ``features`` is ``(T, 5, 384)`` with
   ``T = sum(valid // 2) == len(wav) // 320`` except when a window holds an odd frame count.
4. :func:`frame_windows` builds one ``(50, 384)`` conditioning window per video frame.

SyncNet eats a different, Wav2Lip-style spectrogram: :func:`syncnet_mel` (80 frames per second,
values in [-4, 4]) cut into one ``(80, 52)`` window per 16 video frames by
:func:`syncnet_mel_window`.

Frame-window policy (LatentSync ``Audio2Feature.feature2chunks`` / ``get_sliced_feature``):

* Video frame ``i`` at ``fps`` has centre ``c = int(i * 50 / fps)`` (50 feature positions per
  second; ``c = 2 i`` at 25 fps). Its window holds the 10 positions ``c - 4 .. c + 5`` (the two
  video frames before, the frame itself and the two after, 2 positions each), each index clamped
  to ``[0, T - 1]`` (edge positions are repeated), all 5 layers of a position consecutive:
  token ``j`` = position ``j // 5``, layer ``j % 5``. The span of 2 positions per video frame is
  hard-coded in the reference whatever the fps (exact only at 25 fps); we keep that.
* The count: the reference loop appends the window for frame ``i`` *before* testing
  ``int(i * (50 / fps)) > T`` and stops only once that is true. So it emits every frame whose
  start index is ``<= T`` plus one more: ``N = 1 + min{i : int(i * 50 / fps) > T}``. For the
  9.6 s demo clip (T = 480 at 25 fps) frame 240 starts at 480 (not > 480) and frame 241 at 482,
  hence 242 windows for 240 frames of audio: two past the end, whose positions beyond 479 are
  clamped to the last one. Callers truncate to the video's frame count.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lipsync.checkpoints import load_whisper_encoder, read_whisper_checkpoint
from lipsync.constants import FPS, SAMPLE_RATE
from lipsync.errors import AudioError, one_line
from lipsync.models.whisper import WhisperDims, WhisperEncoder

__all__ = [
    "ENCODER_WINDOW_FRAMES",
    "FEATURES_PER_SECOND",
    "HOP_LENGTH",
    "MIN_SAMPLES",
    "N_FFT",
    "N_MELS",
    "SAMPLE_RATE",
    "AudioEncoder",
    "LazyFeatures",
    "WindowedFeatures",
    "as_waveform",
    "clip_log_mel_max",
    "encoder_windows",
    "frame_window_indices",
    "frame_windows",
    "load_audio",
    "log_mel_power",
    "log_mel_spectrogram",
    "mel_filters",
    "num_frame_windows",
    "stft_segment",
    "whisper_log_mel",
]

N_FFT = 400
HOP_LENGTH = 160
N_MELS = 80
ENCODER_WINDOW_FRAMES = 3000  # mel frames per Whisper encoder window (30 s; 2 × n_audio_ctx)
FEATURES_PER_SECOND = 50  # encoder positions per second (conv2 has stride 2: 100 mel frames/s / 2)
WINDOW_CONTEXT = 2  # video frames of context either side of the current one
MIN_SAMPLES = 2 * HOP_LENGTH  # shortest clip that yields one feature position (20 ms)
_MEL_BLOCK_FRAMES = 3000  # STFT computed in blocks of this many frames (bounded memory)


# --------------------------------------------------------------------------------------------
# loading


def iter_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> Iterator[np.ndarray]:
    """The first audio stream of ``path`` as int16 mono chunks at ``sample_rate`` Hz, streamed
    (libswresample, as LatentSync's ffmpeg ``s16le`` pipe). Raises :class:`AudioError` for an
    unreadable file or one without an audio stream."""
    import av  # lazy: only needed when decoding files

    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise AudioError(f"cannot read audio from {path}: {one_line(exc)}") from None
    try:
        with container:
            if not container.streams.audio:
                raise AudioError(f"no audio stream in {path}")
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="s16", layout="mono", rate=sample_rate)
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    yield out.to_ndarray().reshape(-1)
            for out in resampler.resample(None):  # flush the resampler's delay line
                yield out.to_ndarray().reshape(-1)
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise AudioError(f"cannot decode audio from {path}: {one_line(exc)}") from None


def load_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode the first audio stream of ``path`` to mono float32 at ``sample_rate`` Hz.

    Samples pass through 16-bit integers (as LatentSync's ffmpeg ``s16le`` pipe does) and are
    returned scaled to [-1, 1). Raises :class:`AudioError` for an unreadable file, a file without
    an audio stream, or one that decodes to no samples.
    """
    path = Path(path)
    if not path.exists():
        raise AudioError(f"audio file not found: {path}")
    if not path.is_file():
        raise AudioError(f"not an audio file: {path}")
    chunks = list(iter_audio(path, sample_rate))
    if not chunks or sum(c.size for c in chunks) == 0:
        raise AudioError(f"audio stream in {path} is empty")
    return np.concatenate(chunks).astype(np.float32) / np.float32(32768.0)


# --------------------------------------------------------------------------------------------
# log-mel spectrogram


# Slaney mel scale (librosa ``htk=False``): linear below 1 kHz, logarithmic above.
_MEL_F_SP = 200.0 / 3.0  # Hz per mel in the linear part
_MEL_MIN_LOG_HZ = 1000.0
_MEL_MIN_LOG_MEL = _MEL_MIN_LOG_HZ / _MEL_F_SP
_MEL_LOGSTEP = math.log(6.4) / 27.0


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    f = np.asarray(f, dtype=np.float64)
    log_part = _MEL_MIN_LOG_MEL + np.log(np.maximum(f, _MEL_MIN_LOG_HZ) / _MEL_MIN_LOG_HZ) / (
        _MEL_LOGSTEP
    )
    return np.where(f >= _MEL_MIN_LOG_HZ, log_part, f / _MEL_F_SP)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    log_part = _MEL_MIN_LOG_HZ * np.exp(_MEL_LOGSTEP * (m - _MEL_MIN_LOG_MEL))
    return np.where(m >= _MEL_MIN_LOG_MEL, log_part, _MEL_F_SP * m)


@lru_cache(maxsize=8)
def mel_filters(
    sample_rate: int = SAMPLE_RATE,
    n_fft: int = N_FFT,
    n_mels: int = N_MELS,
    fmin: float = 0.0,
    fmax: float | None = None,
) -> np.ndarray:
    """Slaney-style, area-normalised triangular mel filterbank, (n_mels, n_fft // 2 + 1) float32.

    Same as ``librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels, fmin=fmin,
    fmax=fmax)``; the defaults (fmin 0, fmax sr/2) are what Whisper's ``mel_filters.npz`` stores,
    SyncNet's Wav2Lip-style spectrogram uses 55-7600 Hz.
    """
    fmax = sample_rate / 2.0 if fmax is None else float(fmax)
    if not 0.0 <= fmin < fmax <= sample_rate / 2.0:
        raise ValueError(f"need 0 <= fmin < fmax <= {sample_rate / 2}, got {fmin}, {fmax}")
    fft_freqs = np.fft.rfftfreq(n_fft, d=1.0 / sample_rate)
    mel_pts = np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2)
    hz_pts = _mel_to_hz(mel_pts)
    widths = np.diff(hz_pts)
    ramps = hz_pts[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper)).astype(np.float32)
    enorm = 2.0 / (hz_pts[2:] - hz_pts[:-2])
    weights *= enorm[:, None]  # in place: float32 result, like librosa
    weights.setflags(write=False)
    return weights


def _reflect_padded_slice(wav: torch.Tensor, pad: int, start: int, stop: int) -> torch.Tensor:
    """``F.pad(wav, (pad, pad), mode="reflect")[start:stop]`` without padding the whole clip."""
    n = wav.shape[0]
    lo, hi = start - pad, stop - pad  # in unpadded coordinates
    parts = []
    if lo < 0:
        parts.append(wav[1 : 1 - lo].flip(0) if hi >= 0 else wav[1 - hi : 1 - lo].flip(0))
    mid = wav[max(lo, 0) : min(hi, n)]
    if mid.numel():
        parts.append(mid)
    if hi > n:
        a = max(lo, n)  # first padded index past the end, in unpadded coordinates
        # index n - 1 + j maps to wav[n - 1 - j]
        parts.append(wav[2 * n - 1 - hi : 2 * n - 1 - a].flip(0))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def stft_segment(wav: torch.Tensor, f0: int, f1: int) -> torch.Tensor:
    """The samples STFT frames ``f0 .. f1-1`` of a clip read, reflect-padded at the clip's ends
    as Whisper's centred STFT pads them: ``160 (f1 - f0 - 1) + 400`` samples. What the Triton
    ``audio_features`` model receives for one encoder window."""
    return _reflect_padded_slice(wav, N_FFT // 2, f0 * HOP_LENGTH, (f1 - 1) * HOP_LENGTH + N_FFT)


def log_mel_power(segment: torch.Tensor, n_mels: int = N_MELS) -> torch.Tensor:
    """log10 mel power of an :func:`stft_segment`: (n_mels, frames), before Whisper's floor and
    scaling (:func:`whisper_log_mel`)."""
    window = torch.hann_window(N_FFT)
    filters = torch.from_numpy(np.array(mel_filters(SAMPLE_RATE, N_FFT, n_mels)))
    spec = torch.stft(segment, N_FFT, HOP_LENGTH, window=window, center=False, return_complex=True)
    power = spec.abs() ** 2  # (n_fft/2+1, frames)
    return torch.clamp(filters @ power, min=1e-10).log10()


def whisper_log_mel(log_power: torch.Tensor, clip_max: torch.Tensor | float) -> torch.Tensor:
    """Whisper's normalisation of log10 mel powers: floor at ``clip_max - 8`` (the largest value
    of the *whole clip*, not of one window), then ``(x + 4) / 4``."""
    peak = torch.as_tensor(clip_max, dtype=torch.float32)
    return (torch.maximum(log_power, peak - 8.0) + 4.0) / 4.0


def encoder_windows(
    num_samples: int, window_frames: int = ENCODER_WINDOW_FRAMES
) -> list[tuple[int, int]]:
    """Mel-frame ranges ``(f0, f1)`` of the Whisper encoder windows of a clip."""
    n_frames = num_samples // HOP_LENGTH
    return [(s, min(s + window_frames, n_frames)) for s in range(0, n_frames, window_frames)]


def clip_log_mel_max(
    wav: torch.Tensor, n_mels: int = N_MELS, window_frames: int = ENCODER_WINDOW_FRAMES
) -> float:
    """The clip's largest log10 mel power, one window at a time (bounded memory): what
    :func:`whisper_log_mel` floors with when a clip's windows are computed one by one."""
    best = -np.inf
    for f0, f1 in encoder_windows(wav.shape[0], window_frames):
        best = max(best, float(log_mel_power(stft_segment(wav, f0, f1), n_mels).max()))
    return best


def log_mel_spectrogram(wav: torch.Tensor | np.ndarray, n_mels: int = N_MELS) -> torch.Tensor:
    """Whisper's normalised log-mel spectrogram of a 16 kHz mono clip: (n_mels, len(wav) // 160).

    Computed block by block (STFT frames are independent), so memory stays bounded apart from
    the (small) result itself.
    """
    wav = torch.as_tensor(wav, dtype=torch.float32).reshape(-1).cpu()
    n = wav.shape[0]
    if n <= N_FFT // 2:
        raise AudioError(f"audio too short: {n} samples (need at least {MIN_SAMPLES} at 16 kHz)")
    n_frames = n // HOP_LENGTH  # torch.stft(center=True) gives n // hop + 1; the last is dropped
    log_spec = torch.empty(n_mels, n_frames, dtype=torch.float32)
    for f0 in range(0, n_frames, _MEL_BLOCK_FRAMES):
        f1 = min(f0 + _MEL_BLOCK_FRAMES, n_frames)
        log_spec[:, f0:f1] = log_mel_power(stft_segment(wav, f0, f1), n_mels)
    return whisper_log_mel(log_spec, log_spec.max())


# --------------------------------------------------------------------------------------------
# SyncNet's mel spectrogram (Wav2Lip-style, as LatentSync's StableSyncNet eats it)

SYNCNET_N_FFT = 800  # 50 ms
SYNCNET_HOP = 200  # 12.5 ms: 80 mel frames per second
SYNCNET_MEL_FPS = SAMPLE_RATE // SYNCNET_HOP
SYNCNET_PREEMPHASIS = 0.97
SYNCNET_FMIN, SYNCNET_FMAX = 55.0, 7600.0
SYNCNET_REF_DB = 20.0  # subtracted after amplitude -> dB
SYNCNET_MIN_DB = -100.0  # amplitude floor 1e-5 and the bottom of the normalised range
SYNCNET_MAX_ABS = 4.0  # values are scaled to [-4, 4]
_SYNCNET_BLOCK_FRAMES = 8000  # STFT frames per block (100 s): bounded memory on long clips


def syncnet_mel(wav16k: np.ndarray | torch.Tensor) -> torch.Tensor:
    """SyncNet's mel spectrogram of a 16 kHz mono clip: (80, len(wav) // 200 + 1) float32.

    The Wav2Lip recipe LatentSync's SyncNet data uses: pre-emphasis ``x[n] - 0.97 x[n-1]``; STFT
    with n_fft = win = 800, hop 200, periodic Hann window, centred with *zero* padding (librosa
    >= 0.10's default); magnitude (not power) through 80 Slaney mel filters over 55-7600 Hz;
    ``20 log10(max(x, 1e-5)) - 20`` dB; then ``clip(8 (dB + 100) / 100 - 4, -4, 4)``.
    80 frames per second, frame ``k`` centred on sample ``200 k``.

    ``wav16k``: float samples in [-1, 1] (numpy or torch; a torch tensor is processed on its
    device). Returns float32 on that device (CPU for numpy input).
    """
    wav = as_waveform(wav16k, min_samples=1, keep_device=True).double()
    # pre-emphasis (scipy.signal.lfilter([1, -0.97], [1], x) with a zero initial state)
    wav = torch.cat([wav[:1], wav[1:] - SYNCNET_PREEMPHASIS * wav[:-1]])
    pad = SYNCNET_N_FFT // 2
    padded = F.pad(wav, (pad, pad))  # centre=True with constant (zero) padding
    n_frames = wav.shape[0] // SYNCNET_HOP + 1
    window = torch.hann_window(SYNCNET_N_FFT, dtype=torch.float64, device=wav.device)
    filters = mel_filters(SAMPLE_RATE, SYNCNET_N_FFT, 80, SYNCNET_FMIN, SYNCNET_FMAX)
    filters = torch.from_numpy(np.array(filters)).to(device=wav.device, dtype=torch.float64)
    out = torch.empty(80, n_frames, dtype=torch.float32, device=wav.device)
    floor = 10.0 ** (SYNCNET_MIN_DB / 20.0)
    for f0 in range(0, n_frames, _SYNCNET_BLOCK_FRAMES):
        f1 = min(f0 + _SYNCNET_BLOCK_FRAMES, n_frames)
        seg = padded[f0 * SYNCNET_HOP : (f1 - 1) * SYNCNET_HOP + SYNCNET_N_FFT]
        spec = torch.stft(
            seg, SYNCNET_N_FFT, SYNCNET_HOP, window=window, center=False, return_complex=True
        )
        db = 20.0 * torch.log10(torch.clamp(filters @ spec.abs(), min=floor)) - SYNCNET_REF_DB
        scaled = 2 * SYNCNET_MAX_ABS * (db - SYNCNET_MIN_DB) / -SYNCNET_MIN_DB - SYNCNET_MAX_ABS
        out[:, f0:f1] = scaled.clamp(-SYNCNET_MAX_ABS, SYNCNET_MAX_ABS).float()
    return out


def syncnet_mel_window_length(num_frames: int = 16, fps: float = 25) -> int:
    """Mel frames SyncNet sees for ``num_frames`` video frames: ``ceil(num_frames / fps * 80)``
    (the reference's ``ceil(num_frames / 5 * 16)`` at 25 fps: 52 for 16 frames)."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    return math.ceil(Fraction(num_frames * SYNCNET_MEL_FPS) / Fraction(_check_fps(fps)))


def syncnet_mel_start(start_frame: int, fps: float = 25) -> int:
    """First mel frame of the window starting at video frame ``start_frame``:
    ``int(80 * start_frame / fps)`` (the reference's rule)."""
    return int(SYNCNET_MEL_FPS * (start_frame / _check_fps(fps)))


def syncnet_mel_window(
    mel: torch.Tensor, start_frame: int, num_frames: int = 16, fps: float = 25
) -> torch.Tensor:
    """The mel window for ``num_frames`` video frames from ``start_frame``: (80, T) -> (80, 52).

    Raises :class:`AudioError` when the window does not fit inside ``mel`` (the reference skips
    such windows).
    """
    if start_frame < 0:
        raise ValueError(f"start_frame must be >= 0, got {start_frame}")
    start = syncnet_mel_start(start_frame, fps)
    length = syncnet_mel_window_length(num_frames, fps)
    if start + length > mel.shape[-1]:
        raise AudioError(
            f"audio too short for a SyncNet window at frame {start_frame}: needs mel frames "
            f"{start}..{start + length - 1}, the clip has {mel.shape[-1]}"
        )
    return mel[..., start : start + length]


# --------------------------------------------------------------------------------------------
# per-video-frame windows


def _check_fps(fps: float) -> float:
    fps = float(fps)
    if not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"fps must be a positive number, got {fps}")
    return fps


def num_frame_windows(num_features: int, fps: float = FPS) -> int:
    """How many windows LatentSync emits for ``num_features`` positions (see module docstring)."""
    fps = _check_fps(fps)
    step = FEATURES_PER_SECOND / fps  # the reference's ``whisper_idx_multiplier``
    # smallest i with int(i * step) > num_features, found from an estimate and corrected exactly
    i = max(0, int((num_features + 1) / step) - 2)
    while int(i * step) <= num_features:
        i += 1
    while i > 0 and int((i - 1) * step) > num_features:
        i -= 1
    return i + 1


def frame_window_indices(
    num_features: int, fps: float = FPS, start: int = 0, stop: int | None = None
) -> torch.Tensor:
    """Feature positions of windows ``start..stop-1``: (n, 10) int64, already clamped."""
    fps = _check_fps(fps)
    if num_features < 1:
        raise AudioError("no audio features to build frame windows from")
    total = num_frame_windows(num_features, fps)
    stop = total if stop is None else min(stop, total)
    start = max(0, start)
    frames = range(start, max(start, stop))
    centers = torch.tensor(
        [int(i * FEATURES_PER_SECOND / fps) for i in frames], dtype=torch.int64
    ).reshape(-1, 1)
    # The reference hard-codes 2 positions per video frame (exact at 25 fps) whatever the fps.
    offsets = torch.arange(-2 * WINDOW_CONTEXT, 2 * (WINDOW_CONTEXT + 1), dtype=torch.int64)
    return (centers + offsets).clamp_(0, num_features - 1)


def frame_windows(
    features: torch.Tensor, fps: float = FPS, *, start: int = 0, stop: int | None = None
) -> torch.Tensor:
    """Per-video-frame conditioning windows: (T, L, C) features -> (N, 10 * L, C).

    ``start``/``stop`` select a range of windows (to build them batch by batch on long clips);
    by default all ``num_frame_windows(T, fps)`` windows are returned.
    """
    if features.ndim != 3:
        raise ValueError(f"expected features of shape (T, layers, channels), got {features.shape}")
    t, layers, channels = features.shape
    idx = frame_window_indices(t, fps, start, stop).to(features.device)
    return features[idx].reshape(idx.shape[0], idx.shape[1] * layers, channels)


class WindowedFeatures:
    """(T, layers, channels) features computed one encoder window at a time on demand, the two
    most recent windows kept. Subclasses give the positions each window keeps and compute one
    window in :meth:`compute_window`.

    Supports what :func:`frame_windows` needs: ``shape``, ``ndim``, ``device`` and indexing with
    an integer position tensor (positions of at most a few windows at a time).
    """

    def __init__(self, kept: list[int], layers: int, channels: int):
        self.kept = kept
        self.starts = np.concatenate([[0], np.cumsum(kept)]).astype(np.int64)
        total = int(self.starts[-1])
        if total == 0:
            raise AudioError("audio too short to compute features")
        self.shape = (total, layers, channels)
        self.ndim = 3
        self.device = torch.device("cpu")
        self._cache: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.shape[0]

    def compute_window(self, k: int) -> torch.Tensor:
        """(kept[k], layers, channels) float32 features of window ``k``."""
        raise NotImplementedError

    def _get_window(self, k: int) -> torch.Tensor:
        if k not in self._cache:
            while len(self._cache) >= 2:
                self._cache.pop(next(iter(self._cache)))
            self._cache[k] = self.compute_window(k)
        return self._cache[k]

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        idx = torch.as_tensor(idx, dtype=torch.int64)
        flat = idx.reshape(-1)
        window = torch.from_numpy(np.searchsorted(self.starts, flat.numpy(), side="right") - 1)
        out = torch.empty((flat.numel(), *self.shape[1:]), dtype=torch.float32)
        for k in torch.unique(window).tolist():
            sel = window == k
            out[sel] = self._get_window(k)[flat[sel] - int(self.starts[k])]
        return out.reshape(*idx.shape, *self.shape[1:])


class LazyFeatures(WindowedFeatures):
    """Whisper features of a local :class:`AudioEncoder`, one 30 s window at a time."""

    def __init__(self, encoder: AudioEncoder, mel: torch.Tensor):
        self.encoder = encoder
        self.mel = mel
        super().__init__(
            encoder.kept_positions(mel.shape[1]),
            encoder.dims.n_audio_layer + 1,
            encoder.dims.n_audio_state,
        )

    def compute_window(self, k: int) -> torch.Tensor:
        return self.encoder.window_features(self.mel, k, self.kept[k])


# --------------------------------------------------------------------------------------------
# the encoder


class AudioEncoder:
    """Whisper-tiny feature extractor: waveform -> (T, 5, 384) -> per-frame (N, 50, 384)."""

    def __init__(
        self,
        encoder: WhisperEncoder,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.encoder = encoder.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        self.dims = encoder.dims

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> AudioEncoder:
        """Load an OpenAI Whisper checkpoint (``{"dims", "model_state_dict"}``, e.g. ``tiny.pt``).

        Only ``encoder.*`` weights are used; they must match exactly (see
        :func:`lipsync.checkpoints.whisper_encoder_state_dict`).
        """
        return cls(read_whisper_checkpoint(path), device=device, dtype=dtype)

    @classmethod
    def from_state_dict(
        cls,
        state: dict[str, torch.Tensor],
        dims: dict | WhisperDims,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> AudioEncoder:
        return cls(load_whisper_encoder(state, dims), device=device, dtype=dtype)

    # ----------------------------------------------------------------------------------------

    @property
    def window_frames(self) -> int:
        """Mel frames per encoder window (3000 for the official models: 30 s)."""
        return 2 * self.dims.n_audio_ctx

    def kept_positions(self, num_mel_frames: int) -> list[int]:
        """Feature positions each encoder window of a clip contributes (its valid frames / 2)."""
        win = self.window_frames
        return [min(win, num_mel_frames - s) // 2 for s in range(0, num_mel_frames, win)]

    def features(self, wav: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Per-20-ms features of a 16 kHz mono float waveform: (T, n_layer + 1, n_state) float32.

        Layer 0 is the encoder input embedding, layers 1.. the residual block outputs. The
        result lives on the CPU whatever the encoder device.
        """
        wav = as_waveform(wav)
        mel = log_mel_spectrogram(wav, self.dims.n_mels)  # (n_mels, M)
        kept = self.kept_positions(mel.shape[1])
        total = sum(kept)
        if total == 0:
            raise AudioError(
                f"audio too short: {wav.shape[0]} samples (need at least {MIN_SAMPLES} at 16 kHz)"
            )
        n_layers = self.dims.n_audio_layer + 1
        out = torch.empty(total, n_layers, self.dims.n_audio_state, dtype=torch.float32)
        pos = 0
        for k, n in enumerate(kept):
            out[pos : pos + n] = self.window_features(mel, k, n)
            pos += n
        return out

    def lazy_features(self, wav: np.ndarray | torch.Tensor) -> LazyFeatures:
        """Like :meth:`features`, but each 30 s encoder window is computed when first indexed
        (and only the two most recent are kept): bounded memory for hours of audio. The values
        are identical to :meth:`features`."""
        wav = as_waveform(wav)
        mel = log_mel_spectrogram(wav, self.dims.n_mels)  # (n_mels, M): 32 KB per second
        return LazyFeatures(self, mel)

    def window_features(self, mel: torch.Tensor, k: int, kept: int) -> torch.Tensor:
        """Features of encoder window ``k`` of a normalised log-mel spectrogram (n_mels, M):
        (kept, n_layer + 1, n_state) float32 on the CPU. The window is zero-padded to 30 s in
        the normalised log-mel domain, as the reference pads it."""
        win = self.window_frames
        seg = mel[:, k * win : (k + 1) * win]
        seg = F.pad(seg, (0, win - seg.shape[1]))  # zeros in normalised log-mel units
        seg = seg[None].to(device=self.device, dtype=self.dtype)
        with torch.inference_mode():
            layers = self.encoder.forward_layers(seg)[0, :, :kept]  # (L, kept, C)
        return layers.transpose(0, 1).float().cpu()

    def frame_windows(
        self,
        features: torch.Tensor,
        fps: float = FPS,
        *,
        start: int = 0,
        stop: int | None = None,
    ) -> torch.Tensor:
        """Per-video-frame windows (N, 50, 384); see :func:`frame_windows`."""
        return frame_windows(features, fps, start=start, stop=stop)

    def num_windows(self, features: torch.Tensor, fps: float = FPS) -> int:
        return num_frame_windows(features.shape[0], fps)


def as_waveform(
    wav: np.ndarray | torch.Tensor, min_samples: int = MIN_SAMPLES, keep_device: bool = False
) -> torch.Tensor:
    """A 1-D float32 tensor of a mono waveform in [-1, 1] (on the CPU unless ``keep_device``), or
    an :class:`AudioError` (not float, not mono, empty, shorter than ``min_samples``, NaN/inf
    samples)."""
    if isinstance(wav, torch.Tensor):
        wav = wav.detach() if keep_device else wav.detach().cpu()
        is_float = wav.is_floating_point()
    else:
        wav = np.asarray(wav)
        is_float = np.issubdtype(wav.dtype, np.floating)
    if not is_float:
        raise AudioError(f"expected a float waveform in [-1, 1], got dtype {wav.dtype}")
    if wav.ndim == 2 and 1 in wav.shape:
        wav = wav.reshape(-1)
    if wav.ndim != 1:
        raise AudioError(f"expected a mono waveform (1-D), got shape {tuple(wav.shape)}")
    wav = torch.as_tensor(wav, dtype=torch.float32)
    if wav.shape[0] == 0:
        raise AudioError("audio is empty (zero samples)")
    if wav.shape[0] < min_samples:
        raise AudioError(
            f"audio too short: {wav.shape[0]} samples (need at least {min_samples} at 16 kHz)"
        )
    if not torch.isfinite(wav).all():
        raise AudioError("audio contains NaN or infinite samples")
    return wav
