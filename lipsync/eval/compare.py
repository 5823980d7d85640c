"""Reconstruction metrics: a lip-synced output against the original video (same audio).

Frames are decoded at 25 fps and compared pairwise (the shorter video sets the count; both must
have the same frame size). MediaPipe FaceMesh finds the tracked face in both.

* ``psnr`` / ``ssim``: whole frame (PSNR from the MSE pooled over all frames; SSIM the mean of
  per-frame SSIM, :mod:`lipsync.eval.image`).
* ``mouth_psnr`` / ``mouth_ssim``: the same inside the mouth box: the bounding box of the
  reference's 40 lip landmarks, widened by 30 % on each side.
* ``landmark_error``: mean distance between the output's and the reference's lip landmarks, in
  % of the reference's outer-eye-corner distance (frames with a face in both).
* ``lip_opening_corr``: Pearson correlation of the inner-lip opening (landmarks 13–14, divided by
  the eye distance) of output and reference over time.
* ``mouth_flicker``: mean |(O_t − O_t−1) − (R_t − R_t−1)| in the mouth box, in 8-bit levels: the
  frame-to-frame change the output has that the reference does not (0 = same motion).
* ``fid`` (with ``fid_weights``): Fréchet distance of Inception pool features of the output's and
  the reference's frames. ``fvd`` (with ``fvd_weights``): Fréchet distance of I3D features of
  non-overlapping 16-frame clips. Both take the TorchScript networks the StyleGAN2-ADA /
  StyleGAN-V metrics use (``inception-2015-12-05.pt``, ``i3d_torchscript.pt``); with one video
  they are estimated from few samples and only comparable between runs of the same clip.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lipsync.errors import CheckpointError, CheckpointNotFoundError, MediaError, VideoError
from lipsync.eval.image import ssim
from lipsync.face.detect import MediaPipeDetector
from lipsync.media import iter_frames, probe

FPS = 25
LIPS = (
    0, 13, 14, 17, 37, 39, 40, 61, 78, 80, 81, 82, 84, 87, 88, 91, 95, 146, 178, 181, 185, 191,
    267, 269, 270, 291, 308, 310, 311, 312, 314, 317, 318, 321, 324, 375, 402, 405, 409, 415,
)  # fmt: skip  # mediapipe FACEMESH_LIPS
UPPER_INNER, LOWER_INNER = 13, 14
EYE_OUTER = (33, 263)
MOUTH_MARGIN = 0.3
FVD_CLIP = 16


@dataclass
class CompareResult:
    frames: int
    frames_with_landmarks: int
    psnr: float
    ssim: float
    mouth_psnr: float | None
    mouth_ssim: float | None
    landmark_error: float | None  # % of the eye distance
    lip_opening_corr: float | None
    mouth_flicker: float | None  # 8-bit levels
    fid: float | None = None
    fvd: float | None = None
    notes: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["notes"] = list(self.notes)
        # JSON has no infinity (identical frames): null
        return {k: None if _nonfinite(v) else v for k, v in d.items()}


def _nonfinite(v: object) -> bool:
    return isinstance(v, float) and not math.isfinite(v)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a (n, d) and b (m, d):
    ``|μa − μb|² + tr(Σa + Σb − 2 (Σa^½ Σb Σa^½)^½)``, the square root through eigenvalues."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or len(b) < 2:
        raise ValueError("need at least 2 samples on each side for a Fréchet distance")
    mu_a, mu_b = a.mean(0), b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(sa)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root_a @ sb @ root_a)
    cross = np.sqrt(np.clip(inner, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * cross)


def load_feature_network(path: str | os.PathLike | None, what: str, flag: str):
    """A TorchScript feature network (Inception for FID, I3D for FVD), or one clear error."""
    if path is None:
        raise CheckpointNotFoundError(
            f"{what} needs its network's weights: pass {flag} FILE (the TorchScript file the "
            "StyleGAN2-ADA / StyleGAN-V metrics use); they are not downloaded automatically"
        )
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointNotFoundError(f"{flag}: file not found: {path}")
    try:
        return torch.jit.load(str(path), map_location="cpu").eval()
    except (RuntimeError, ValueError) as e:
        raise CheckpointError(f"{flag} {path} is not a TorchScript network: {e}") from e


def _mouth_box(lm: np.ndarray, h: int, w: int) -> tuple[int, int, int, int]:
    pts = lm[list(LIPS)]
    (x0, y0), (x1, y1) = pts.min(0), pts.max(0)
    mx, my = MOUTH_MARGIN * (x1 - x0), MOUTH_MARGIN * (y1 - y0 + 0.2 * (x1 - x0))
    x0, x1 = int(max(0, x0 - mx)), int(min(w, math.ceil(x1 + mx)))
    y0, y1 = int(max(0, y0 - my)), int(min(h, math.ceil(y1 + my)))
    # SSIM needs 11×11 at least
    if x1 - x0 < 16:
        x0, x1 = max(0, min(x0, w - 16)), min(w, max(x0, 0) + 16)
    if y1 - y0 < 16:
        y0, y1 = max(0, min(y0, h - 16)), min(h, max(y0, 0) + 16)
    return x0, y0, x1, y1


def _eye_distance(lm: np.ndarray) -> float:
    return float(np.linalg.norm(lm[EYE_OUTER[0]] - lm[EYE_OUTER[1]]))


def _pearson(x: list[float], y: list[float]) -> float | None:
    if len(x) < 3:
        return None
    a, b = np.asarray(x), np.asarray(y)
    if a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def _unit(frames: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(frames).to(device).permute(0, 3, 1, 2).double() / 255.0


def compare_videos(
    out: str | os.PathLike,
    ref: str | os.PathLike,
    *,
    fid_weights: str | os.PathLike | None = None,
    fvd_weights: str | os.PathLike | None = None,
    want_fid: bool = False,
    want_fvd: bool = False,
    max_frames: int | None = None,
    device: str | torch.device | None = None,
    on_frames=None,
) -> CompareResult:
    """Compare ``out`` with ``ref`` (see the module docstring). Raises a MediaError subclass for
    unreadable or mismatched input, a CheckpointError for missing FID/FVD weights."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    inception = i3d = None
    if want_fid or fid_weights is not None:
        inception = load_feature_network(fid_weights, "FID", "--fid-weights").to(dev)
    if want_fvd or fvd_weights is not None:
        i3d = load_feature_network(fvd_weights, "FVD", "--fvd-weights").to(dev)
    info_o, info_r = probe(out, error=VideoError), probe(ref, error=VideoError)
    for info, name in ((info_o, out), (info_r, ref)):
        if not info.has_video:
            raise VideoError(f"no video stream in {name}")
    if (info_o.width, info_o.height) != (info_r.width, info_r.height):
        raise MediaError(
            f"frame sizes differ: {out} is {info_o.width}x{info_o.height}, {ref} is "
            f"{info_r.width}x{info_r.height}; compare outputs with the video they were made from"
        )
    mse_sum = n_px = 0.0
    ssims: list[float] = []
    m_mse = m_px = 0.0
    m_ssims: list[float] = []
    lm_err: list[float] = []
    open_o: list[float] = []
    open_r: list[float] = []
    flicker: list[float] = []
    feats_o: list[torch.Tensor] = []
    feats_r: list[torch.Tensor] = []
    clips_o: list[torch.Tensor] = []
    clips_r: list[torch.Tensor] = []
    pending_o: list[np.ndarray] = []
    pending_r: list[np.ndarray] = []
    prev: tuple[np.ndarray, np.ndarray] | None = None
    n = with_lm = 0
    with (
        MediaPipeDetector() as det_o,
        MediaPipeDetector() as det_r,
        iter_frames(out, fps=FPS, batch=16, stop=max_frames) as read_o,
        iter_frames(ref, fps=FPS, batch=16, stop=max_frames) as read_r,
    ):
        it_r = iter(read_r)
        for batch_o in read_o:
            batch_r = next(it_r, None)
            if batch_r is None:
                break
            k = min(len(batch_o.frames), len(batch_r.frames))
            fo, fr = batch_o.frames[:k], batch_r.frames[:k]
            to, tr = _unit(fo, dev), _unit(fr, dev)
            d = to - tr
            mse_sum += float((d * d).sum())
            n_px += d.numel()
            ssims.extend(ssim(to[i], tr[i]) for i in range(k))
            faces_o = [det_o.tracker.update(x).face for x in det_o.detect_all(fo)]
            faces_r = [det_r.tracker.update(x).face for x in det_r.detect_all(fr)]
            for i in range(k):
                a, b = faces_o[i], faces_r[i]
                if b is None:
                    prev = None
                    continue
                x0, y0, x1, y1 = _mouth_box(b.landmarks, *fr.shape[1:3])
                mo, mr = to[i, :, y0:y1, x0:x1], tr[i, :, y0:y1, x0:x1]
                md = mo - mr
                m_mse += float((md * md).sum())
                m_px += md.numel()
                m_ssims.append(ssim(mo, mr))
                cur = (fo[i].astype(np.int16), fr[i].astype(np.int16))
                if prev is not None:
                    do = cur[0][y0:y1, x0:x1] - prev[0][y0:y1, x0:x1]
                    dr = cur[1][y0:y1, x0:x1] - prev[1][y0:y1, x0:x1]
                    flicker.append(float(np.abs(do - dr).mean()))
                prev = cur
                if a is None:
                    continue
                eye = _eye_distance(b.landmarks)
                if eye <= 0:
                    continue
                with_lm += 1
                diff = a.landmarks[list(LIPS)] - b.landmarks[list(LIPS)]
                lm_err.append(100.0 * float(np.linalg.norm(diff, axis=1).mean()) / eye)
                for lm, dest in ((a.landmarks, open_o), (b.landmarks, open_r)):
                    dest.append(float(np.linalg.norm(lm[UPPER_INNER] - lm[LOWER_INNER])) / eye)
            if inception is not None:
                with torch.inference_mode():
                    for f, dest in ((fo, feats_o), (fr, feats_r)):
                        x = torch.from_numpy(f).to(dev).permute(0, 3, 1, 2).contiguous()
                        dest.append(inception(x, return_features=True).float().cpu())
            if i3d is not None:
                pending_o.extend(fo)
                pending_r.extend(fr)
                while len(pending_o) >= FVD_CLIP:
                    for pend, dest in ((pending_o, clips_o), (pending_r, clips_r)):
                        clip = torch.from_numpy(np.stack(pend[:FVD_CLIP])).to(dev)
                        clip = clip.permute(3, 0, 1, 2)[None].contiguous()  # (1, 3, T, H, W)
                        with torch.inference_mode():
                            feat = i3d(clip, rescale=True, resize=True, return_features=True)
                        dest.append(feat.float().cpu())
                        del pend[:FVD_CLIP]
            n += k
            if on_frames is not None:
                on_frames(k)
    if n == 0:
        raise VideoError(f"no frames to compare in {out} and {ref}")
    notes = []
    if info_o.output_frames(FPS) != info_r.output_frames(FPS):
        notes.append(f"frame counts differ; compared the first {n}")
    if not with_lm:
        notes.append("no frame had a face in both videos: landmark metrics left empty")
    fid = fvd = None
    if inception is not None:
        fid = frechet_distance(torch.cat(feats_o).numpy(), torch.cat(feats_r).numpy())
        notes.append(f"FID from {n} frame pairs (few samples: compare runs of the same clip only)")
    if i3d is not None:
        if len(clips_o) < 2:
            raise MediaError(f"FVD needs at least {2 * FVD_CLIP} frames, got {n}")
        fvd = frechet_distance(torch.cat(clips_o).numpy(), torch.cat(clips_r).numpy())
        notes.append(f"FVD from {len(clips_o)} clips of {FVD_CLIP} frames")
    mse = mse_sum / n_px
    return CompareResult(
        frames=n,
        frames_with_landmarks=with_lm,
        psnr=math.inf if mse == 0 else 10 * math.log10(1.0 / mse),
        ssim=float(np.mean(ssims)),
        mouth_psnr=(math.inf if m_mse == 0 else 10 * math.log10(m_px / m_mse)) if m_px else None,
        mouth_ssim=float(np.mean(m_ssims)) if m_ssims else None,
        landmark_error=float(np.mean(lm_err)) if lm_err else None,
        lip_opening_corr=_pearson(open_o, open_r),
        mouth_flicker=float(np.mean(flicker)) if flicker else None,
        fid=fid,
        fvd=fvd,
        notes=tuple(notes),
    )
