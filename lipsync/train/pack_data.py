"""A training pack held on the GPU: frames decoded once, windows cut by indexing.

The demo corpus (tens of minutes of 256 px faces) fits in GPU memory as uint8 (12 GB for 40
minutes), so instead of a DataLoader every batch is a gather from device tensors: no decode, no
host copies, the GPU never waits. Everything a U-Net window needs is precomputed once:

* Whisper features of every segment (the frozen audio encoder), (T, 5, 384) at 50 Hz;
* SyncNet mel spectrograms of every segment, (80, M) at 80 Hz;
* after the VAE exists, the posterior mean and std of every frame and of every masked frame.

Windows follow the reference's dataset rules: F consecutive frames of one segment (segments
shorter than 3·F are skipped), the reference window another F frames of the same segment that
do not overlap (start outside (s − F, s + F)); audio windows are each frame's 10 feature positions
around ``2·i`` clamped to the segment (:func:`lipsync.audio.frame_window_indices`), the mel window
starts at ``int(80·s/25)`` and has ``ceil(F·16/5)`` frames. Sampling is a function of (seed,
step) only, so a resumed run draws the same batches.
"""

from __future__ import annotations

import numpy as np
import torch

from lipsync.audio import AudioEncoder, syncnet_mel, syncnet_mel_window_length
from lipsync.data.synth.phones import PHONES
from lipsync.face.mask import make_mask
from lipsync.models.vae import Vae
from lipsync.train.loop import sample_seed
from lipsync.train.pack import SAMPLES_PER_FRAME, Pack

# what PackData.state() holds besides plain attributes (moments are a dict of pairs)
_TENSORS = ("frames", "visemes", "phones", "seg_start", "seg_len", "mask", "window_seg",
            "window_start", "features", "feat_start", "feat_len", "mel", "mel_start")  # fmt: skip


