"""A compact, GPU-ready copy of a processed corpus: the demo recipe's training data.

The GPU machine that trains the demo bundle has neither PyAV nor a network, and the data must
travel with the repository (tens of MiB). A *pack* holds the processed corpus' face crops and
audio in a form that ``opencv-python`` (video) and ``soundfile`` (audio) decode there, small
enough to carry:

    pack.json           format "lipsync.trainpack/1": resolution, fps, the segments (split,
                        frames, where their frames and samples are), sizes, how it was encoded
    video-<split>-<k>.mp4   H.264 4:2:0, tagged BT.601 (what OpenCV's decoder assumes: decoded
                        identically by OpenCV and PyAV), the split's segments back to back,
                        at most ``chunk_frames`` frames per file (decoded in parallel)
    audio-<split>.ogg   Opus (``audio="opus"``; 32 kb/s speech by default) or
    audio-<split>.npz   int16 PCM, zlib (``audio="pcm"``: lossless, ~8x larger), 16 kHz mono,
                        the split's segments back to back, exactly frames·640 samples each
    labels.npz          per frame: ``visemes`` (float16, NaN unknown) and ``phones`` (int16
                        index into pack.json's ``phone_inventory``, -1 unknown)

:func:`write_pack` (CPU, PyAV) picks the video quality (x264 CRF) that fits ``max_mb``;
:func:`read_pack` decodes everything into uint8 / float32 arrays.

Several processes reading one pack (``torchrun``: one per GPU, and one launch after another)
need not decode it each: with ``cache`` (or ``$LIPSYNC_PACK_CACHE``) the decoded frames and
samples are written once as ``.npy`` files under ``CACHE/<hash of pack.json>/`` (atomically) and
memory-mapped afterwards, so the processes share one copy in the page cache.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from lipsync.audio import (
    syncnet_mel,
    syncnet_mel_start,
    syncnet_mel_window,
    syncnet_mel_window_length,
)
from lipsync.errors import ConfigError, MediaError

PACK_FORMAT = "lipsync.trainpack/1"
FPS = 25
SAMPLE_RATE = 16000
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640
AudioCodec = Literal["opus", "pcm"]


@dataclass
class PackSegment:
    id: str
    split: str
    frames: int
    start: int  # first frame in the split's frames (its audio starts at sample start * 640)
    identity: str | None = None
    voice: str | None = None
    sentence_id: str | None = None


@dataclass
class Pack:
    """A decoded pack: per split, all frames and samples back to back."""

    root: Path
    meta: dict[str, Any]
    segments: list[PackSegment]
    frames: dict[str, np.ndarray]  # split -> (N, R, R, 3) uint8
    audio: dict[str, np.ndarray]  # split -> (N * 640,) float32
    visemes: dict[str, np.ndarray]  # split -> (N, 5) float32 (NaN unknown)
    phones: dict[str, np.ndarray]  # split -> (N,) int64 (-1 unknown)

    @property
    def resolution(self) -> int:
        return int(self.meta["resolution"])

    def split_segments(self, split: str) -> list[PackSegment]:
        return [s for s in self.segments if s.split == split]


# --------------------------------------------------------------------------- writing


def _corpus_records(corpus: Path, splits: tuple[str, ...]) -> list[dict[str, Any]]:
    final = corpus / "final"
    if not final.is_dir():
        raise ConfigError(f"{corpus} is not a processed corpus (no final/ folder)")
    records = []
    for path in sorted(final.glob("*.json")):
        rec = json.loads(path.read_text())
        if rec.get("split") in splits:
            rec["_media"] = final / rec.get("media", f"{rec['id']}.mp4")
            records.append(rec)
    if not records:
        raise ConfigError(f"{corpus}/final holds no segments of the splits {', '.join(splits)}")
    return records


def _frame_labels(rec: dict[str, Any], inventory: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    n = int(rec["frames"])
    visemes = np.full((n, 5), np.nan, dtype=np.float32)
    phones = np.full(n, -1, dtype=np.int64)
    labels = rec.get("labels") or {}
    rows = (labels.get("visemes") or {}).get("per_frame") or []
    for i, row in enumerate(rows[:n]):
        visemes[i, : len(row)] = row[:5]
    centres = (np.arange(n) + 0.5) / FPS
    for ph in labels.get("phones") or []:
        idx = inventory.setdefault(ph["label"], len(inventory))
        phones[(centres >= ph["start"]) & (centres < ph["end"])] = idx
    return visemes, phones


def _decode_segment(rec: dict[str, Any], resolution: int) -> tuple[np.ndarray, np.ndarray]:
    from lipsync.audio import load_audio
    from lipsync.media import read_frames

    n = int(rec["frames"])
    frames = read_frames(rec["_media"])[:n]
    if frames.shape[1:3] != (resolution, resolution):
        raise MediaError(f"{rec['_media']}: frames {frames.shape[1:3]}, expected {resolution}²")
    if len(frames) < n:  # a short decode: repeat the last frame
        frames = np.concatenate([frames, np.repeat(frames[-1:], n - len(frames), 0)])
    wav = load_audio(rec["_media"])[: n * SAMPLES_PER_FRAME]
    wav = np.pad(wav, (0, n * SAMPLES_PER_FRAME - len(wav)))
    return frames, wav


def _encode_video(path: Path, frames: np.ndarray, crf: float) -> int:
    from lipsync.media import VideoWriter

    with VideoWriter(
        path,
        fps=FPS,
        size=(frames.shape[2], frames.shape[1]),
        crf=crf,
        preset="medium",
        colorspace="bt601",
        overwrite=True,
    ) as writer:
        for i in range(0, len(frames), 256):
            writer.write(frames[i : i + 256])
    return path.stat().st_size


def _encode_opus(path: Path, wav: np.ndarray, kbps: int) -> int:
    import av

    from lipsync.media import mux_encoded

    pcm = (np.clip(wav, -1, 1) * 32767).astype(np.int16)
    tmp = path.with_name(path.name + ".part")
    with av.open(str(tmp), "w", format="ogg") as container:
        stream = container.add_stream("libopus", rate=SAMPLE_RATE, layout="mono")
        stream.bit_rate = int(kbps * 1000)
        for i in range(0, len(pcm), SAMPLE_RATE * 10):
            frame = av.AudioFrame.from_ndarray(
                pcm[None, i : i + SAMPLE_RATE * 10], format="s16", layout="mono"
            )
            frame.sample_rate = SAMPLE_RATE
            frame.pts = i
            mux_encoded(container, stream, frame)
        mux_encoded(container, stream, None)
    os.replace(tmp, path)
    return path.stat().st_size


def _encode_pcm(path: Path, wav: np.ndarray) -> int:
    buf = io.BytesIO()
    np.savez_compressed(buf, pcm=(np.clip(wav, -1, 1) * 32767).astype(np.int16))
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)
    return path.stat().st_size


def write_pack(
    corpus: str | os.PathLike,
    out: str | os.PathLike,
    *,
    max_mb: float = 40.0,
    audio: AudioCodec = "opus",
    audio_kbps: int = 32,
    crf: float | None = None,
    splits: tuple[str, ...] = ("train", "val", "test"),
    chunk_frames: int = 4000,
    max_minutes: dict[str, float] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Pack the processed corpus ``corpus`` into ``out`` (module docstring).

    ``crf`` None: the x264 CRF is chosen so the whole pack fits ``max_mb`` (trial encodes of
    the first training frames, then one encode; raised by 2 and redone if still too big, up to
    CRF 40). ``max_minutes``: keep at most this much video per split (whole segments, in id
    order). Returns the pack's metadata (also ``out/pack.json``).
    """
    start = time.perf_counter()
    corpus, out = Path(corpus), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records = _corpus_records(corpus, splits)
    resolution = int(records[0].get("resolution") or 0)
    inventory: dict[str, int] = {}
    segments: list[PackSegment] = []
    wav_split: dict[str, list[np.ndarray]] = {}
    vis_split: dict[str, list[np.ndarray]] = {}
    ph_split: dict[str, list[np.ndarray]] = {}
    kept_frames: dict[str, int] = {}
    # which segments are kept, so that each split's frames can go straight into one array
    chosen: list[dict[str, Any]] = []
    for rec in records:
        split = rec["split"]
        limit = (max_minutes or {}).get(split)
        if limit is not None and kept_frames.get(split, 0) + rec["frames"] > limit * 60 * FPS:
            continue
        kept_frames[split] = kept_frames.get(split, 0) + rec["frames"]
        chosen.append(rec)
    if not resolution:
        resolution = _probe_resolution(chosen[0])
    # decoded frames live in memory-mapped scratch files beside the pack (60k frames at 256 px
    # are 12 GB: more than a small machine should hold twice), removed at the end
    frames_all: dict[str, np.ndarray] = {}
    for split, n in kept_frames.items():
        scratch = out / f".frames-{split}.u8"
        frames_all[split] = np.lib.format.open_memmap(
            scratch, mode="w+", dtype=np.uint8, shape=(n, resolution, resolution, 3)
        )
    kept_frames = {}
    for rec in chosen:
        split = rec["split"]
        frames, wav = _decode_segment(rec, resolution)
        visemes, phones = _frame_labels(rec, inventory)
        labels = rec.get("labels") or {}
        pos = kept_frames.get(split, 0)
        segments.append(
            PackSegment(
                id=rec["id"],
                split=split,
                frames=len(frames),
                start=pos,
                identity=labels.get("identity"),
                voice=_voice_name(labels.get("voice")),
                sentence_id=labels.get("sentence_id"),
            )
        )
        frames_all[split][pos : pos + len(frames)] = frames
        kept_frames[split] = pos + len(frames)
        wav_split.setdefault(split, []).append(wav)
        vis_split.setdefault(split, []).append(visemes)
        ph_split.setdefault(split, []).append(phones)
    wav_all = {s: np.concatenate(v) for s, v in wav_split.items()}
    log(
        f"pack: {sum(len(f) for f in frames_all.values())} frames in "
        f"{len(segments)} segments ({', '.join(f'{s} {len(f)}' for s, f in frames_all.items())})"
    )

    # audio and labels first: what is left of the budget goes to the video
    audio_bytes = 0
    for split, wav in wav_all.items():
        if audio == "opus":
            audio_bytes += _encode_opus(out / f"audio-{split}.ogg", wav, audio_kbps)
        else:
            audio_bytes += _encode_pcm(out / f"audio-{split}.npz", wav)
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        **{f"visemes_{s}": np.concatenate(v).astype(np.float16) for s, v in vis_split.items()},
        **{f"phones_{s}": np.concatenate(v).astype(np.int16) for s, v in ph_split.items()},
    )
    (out / "labels.npz").write_bytes(buf.getvalue())
    fixed = audio_bytes + len(buf.getvalue()) + 64 * 1024  # + pack.json
    budget = max_mb * 2**20 - fixed
    total_frames = sum(len(f) for f in frames_all.values())
    if budget <= 0:
        raise ConfigError(
            f"audio and labels alone take {fixed / 2**20:.1f} MiB of the {max_mb} MiB budget; "
            "raise --max-mb, lower --audio-kbps or pack fewer minutes"
        )
    if crf is None:
        crf = _fit_crf(frames_all, budget / total_frames, out, log)
    while True:
        video_bytes = 0
        for old in out.glob("video-*.mp4"):
            old.unlink()
        for split, frames in frames_all.items():
            for k, i in enumerate(range(0, len(frames), chunk_frames)):
                name = f"video-{split}-{k}.mp4"
                video_bytes += _encode_video(out / name, frames[i : i + chunk_frames], crf)
        if video_bytes <= budget or crf >= 40:
            break
        log(f"pack: CRF {crf:g} gives {video_bytes / 2**20:.1f} MiB of video, over budget")
        crf += 2
    meta = {
        "format": PACK_FORMAT,
        "source": str(corpus),
        "resolution": resolution,
        "fps": FPS,
        "sample_rate": SAMPLE_RATE,
        "audio": {"codec": audio, "kbps": audio_kbps if audio == "opus" else None},
        "video": {"codec": "h264", "crf": crf, "colorspace": "bt601", "chunk_frames": chunk_frames},
        "phone_inventory": sorted(inventory, key=inventory.get),
        "splits": {
            s: {
                "frames": len(f),
                "segments": sum(1 for x in segments if x.split == s),
                "minutes": round(len(f) / FPS / 60, 2),
            }
            for s, f in frames_all.items()
        },
        "segments": [asdict(s) for s in segments],
        "bytes": {"video": video_bytes, "audio": audio_bytes, "labels": len(buf.getvalue())},
        "seconds": round(time.perf_counter() - start, 1),
    }
    for split, frames in frames_all.items():
        del frames
        (out / f".frames-{split}.u8").unlink(missing_ok=True)
    frames_all.clear()
    tmp = out / "pack.json.part"
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(tmp, out / "pack.json")
    total = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    log(
        f"pack: {total / 2**20:.1f} MiB (video CRF {crf:g}: {video_bytes / 2**20:.1f} MiB, audio "
        f"{audio_bytes / 2**20:.1f} MiB) in {meta['seconds']} s"
    )
    return meta


