"""Audio-visual sync of a talking face: SyncNet over an offset search (LSE-C / LSE-D style).

For each window of F = 16 video frames starting at frame ``s`` (every ``stride`` frames) the
SyncNet embeds the lower half of the aligned faces, ``v[s]``, and for every audio position ``t``
the mel window of frames ``t … t + F - 1``, ``a[t]``. For offsets ``j`` in ``-K … K`` (K = 15
frames) the distance ``d[s, j] = ‖v[s] - a[s + j]‖`` (embeddings are unit vectors, so
``d = sqrt(2 - 2 cos)``, in [0, 2]). Averaged over the windows, ``D[j] = mean_s d[s, j]``:

* **offset** = ``argmin_j D[j]`` in frames, **positive when the audio lags the video** (the
  sound of video frame ``s`` is heard at frame ``s + offset``);
* **distance** (LSE-D) = ``min_j D[j]``: lower is better;
* **confidence** (LSE-C) = ``median_j D[j] - min_j D[j]``: higher is better.

Per window the same numbers from ``d[s, ·]`` alone (its own offset and confidence) and
``d[s, offset]`` are reported too. Only windows whose 2K + 1 audio windows all lie inside the
audio and whose 16 frames all have a usable face count, so a clip needs at least F + 2K = 46
frames (1.84 s) of face and audio.

This is the protocol of Chung & Zisserman's SyncNet evaluation (used by Wav2Lip, LatentSync…
for LSE-C / LSE-D), computed with a *StableSyncNet* (16-frame windows, 2048-d or smaller
embeddings) instead of the original 5-frame SyncNet. Numbers are only comparable between runs
of the same SyncNet checkpoint: not with published LSE-C / LSE-D values.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lipsync.audio import load_audio, syncnet_mel, syncnet_mel_start, syncnet_mel_window_length
from lipsync.checkpoints import load_syncnet
from lipsync.errors import CheckpointNotFoundError, MediaError, NoFaceError, VideoError
from lipsync.eval.faces import track_and_crop
from lipsync.media import read_frames
from lipsync.models.syncnet import StableSyncNet

FPS = 25
DEFAULT_MAX_OFFSET = 15
NOT_COMPARABLE = (
    "numbers from this SyncNet are comparable only with other runs of the same SyncNet "
    "checkpoint, not with published LSE-C / LSE-D (which use the original 5-frame SyncNet)"
)
_WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
PACKAGED_SYNCNET = _WEIGHTS_DIR / "syncnet_synth_small.safetensors"


def default_syncnet_path() -> Path:
    """``$LIPSYNC_SYNCNET``, else the SyncNet shipped in the package (ours, see docs/EVAL.md)."""
    env = os.environ.get("LIPSYNC_SYNCNET")
    path = Path(env).expanduser() if env else PACKAGED_SYNCNET
    if not path.is_file():
        raise CheckpointNotFoundError(
            f"no SyncNet checkpoint at {path}: pass --syncnet FILE (a file from "
            "lipsync train syncnet, or the official stable_syncnet.pt)"
        )
    return path


@dataclass(frozen=True)
class WindowScore:
    start: int  # first video frame of the window
    offset: int  # this window's own best offset (frames)
    confidence: float  # this window's median - min distance
    distance: float  # distance at the clip's offset

    @property
    def time(self) -> float:
        return self.start / FPS


@dataclass
class SyncResult:
    offset: int
    confidence: float
    distance: float
    syncnet: str
    offsets: list[int]
    mean_distances: list[float]  # D[j] for each offset
    windows: list[WindowScore] = field(repr=False)
    frames: int = 0
    frames_with_face: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "offset": self.offset,
            "confidence": self.confidence,
            "distance": self.distance,
            "syncnet": self.syncnet,
            "frames": self.frames,
            "frames_with_face": self.frames_with_face,
            "windows": len(self.windows),
            "offsets": self.offsets,
            "mean_distances": self.mean_distances,
            "per_window": [
                {
                    "start": w.start,
                    "time": w.time,
                    "offset": w.offset,
                    "confidence": w.confidence,
                    "distance": w.distance,
                }
                for w in self.windows
            ],  # fmt: skip
            "note": NOT_COMPARABLE,
        }


def as_image_windows(crops: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Lower-half crops, (T, h, w, 3) uint8 or (T, 3, h, w) float in [-1, 1] -> (T, 3, h, w)
    float32 in [-1, 1]."""
    t = torch.as_tensor(crops)
    if t.ndim != 4:
        raise ValueError(f"crops must be (T, h, w, 3) uint8 or (T, 3, h, w) float, got {t.shape}")
    if t.dtype == torch.uint8:
        if t.shape[-1] != 3:
            raise ValueError(f"uint8 crops must be (T, h, w, 3), got {tuple(t.shape)}")
        return t.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if t.shape[1] != 3:
        raise ValueError(f"float crops must be (T, 3, h, w), got {tuple(t.shape)}")
    return t.float()