class PackData:
    """One split of a pack on ``device`` (module docstring)."""

    def __init__(self, pack: Pack, split: str, device: torch.device, num_frames: int = 16):
        self.split, self.device, self.num_frames = split, device, num_frames
        segs = pack.split_segments(split)
        self.segment_ids = [s.id for s in segs]
        self.resolution = pack.resolution
        frames = torch.from_numpy(pack.frames[split])  # (N, R, R, 3) uint8
        self.frames = frames.to(device).permute(0, 3, 1, 2).contiguous()  # (N, 3, R, R)
        self.audio = pack.audio[split]
        self.visemes = torch.from_numpy(pack.visemes[split])
        # phone of every frame as an id of lipsync-phones/1 (PHONES; -1 unknown), on the device
        self.phones = torch.from_numpy(canonical_phones(pack, split)).to(device)
        self.seg_start = torch.tensor([s.start for s in segs], dtype=torch.int64)
        self.seg_len = torch.tensor([s.frames for s in segs], dtype=torch.int64)
        keep = torch.from_numpy(make_mask(self.resolution)).float()  # (R, R), 1 = keep
        self.mask = keep.to(device)
        # windows: every valid start of every long-enough segment
        f = num_frames
        usable = (self.seg_len >= 3 * f).nonzero().flatten()
        counts = self.seg_len[usable] - f + 1
        self.window_seg = torch.repeat_interleave(usable, counts)
        offsets = torch.cat([torch.arange(int(c)) for c in counts]) if len(counts) else counts
        self.window_start = offsets  # start within its segment
        self.features: torch.Tensor | None = None
        self.feat_start = self.feat_len = None
        self.mel: torch.Tensor | None = None
        self.mel_start = None
        self.moments: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    def __len__(self) -> int:
        return len(self.window_seg)

    # ---------------------------------------------------------------- sharing between processes

    def state(self) -> dict:
        """Everything this object holds (tensors on the CPU), for :meth:`from_state` in another
        process: the protocol runner prepares a split once and its workers load it."""
        out = {k: getattr(self, k) for k in ("split", "num_frames", "segment_ids", "resolution")}
        out["audio"] = torch.from_numpy(np.ascontiguousarray(self.audio))
        for k in _TENSORS:
            value = getattr(self, k)
            out[k] = value.cpu() if isinstance(value, torch.Tensor) else value
        if self.moments is not None:
            out["moments"] = {k: (m.cpu(), sd.cpu()) for k, (m, sd) in self.moments.items()}
        return out

    @classmethod
    def from_state(cls, state: dict, device: torch.device) -> PackData:
        self = cls.__new__(cls)
        self.device = torch.device(device)
        for k in ("split", "num_frames", "segment_ids", "resolution"):
            setattr(self, k, state[k])
        self.audio = state["audio"].numpy()
        on_device = ("frames", "phones", "mask", "features", "feat_start", "feat_len", "mel",
                     "mel_start")  # fmt: skip
        for k in _TENSORS:
            value = state.get(k)
            if isinstance(value, torch.Tensor) and k in on_device:
                value = value.to(self.device)
            setattr(self, k, value)
        moments = state.get("moments")
        self.moments = (
            None
            if moments is None
            else {k: (m.to(self.device), sd.to(self.device)) for k, (m, sd) in moments.items()}
        )
        return self

    @property
    def num_frames_total(self) -> int:
        return self.frames.shape[0]

    # ---------------------------------------------------------------- precomputation

    def segment_wav(self, i: int) -> np.ndarray:
        start, n = int(self.seg_start[i]), int(self.seg_len[i])
        return self.audio[start * SAMPLES_PER_FRAME : (start + n) * SAMPLES_PER_FRAME]

    def prepare_audio(self, encoder: AudioEncoder, dtype=torch.bfloat16) -> None:
        """Whisper features (frozen encoder) and SyncNet mels of every segment, on the device."""
        feats, mels, fstart, flen, mstart = [], [], [], [], []
        fpos = mpos = 0
        for i in range(len(self.segment_ids)):
            wav = self.segment_wav(i)
            feat = encoder.features(wav)  # (T, 5, 384) float32, CPU
            mel = syncnet_mel(torch.from_numpy(np.ascontiguousarray(wav)).to(self.device))
            feats.append(feat.to(self.device, dtype))
            mels.append(mel)
            fstart.append(fpos)
            flen.append(feat.shape[0])
            mstart.append(mpos)
            fpos += feat.shape[0]
            mpos += mel.shape[1]
        self.features = torch.cat(feats)  # (T_all, 5, 384)
        self.feat_start = torch.tensor(fstart, dtype=torch.int64, device=self.device)
        self.feat_len = torch.tensor(flen, dtype=torch.int64, device=self.device)
        self.mel = torch.cat(mels, dim=1)  # (80, M_all)
        self.mel_start = torch.tensor(mstart, dtype=torch.int64, device=self.device)

    @torch.no_grad()
    def prepare_latents(self, vae: Vae, batch: int = 256, dtype=torch.bfloat16) -> None:
        """Posterior mean/std (unscaled) of every frame and every masked frame."""
        out: dict[str, list[torch.Tensor]] = {
            "gt_mean": [],
            "gt_std": [],
            "masked_mean": [],
            "masked_std": [],
        }
        for i in range(0, self.num_frames_total, batch):
            x = self.pixels(
                torch.arange(i, min(i + batch, self.num_frames_total), device=self.device)
            )
            for name, images in (("gt", x), ("masked", x * self.mask)):
                with torch.autocast(self.device.type, torch.bfloat16,
                                    enabled=self.device.type == "cuda"):  # fmt: skip
                    dist = vae.autoencoder.encode(images.to(vae.dtype)).latent_dist
                out[f"{name}_mean"].append(dist.mean.to(dtype))
                out[f"{name}_std"].append(dist.std.to(dtype))
        cat = {k: torch.cat(v) for k, v in out.items()}
        self.moments = {
            "gt": (cat["gt_mean"], cat["gt_std"]),
            "masked": (cat["masked_mean"], cat["masked_std"]),
        }

    # ---------------------------------------------------------------- batches

    def pixels(self, index: torch.Tensor) -> torch.Tensor:
        """Frames ``index`` (any shape) as float in [-1, 1]: (*index.shape, 3, R, R)."""
        x = self.frames[index.reshape(-1)].float() / 127.5 - 1.0
        return x.reshape(*index.shape, *x.shape[1:])

    def sample_windows(self, seed: int, step: int, count: int) -> dict[str, torch.Tensor]:
        """``count`` windows for ``step``: segment, start, reference start (CPU int64)."""
        if len(self) == 0:
            raise ValueError(
                f"no segment of the {self.split} split has {3 * self.num_frames} frames"
            )
        g = torch.Generator().manual_seed(sample_seed(seed, step))
        pick = torch.randint(0, len(self), (count,), generator=g)
        return self.windows_at(pick, g)

    def windows_at(self, pick: torch.Tensor, g: torch.Generator) -> dict[str, torch.Tensor]:
        f = self.num_frames
        seg = self.window_seg[pick]
        start = self.window_start[pick]
        n = self.seg_len[seg]
        last = n - f  # last valid start
        lo = (start - f + 1).clamp(min=0)
        hi = torch.minimum(start + f - 1, last)
        blocked = hi - lo + 1
        r = (torch.rand(len(pick), generator=g) * (last + 1 - blocked)).long()
        ref = torch.where(r < lo, r, r + blocked)
        return {"seg": seg, "start": start, "ref": ref}

    def fixed_windows(self, count: int, seed: int = 0) -> dict[str, torch.Tensor]:
        """``count`` windows spread over the split (the same every call): for evaluation."""
        pick = torch.linspace(0, len(self) - 1, count).round().long()
        return self.windows_at(pick, torch.Generator().manual_seed(seed))

    def unet_batch(self, windows: dict[str, torch.Tensor], pixels: bool = False) -> dict:
        """UNetObjective's batch: latent moments (b·f, 4, h, w), mask, audio windows (b, f, 50,
        384), mel (b, 1, 80, 52) and, with ``pixels``, the target frames (b, f, 3, R, R)."""
        f, dev = self.num_frames, self.device
        seg = windows["seg"].to(dev)
        frame0 = self.seg_start.to(dev)[seg] + windows["start"].to(dev)  # global frame index
        ref0 = self.seg_start.to(dev)[seg] + windows["ref"].to(dev)
        k = torch.arange(f, device=dev)
        idx, ref_idx = (frame0[:, None] + k).reshape(-1), (ref0[:, None] + k).reshape(-1)
        m = self.moments
        batch = {
            "moments": {
                "gt": (m["gt"][0][idx], m["gt"][1][idx]),
                "masked": (m["masked"][0][idx], m["masked"][1][idx]),
                "ref": (m["gt"][0][ref_idx], m["gt"][1][ref_idx]),
            },
            "mask": self.mask[None, None].expand(len(seg), 1, *self.mask.shape),
            "audio_windows": self.audio_windows(seg, windows["start"].to(dev)),
            "mel": self.mel_windows(seg, windows["start"].to(dev)),
            "phones": self.phones[idx].reshape(len(seg), f),  # (b, f) PHONES ids, -1 unknown
        }
        if pixels:
            batch["frames"] = self.pixels(frame0[:, None] + k)
        return batch

    def audio_windows(self, seg: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """(b,) segments and window starts -> (b, F, 50, 384) Whisper windows (float32)."""
        f = self.num_frames
        frame = start[:, None] + torch.arange(f, device=self.device)  # (b, F) within segment
        pos = 2 * frame[..., None] + torch.arange(-4, 6, device=self.device)  # (b, F, 10)
        pos = torch.minimum(pos.clamp(min=0), self.feat_len[seg][:, None, None] - 1)
        tokens = self.features[self.feat_start[seg][:, None, None] + pos]  # (b, F, 10, 5, 384)
        return tokens.reshape(len(seg), f, 50, -1).float()

    def mel_windows(self, seg: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """(b,) segments and window starts -> (b, 1, 80, ceil(F·16/5)) SyncNet mel windows."""
        length = syncnet_mel_window_length(self.num_frames)
        first = (start.double() * 80.0 / 25.0).floor().long()  # int(80 · s / 25)
        cols = (
            self.mel_start[seg][:, None] + first[:, None] + torch.arange(length, device=self.device)
        )
        return self.mel[:, cols].permute(1, 0, 2)[:, None].float()  # (b, 1, 80, L)

    def random_frames(self, seed: int, step: int, count: int) -> torch.Tensor:
        """``count`` random frames for ``step`` as (count, 1, 3, R, R) floats (VAE training)."""
        g = torch.Generator().manual_seed(sample_seed(seed, step))
        idx = torch.randint(0, self.num_frames_total, (count,), generator=g).to(self.device)
        return self.pixels(idx)[:, None]


def mouth_weight(resolution: int, device) -> torch.Tensor:
    """(1, 1, R, R): 1 where the U-Net regenerates the face (mask 0), else 0."""
    keep = torch.from_numpy(make_mask(resolution)).float().to(device)
    return (1.0 - keep)[None, None]


def canonical_phones(pack: Pack, split: str) -> np.ndarray:
    """The pack's per-frame phones of ``split`` as ids of ``lipsync-phones/1`` (:data:`PHONES`),
    -1 where unknown. (A pack numbers phones by its own ``phone_inventory``.)"""
    inventory = pack.meta.get("phone_inventory", [])
    table = np.array([PHONES.index(p) if p in PHONES else -1 for p in inventory] + [-1])
    local = pack.phones[split]
    return table[np.where(local >= 0, local, len(inventory))].astype(np.int64)