def _voice_name(voice: Any) -> str | None:
    if isinstance(voice, dict):
        return "/".join(str(voice.get(k)) for k in ("name", "variant") if voice.get(k))
    return voice


def _probe_resolution(rec: dict[str, Any]) -> int:
    from lipsync.media import probe

    info = probe(rec["_media"])
    return int(info.video.height)


def _fit_crf(frames: dict[str, np.ndarray], bytes_per_frame: float, out: Path, log) -> float:
    """The lowest CRF (best quality) whose trial encode stays under ``bytes_per_frame``.

    x264's size falls about 2x per +6 CRF; two trial encodes of a sample of frames give the
    local slope, and the target CRF is interpolated (rounded up to 0.5)."""
    sample = np.concatenate([f[: max(250, len(f) // 20)] for f in frames.values()])[:1500]
    tmp = out / ".trial.mp4"
    sizes = {}
    for crf in (20.0, 28.0):
        sizes[crf] = _encode_video(tmp, sample, crf) / len(sample)
    tmp.unlink(missing_ok=True)
    slope = (math.log(sizes[28.0]) - math.log(sizes[20.0])) / 8.0  # log bytes per CRF step
    crf = 20.0 + (math.log(bytes_per_frame * 0.95) - math.log(sizes[20.0])) / slope
    crf = min(40.0, max(12.0, math.ceil(crf * 2) / 2))
    log(
        f"pack: trial sizes {sizes[20.0]:.0f} B/frame at CRF 20, {sizes[28.0]:.0f} at 28; "
        f"budget {bytes_per_frame:.0f} B/frame -> CRF {crf:g}"
    )
    return crf


# --------------------------------------------------------------------------- reading


def _decode_video(path: Path) -> np.ndarray:
    """All frames of a pack video as (N, H, W, 3) uint8 RGB (OpenCV: no PyAV needed)."""
    import cv2

    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise MediaError(f"cannot open {path} with OpenCV")
    frames = []
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    cap.release()
    if not frames:
        raise MediaError(f"{path}: no frames decoded")
    return np.stack(frames)


def _decode_audio(path: Path) -> np.ndarray:
    if path.suffix == ".npz":
        with np.load(path) as data:
            return data["pcm"].astype(np.float32) / 32768.0
    import soundfile

    wav, rate = soundfile.read(str(path), dtype="float32", always_2d=False)
    if rate != SAMPLE_RATE:
        raise MediaError(f"{path}: {rate} Hz audio, expected {SAMPLE_RATE}")
    return wav.reshape(-1)


PACK_CACHE_ENV = "LIPSYNC_PACK_CACHE"


def _cache_dir(cache: str | os.PathLike | None, meta_bytes: bytes) -> Path | None:
    cache = cache if cache is not None else os.environ.get(PACK_CACHE_ENV) or None
    if cache is None:
        return None
    return Path(cache).expanduser() / hashlib.sha256(meta_bytes).hexdigest()[:16]


def _save_npy(path: Path, array: np.ndarray) -> None:
    """``np.save`` through a temporary file and a rename (concurrent writers are safe)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        with open(tmp, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_npy(path: Path, shape: tuple[int, ...], parts: Iterable[np.ndarray]) -> None:
    """``parts`` (frames, in order) into a new uint8 ``.npy`` of ``shape``, atomically. Parts
    that do not fill it exactly leave no file (:class:`MediaError`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        pos = 0
        for part in parts:
            if pos + len(part) > shape[0] or part.shape[1:] != shape[1:]:
                raise MediaError(f"{path.name}: decoded frames do not fit {shape}")
            out[pos : pos + len(part)] = part
            pos += len(part)
        if pos != shape[0]:
            raise MediaError(f"{path.name}: decoded {pos} frames, not {shape[0]}")
        out.flush()
        del out
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _load_npy(path: Path) -> np.ndarray:
    """Memory-mapped copy-on-write: shared page cache, writable without touching the file."""
    return np.load(path, mmap_mode="c")


def read_pack(
    root: str | os.PathLike,
    splits: tuple[str, ...] | None = None,
    threads: int = 8,
    cache: str | os.PathLike | None = None,
) -> Pack:
    """Decode a pack (all of it, or ``splits``) into memory; with ``cache`` (default
    ``$LIPSYNC_PACK_CACHE``), decode once into ``.npy`` files there and memory-map them."""
    root = Path(root)
    meta_path = root / "pack.json"
    if not meta_path.is_file():
        raise ConfigError(f"{root} is not a training pack (no pack.json)")
    meta_bytes = meta_path.read_bytes()
    meta = json.loads(meta_bytes)
    cache_dir = _cache_dir(cache, meta_bytes)
    if meta.get("format") != PACK_FORMAT:
        raise ConfigError(f"{meta_path}: format {meta.get('format')!r} is not {PACK_FORMAT!r}")
    segments = [PackSegment(**s) for s in meta["segments"]]
    wanted = tuple(meta["splits"]) if splits is None else splits
    missing = [s for s in wanted if s not in meta["splits"]]
    if missing:
        raise ConfigError(f"{root}: no {', '.join(missing)} split in this pack")
    chunk = int(meta["video"]["chunk_frames"])
    frames, audio, visemes, phones = {}, {}, {}, {}
    with np.load(root / "labels.npz") as labels:
        for split in wanted:
            visemes[split] = labels[f"visemes_{split}"].astype(np.float32)
            phones[split] = labels[f"phones_{split}"].astype(np.int64)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for split in wanted:
            n = meta["splits"][split]["frames"]
            cached = None
            if cache_dir is not None:
                cached = (cache_dir / f"frames-{split}.npy", cache_dir / f"audio-{split}.npy")
            if cached is not None and all(p.is_file() for p in cached):
                frames[split], audio[split] = _load_npy(cached[0]), _load_npy(cached[1])
                continue
            files = [root / f"video-{split}-{k}.mp4" for k in range(math.ceil(n / chunk))]
            ext = "ogg" if meta["audio"]["codec"] == "opus" else "npz"
            wav = _decode_audio(root / f"audio-{split}.{ext}")
            audio[split] = np.pad(wav, (0, max(0, n * SAMPLES_PER_FRAME - len(wav))))
            if cached is None:
                frames[split] = np.concatenate(list(pool.map(_decode_video, files)))
            else:  # straight into the memory-mapped file: one copy, never all in memory
                shape = (n, meta["resolution"], meta["resolution"], 3)
                _write_npy(cached[0], shape, pool.map(_decode_video, files))
                _save_npy(cached[1], audio[split])
                frames[split], audio[split] = _load_npy(cached[0]), _load_npy(cached[1])
            if len(frames[split]) != n:
                raise MediaError(f"{root}: {split} decodes to {len(frames[split])} frames, not {n}")
    return Pack(root, meta, segments, frames, audio, visemes, phones)


def limit_split(pack: Pack, split: str, max_minutes: float | None = None,
                max_segments: int | None = None) -> Pack:  # fmt: skip
    """``pack`` with ``split`` cut to its first whole segments within ``max_minutes`` and
    ``max_segments`` (at least one segment; other splits unchanged, arrays shared)."""
    segs = pack.split_segments(split)
    keep, frames = [], 0
    for seg in segs:
        if keep and max_segments is not None and len(keep) >= max_segments:
            break
        if keep and max_minutes is not None and frames + seg.frames > max_minutes * 60 * FPS:
            break
        keep.append(seg)
        frames += seg.frames
    if len(keep) == len(segs):
        return pack
    end = keep[-1].start + keep[-1].frames
    others = [s for s in pack.segments if s.split != split]

    def cut(arrays: dict[str, np.ndarray], per_frame: int = 1) -> dict[str, np.ndarray]:
        return {**arrays, split: arrays[split][: end * per_frame]}

    return Pack(
        pack.root,
        pack.meta,
        others + keep,
        cut(pack.frames),
        cut(pack.audio, SAMPLES_PER_FRAME),
        cut(pack.visemes),
        cut(pack.phones),
    )


# --------------------------------------------------------------------------- SyncNet pairs

MIN_NEGATIVE_OFFSET = 5  # frames between a negative's audio and its images (CONTRACT-data §3)


class PackSyncPairs(torch.utils.data.Dataset):
    """SyncNet training pairs from a pack, with the item keys of ``SyncNetPairs``
    (CONTRACT-data.md §3) except that ``image`` stays 8-bit: (3F, R/2, R) uint8 (lower halves,
    frame-major RGB; :func:`lipsync.eval.syncnet_accuracy.fit_image` maps it to [-1, 1] on the
    device: a quarter of the bytes through the loader workers and the copy), ``audio``
    (1, 80, ceil(F·16/5)) SyncNet mel window, ``y`` (1,) 1 = in sync / 0 = audio
    from another time of the same segment at least 5 frames away, ``segment``, ``start``.

    Every window start of every segment is an item; whether it is a positive, and the negative's
    audio start, depend only on (seed, split, epoch, index). For the GPU machine, where a
    processed corpus cannot be decoded (no PyAV): ``lipsync train syncnet`` reads it as
    ``data: "pack:DIR"``.
    """

    def __init__(self, pack: str | os.PathLike | Pack, split: str = "train",
                 num_frames: int = 16, seed: int = 0):  # fmt: skip
        self.pack = pack if isinstance(pack, Pack) else read_pack(pack, (split,))
        self.split, self.num_frames, self.seed, self.epoch = split, num_frames, seed, 0
        self.segments = self.pack.split_segments(split)
        self.mel_len = syncnet_mel_window_length(num_frames, FPS)
        items = []
        for k, seg in enumerate(self.segments):
            mel_frames = seg.frames * SAMPLES_PER_FRAME // 200 + 1
            starts = [s for s in range(seg.frames - num_frames + 1)
                      if syncnet_mel_start(s, FPS) + self.mel_len <= mel_frames]  # fmt: skip
            if len(starts) > 2 * MIN_NEGATIVE_OFFSET:
                items += [(k, s) for s in starts]
        if not items:
            raise ConfigError(f"no {split} segment of the pack is long enough for SyncNet pairs")
        self._set_items(items)
        self._mels: dict[int, torch.Tensor] = {}

    def _set_items(self, items: list[tuple[int, int]]) -> None:
        self._items = items
        self._starts: dict[int, list[int]] = {}  # per segment, in the order of ``items``
        for k, s in items:
            self._starts.setdefault(k, []).append(s)

    def __len__(self) -> int:
        return len(self._items)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def shard(self, rank: int, world_size: int) -> PackSyncPairs:
        self._set_items(self._items[rank::world_size])
        return self

    def _mel(self, k: int) -> torch.Tensor:
        if k not in self._mels:
            seg = self.segments[k]
            wav = self.pack.audio[self.split][
                seg.start * SAMPLES_PER_FRAME : (seg.start + seg.frames) * SAMPLES_PER_FRAME
            ]
            self._mels[k] = syncnet_mel(np.ascontiguousarray(wav))
        return self._mels[k]

    def __getitem__(self, i: int) -> dict[str, Any]:
        k, start = self._items[i]
        seg = self.segments[k]
        rng = np.random.default_rng(_key(self.seed, self.split, self.epoch, k, start))
        positive = bool(rng.integers(2))
        audio_start = start
        if not positive:
            far = [s for s in self._starts[k] if abs(s - start) >= MIN_NEGATIVE_OFFSET]
            audio_start = int(rng.choice(far))
        first = seg.start + start
        frames = self.pack.frames[self.split][first : first + self.num_frames]
        half = frames[:, frames.shape[1] // 2 :]  # (F, R/2, R, 3)
        image = torch.from_numpy(np.ascontiguousarray(half)).permute(0, 3, 1, 2)
        image = image.reshape(-1, *image.shape[2:]).contiguous()
        window = syncnet_mel_window(self._mel(k), audio_start, self.num_frames, FPS)
        return {
            "image": image,
            "audio": window[None].clone(),
            "y": torch.tensor([1.0 if positive else 0.0]),
            "segment": seg.id,
            "start": start,
        }


def _key(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")