class SyncScorer:
    """A SyncNet ready to score clips. ``SyncScorer.from_checkpoint(path)`` then
    ``score(lower_half_crops, wav16k)``."""

    def __init__(
        self,
        model: StableSyncNet,
        name: str,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
    ):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.name = name
        self.batch_size = batch_size
        self.num_frames = model.config.num_frames

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        config: dict | None = None,
        batch_size: int = 64,
    ) -> SyncScorer:
        """Load a SyncNet file (ours or the official ``stable_syncnet.pt``; default: see
        :func:`default_syncnet_path`) on ``device`` (default: CUDA if present)."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, info = load_syncnet(path or default_syncnet_path(), config=config)
        return cls(model, info["name"], device, batch_size)

    # -- embeddings ----------------------------------------------------------------------

    def _batched(self, fn, items: torch.Tensor) -> torch.Tensor:
        out = []
        amp = self.device.type == "cuda"
        with (
            torch.inference_mode(),
            torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp),
        ):
            for i in range(0, len(items), self.batch_size):
                out.append(fn(items[i : i + self.batch_size].to(self.device)).float())
        return torch.cat(out) if out else torch.zeros(0)

    def embed_video(self, frames: torch.Tensor, starts: list[int]) -> torch.Tensor:
        """(T, 3, h, w) in [-1, 1] -> (len(starts), C): one embedding per 16-frame window."""
        size = self.model.config.image_size
        if tuple(frames.shape[-2:]) != size:
            frames = F.interpolate(frames, size=size, mode="bilinear", antialias=True)
        f = self.num_frames
        windows = torch.stack([frames[s : s + f].reshape(-1, *size) for s in starts])
        return self._batched(self.model.encode_image, windows)

    def embed_audio(self, mel: torch.Tensor, starts: list[int]) -> torch.Tensor:
        """(80, M) SyncNet mel -> (len(starts), C): one embedding per video-frame position."""
        length = syncnet_mel_window_length(self.num_frames, FPS)
        windows = torch.stack(
            [mel[:, syncnet_mel_start(t, FPS) : syncnet_mel_start(t, FPS) + length] for t in starts]
        )[:, None]
        return self._batched(self.model.encode_audio, windows)

    # -- scoring -------------------------------------------------------------------------

    def score(
        self,
        lower_half_crops: np.ndarray | torch.Tensor,
        wav16k: np.ndarray | torch.Tensor,
        *,
        usable: np.ndarray | None = None,
        max_offset: int = DEFAULT_MAX_OFFSET,
        stride: int = 1,
    ) -> SyncResult:
        """Sync of a clip: ``lower_half_crops`` (T frames at 25 fps, see :func:`as_image_windows`)
        against ``wav16k`` (16 kHz mono float, starting with frame 0). ``usable`` (T,) marks
        frames with a face (default: all). See the module docstring for the numbers."""
        if max_offset < 0 or stride < 1:
            raise ValueError("max_offset must be >= 0 and stride >= 1")
        frames = as_image_windows(lower_half_crops)
        n = len(frames)
        usable = np.ones(n, dtype=bool) if usable is None else np.asarray(usable, dtype=bool)
        mel = syncnet_mel(wav16k).cpu()
        f, k = self.num_frames, max_offset
        length = syncnet_mel_window_length(f, FPS)
        # audio positions t whose mel window fits: start(t) + length <= mel frames
        n_audio = 0
        while syncnet_mel_start(n_audio, FPS) + length <= mel.shape[1]:
            n_audio += 1
        # a window of frames with no face anywhere in it cannot be scored
        bad = np.concatenate([[0], np.cumsum(~usable)])
        starts = [
            s
            for s in range(k, n - f + 1, stride)
            if s + k <= n_audio - 1 and bad[s + f] - bad[s] == 0
        ]
        if not starts:
            need = f + 2 * k
            if not usable.any():
                raise NoFaceError("no frame has a usable face")
            raise MediaError(
                f"clip too short to score: a ±{k}-frame offset search needs {need} frames "
                f"({need / FPS:.2f} s) of continuous face and audio; got {n} video frames, "
                f"{n_audio + f - 1} of audio, {int(usable.sum())} with a face"
            )
        audio_pos = list(range(starts[0] - k, starts[-1] + k + 1))
        v = self.embed_video(frames, starts)  # (S, C)
        a = self.embed_audio(mel, audio_pos)  # (A, C)
        idx = torch.tensor(starts)[:, None] - audio_pos[0] + torch.arange(-k, k + 1)[None]
        d = (v[:, None, :] - a[idx]).norm(dim=-1).double()  # (S, 2K+1)
        mean = d.mean(dim=0)
        j = int(mean.argmin())
        own = d.argmin(dim=1)
        windows = [
            WindowScore(
                start=s,
                offset=int(own[i]) - k,
                confidence=float(d[i].median() - d[i].min()),
                distance=float(d[i, j]),
            )
            for i, s in enumerate(starts)
        ]
        return SyncResult(
            offset=j - k,
            confidence=float(mean.median() - mean.min()),
            distance=float(mean.min()),
            syncnet=self.name,
            offsets=list(range(-k, k + 1)),
            mean_distances=[float(x) for x in mean],
            windows=windows,
            frames=n,
            frames_with_face=int(usable.sum()),
        )


def aligned_lower_halves(video: str | os.PathLike, resolution: int) -> np.ndarray:
    """Frames of a video that already shows aligned face crops (a processed corpus segment),
    resized to ``resolution``², lower halves: (T, R/2, R, 3) uint8."""
    frames = read_frames(video, fps=FPS)
    if not len(frames):
        raise VideoError(f"no video frames in {video}")
    t = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    if tuple(t.shape[-2:]) != (resolution, resolution):
        t = F.interpolate(t, size=(resolution, resolution), mode="bilinear", antialias=True)
    t = t[:, :, resolution // 2 :].round().clamp(0, 255).byte()
    return t.permute(0, 2, 3, 1).numpy()


def score_video(
    scorer: SyncScorer,
    video: str | os.PathLike,
    audio: str | os.PathLike | None = None,
    *,
    aligned: bool = False,
    max_offset: int = DEFAULT_MAX_OFFSET,
    stride: int = 1,
    min_face_size: int = 64,
    on_frames=None,
) -> SyncResult:
    """Sync of ``video`` against ``audio`` (default: the video's own audio track).

    ``aligned=True``: the video already shows aligned face crops (no face tracking).
    """
    wav = load_audio(audio if audio is not None else video)
    resolution = scorer.model.config.resolution
    if aligned:
        crops, usable = aligned_lower_halves(video, resolution), None
    else:
        faces = track_and_crop(video, resolution, min_face_size=min_face_size, on_frames=on_frames)
        crops, usable = faces.lower, faces.usable
    return scorer.score(crops, wav, usable=usable, max_offset=max_offset, stride=stride)
