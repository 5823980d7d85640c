"""The lip-sync pipeline: a video and an audio track in, a lip-synced video out.

Stages (each a function of the previous one's output; data flows one way):

1. **validate** the inputs and output path (:func:`lipsync.media.validate_inputs`): one clear
   error before any heavy work; the audio is decoded once (16 kHz mono).
2. **audio**: Whisper features for the whole track → one (50, 384) window per output frame.
   The output has ``ceil(audio_seconds × 25)`` frames (the reference emits two more, past the
   end of the audio; we follow the audio's length).
3. **faces** (pass 1 over the video): landmarks per frame, the tracked face, the alignment
   matrices. No usable face anywhere → :class:`~lipsync.errors.NoFaceError`, nothing written.
4. **denoise + restore + encode** (pass 2), chunk by chunk (16 frames): align the faces, run the
   diffusion model, paste the faces back, hand the frames to the encoder thread. Frames without
   a usable face are passed through unchanged. Decoding (reader thread), the model (this thread)
   and encoding (writer thread) overlap; memory does not grow with the video's length.

A looped dub (audio longer than the video) visits each source frame once per loop. Within
``RunOptions.frame_cache_mb`` its decoded frames are kept for the run (decoded once, not once per
backward pass), and the VAE encodings of its faces are reused (:class:`FaceEncodings`), so a
long dub costs per frame what the short clip costs; the output is bit-identical either way.

The output's audio is the input audio as it is (its own sample rate and channels; the model
alone gets it as 16 kHz mono), trimmed to the output's length, muxed with H.264 video, written
atomically (temp file + rename). Ctrl-C or any error leaves no partial output.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.profiler import record_function

from lipsync.accel.precompiled import compile_counters
from lipsync.audio import frame_windows
from lipsync.constants import (
    CHUNK_FRAMES,
    DEFAULT_GUIDANCE,
    DEFAULT_MIN_FACE_SIZE,
    DEFAULT_SEED,
    DEFAULT_STEPS,
    DETECTORS,
    FPS,
    MAX_CHUNK_FRAMES,
    SAMPLE_RATE,
    DetectorName,
    Mode,
    SchedulerName,
)
from lipsync.diffusion import DenoiseOptions, FaceEncodings, FaceReuse
from lipsync.engine import LocalEngine, SyncEngine
from lipsync.errors import AudioError, ConfigError, VideoError, check_choice
from lipsync.face.align import (
    crop_size,
    crops_to_model_input,
    estimate_transforms,
    paste_mask,
    restore,
    warp_faces,
)
from lipsync.face.cache import load_track, save_track, track_key
from lipsync.face.detect import track_faces
from lipsync.face.mask import load_mask, make_mask
from lipsync.face.track import FrameStatus, require_faces
from lipsync.loading import ModelBundle
from lipsync.media import (
    DEFAULT_MAX_DURATION_S,
    SourceAudio,
    VideoWriter,
    frames_for_audio,
    output_frame_indices,
    silent_audio_message,
    validate_inputs,
)
from lipsync.media.color import rgb_to_yuv420
from lipsync.media.frames import ArrayFrames, ArraySink, FileFrames, VideoFrames
from lipsync.progress import Progress
from lipsync.runtime import release_memory
from lipsync.transfer import to_device

__all__ = [
    "FPS",
    "SAMPLE_RATE",
    "FaceTrackResult",
    "LipSyncPipeline",
    "Progress",
    "RunOptions",
    "RunReport",
]


@dataclass(frozen=True)
class RunOptions:
    """Everything a run can be asked to do differently (CLI flags, API keyword arguments)."""

    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    seed: int | None = DEFAULT_SEED  # None: a fresh random seed (reported)
    scheduler: SchedulerName = "ddim"
    chunk_frames: int = CHUNK_FRAMES
    mask_path: str | None = None
    min_face_size: int = DEFAULT_MIN_FACE_SIZE
    detector: DetectorName = "mediapipe"  # face detector backend (lipsync.face.detect)
    loop_video: bool = True  # audio longer than video: ping-pong the video (the reference's way)
    crf: float = 18
    # auto: veryfast with a GPU (keeps up with it), else medium (docs/PERFORMANCE.md)
    x264_preset: str = "auto"
    codec: Literal["auto", "libx264", "h264_nvenc"] = "auto"  # auto: NVENC if there, else x264
    max_duration_s: float = DEFAULT_MAX_DURATION_S
    force: bool = False
    face_cache: str | None = None  # folder: reuse each video's face track (lipsync.face.cache)
    # Looped dubs: MB of decoded source frames kept for the run (0: decode again on every
    # backward pass and encode each loop's faces again; the output is the same)
    frame_cache_mb: int = 2048
    # Speed/quality mode (lipsync.diffusion.MODES: exact, fast); the fields below override the
    # mode's setting when not None.
    mode: Mode = "exact"
    cache_interval: int | None = None  # DeepCache: full U-Net every n-th step
    cache_branch: int | None = None  # DeepCache skip branch (0 = shallowest)
    guidance_steps: float | None = None  # share of the steps (from the first) that use CFG

    def denoise_options(self) -> DenoiseOptions:
        """The model-side options this run implies (mode preset + explicit overrides)."""
        return DenoiseOptions.for_mode(
            self.mode, steps=self.steps, guidance=self.guidance, scheduler=self.scheduler,
            cache_interval=self.cache_interval, cache_branch=self.cache_branch,
            guidance_steps=self.guidance_steps,
        )  # fmt: skip

    def validate(self) -> None:
        self.denoise_options().validate()
        check_choice("face detector", self.detector, DETECTORS)
        if not 1 <= self.chunk_frames <= MAX_CHUNK_FRAMES:
            raise ConfigError(
                f"chunk_frames must be 1..{MAX_CHUNK_FRAMES}, got {self.chunk_frames}"
            )
        if self.min_face_size < 1:
            raise ConfigError(f"min_face_size must be positive, got {self.min_face_size}")
        if self.frame_cache_mb < 0:
            raise ConfigError(f"frame_cache_mb must be >= 0, got {self.frame_cache_mb}")


@dataclass
class RunReport:
    """What a run did; printed by the CLI, returned by the API, stored by the job service."""

    output: str | None
    preset: str
    device: str
    dtype: str
    seed: int
    frames: int = 0
    frames_with_face: int = 0
    frames_without_face: int = 0
    frames_face_too_small: int = 0
    video_frames: int = 0
    looped: bool = False
    audio_seconds: float = 0.0
    seconds: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    mode: str = "exact"
    denoise: dict = field(default_factory=dict)  # the DenoiseOptions the mode and flags imply
    fp8: bool = False  # the U-Net's big linear layers run in FP8
    # pass 2 in detail: host seconds per part (read_frames, align, model, restore, write; on a
    # GPU "model" is mostly queueing), source frames decoded, chunks whose face encodings were
    # reused / computed (looped dubs)
    details: dict = field(default_factory=dict)
    # compiled models: the mode, the precompiled artefact used, and the compile work this run
    # did (graphs captured, FX-graph cache hits / misses; misses are compiled from scratch)
    compile: dict = field(default_factory=dict)

    @property
    def fps(self) -> float:
        total = sum(self.seconds.values())
        return self.frames / total if total > 0 else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["fps"] = round(self.fps, 3)
        d["seconds"] = {k: round(v, 3) for k, v in self.seconds.items()}
        d["seconds_total"] = round(sum(self.seconds.values()), 3)
        return d


@dataclass
class FaceTrackResult:
    """Pass 1's result: where the face to edit is, as alignment matrices."""

    matrices: np.ndarray  # (n_video, 2, 3) float32; NaN rows where no usable face
    usable: np.ndarray  # (n_video,) bool
    status: list[FrameStatus]


class LipSyncPipeline:
    """Runs the stages above with one engine (reusable across runs).

    ``engine``: loaded models (:class:`ModelBundle`, run in this process) or any
    :class:`lipsync.engine.SyncEngine` (e.g. a Triton client).
    """

    def __init__(self, engine: ModelBundle | SyncEngine):
        if isinstance(engine, ModelBundle):
            engine = LocalEngine(engine)
        self.engine = engine
        self.models: ModelBundle | None = getattr(engine, "models", None)  # local engines only
        self.resolution = engine.resolution

    # -- stage helpers -------------------------------------------------------------------

    def _mask(self, options: RunOptions) -> torch.Tensor:
        if options.mask_path:
            return torch.from_numpy(load_mask(options.mask_path, self.resolution))
        return torch.from_numpy(make_mask(self.resolution))

    def track_faces(
        self, frames: VideoFrames, num_frames: int, options: RunOptions, progress: Progress
    ) -> FaceTrackResult:
        """Pass 1: the face to edit in each of the first ``num_frames`` frames, and its matrix.
        No usable face anywhere: :class:`~lipsync.errors.NoFaceError`."""
        progress.start("faces", num_frames)
        entry = track = None
        if options.face_cache and isinstance(frames, FileFrames):
            key = track_key(frames.path, options.min_face_size)
            entry = Path(options.face_cache).expanduser() / f"{key}.npz"
            track = load_track(entry, num_frames)
        if track is not None:
            progress.advance("faces", num_frames)
        else:
            track = track_faces(
                frames.batches(num_frames), options.detector, min_face_size=options.min_face_size,
                on_frames=lambda n: progress.advance("faces", n),
            )  # fmt: skip
            if entry is not None:
                save_track(entry, track, complete=len(track) < num_frames)
        progress.finish("faces")
        usable = track.usable
        matrices = np.full((len(track), 2, 3), np.nan, dtype=np.float32)
        if usable.any():
            matrices[usable] = estimate_transforms(
                track.points[usable], self.resolution, smooth=True
            )
        require_faces(track)
        return FaceTrackResult(matrices, usable, track.status)

    # -- the run -------------------------------------------------------------------------

    def run(
        self,
        video_path: str | Path,
        audio_path: str | Path,
        out_path: str | Path,
        options: RunOptions | None = None,
        progress: Progress | None = None,
    ) -> RunReport:
        """Files in, file out (written atomically). See the module docstring for the stages."""
        options = options or RunOptions()
        options.validate()
        t = time.perf_counter()
        inputs = validate_inputs(
            video_path, audio_path, out_path, force=options.force,
            max_duration_s=options.max_duration_s,
        )  # fmt: skip
        report = self._new_report(options)
        report.seconds["validate"] = time.perf_counter() - t
        if inputs.audio_silent:  # the line validate_inputs logged: shown once by the CLI
            report.warnings.append(silent_audio_message(Path(audio_path), inputs.audio_peak))
        n_video = inputs.video.output_frames(FPS) or 0
        if n_video <= 0:
            raise VideoError(f"cannot count the frames of {inputs.video_path}")
        frames = FileFrames(
            inputs.video_path, inputs.video, n_video, keep_bytes=options.frame_cache_mb * 2**20
        )

        def open_sink() -> VideoWriter:
            # the original track (rate, channels), not the model's 16 kHz mono copy
            return VideoWriter(
                inputs.output_path, fps=FPS, audio=SourceAudio(inputs.audio_path),
                crf=options.crf, codec=options.codec, overwrite=options.force,
                preset=self._x264_preset(options),
            )  # fmt: skip

        result = self._run(frames, inputs.waveform, open_sink, options, progress, report)
        report.output = str(result)
        return report

    def run_arrays(
        self,
        frames: np.ndarray,
        waveform: np.ndarray,
        options: RunOptions | None = None,
        progress: Progress | None = None,
    ) -> tuple[np.ndarray, RunReport]:
        """In-memory form for services: frames (N, H, W, 3) uint8 RGB at 25 fps and a 16 kHz mono
        float32 waveform in; the synced frames (M, H, W, 3) out, M = the audio's length in
        frames. Nothing touches the disk."""
        options = options or RunOptions()
        options.validate()
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or not len(frames):
            raise VideoError(
                f"frames must be a non-empty (N, H, W, 3) uint8 array, got "
                f"{frames.dtype} {frames.shape}"
            )
        return self.run_frames(ArrayFrames(frames), waveform, options, progress)

    def run_frames(
        self,
        frames: VideoFrames,
        waveform: np.ndarray,
        options: RunOptions | None = None,
        progress: Progress | None = None,
    ) -> tuple[np.ndarray, RunReport]:
        """Any frame source (:class:`~lipsync.media.frames.FileFrames` streams a file,
        :class:`~lipsync.media.frames.ArrayFrames` holds arrays) and a 16 kHz mono float32
        waveform in; the synced frames (M, H, W, 3) uint8 out, nothing encoded. A file source
        reads and fills ``options.face_cache`` as :meth:`run` does."""
        options = options or RunOptions()
        options.validate()
        wav = np.asarray(waveform, dtype=np.float32).reshape(-1)
        if not len(wav):
            raise AudioError("the audio is empty")
        report = self._new_report(options)
        out = self._run(frames, wav, ArraySink, options, progress, report)
        return out, report

    def _x264_preset(self, options: RunOptions) -> str:
        if options.x264_preset != "auto":
            return options.x264_preset
        # with a GPU the encoder must keep up with the model (docs/PERFORMANCE.md, "Media")
        return "veryfast" if self.engine.device.type == "cuda" else "medium"

    def _new_report(self, options: RunOptions) -> RunReport:
        e = self.engine
        seed = options.seed if options.seed is not None else int(torch.seed() % 2**31)
        return RunReport(
            output=None, preset=e.preset_name, device=str(e.device), dtype=e.dtype_name, seed=seed,
            mode=options.mode, denoise=options.denoise_options().as_dict(),
            fp8=bool(getattr(e, "fp8", False)),  # engines that predate the attribute: none
        )  # fmt: skip

    def _run(self, frames, wav, open_sink, options, progress, report: RunReport):
        progress = progress or Progress()
        engine = self.engine
        counters_before = compile_counters() if self.models and self.models.compiled else None
        mask = self._mask(options).to(engine.device)

        # audio -> one window per output frame
        t = time.perf_counter()
        features = engine.lazy_features(wav)  # computed 30 s at a time, as chunks need them
        n_out = frames_for_audio(len(wav), FPS, SAMPLE_RATE)
        report.audio_seconds = len(wav) / SAMPLE_RATE
        report.seconds["audio"] = time.perf_counter() - t

        # faces (pass 1) over the source frames the output will use
        source_index = output_frame_indices(frames.num_frames, n_out, loop=options.loop_video)
        n_out = len(source_index)
        report.frames = n_out
        report.video_frames = frames.num_frames
        report.looped = bool(n_out > frames.num_frames)
        t = time.perf_counter()
        needed = int(source_index.max()) + 1
        track = self.track_faces(frames, needed, options, progress)
        if len(track.usable) < needed:  # the container over-stated its frame count
            frames.num_frames = report.video_frames = len(track.usable)
            source_index = output_frame_indices(frames.num_frames, n_out, options.loop_video)
            report.frames = n_out = len(source_index)
            report.looped = bool(n_out > frames.num_frames)
        report.seconds["faces"] = time.perf_counter() - t

        # pass 2: denoise, restore, encode
        t = time.perf_counter()
        denoise_options = options.denoise_options()
        parts = _Timers()
        encodings = None
        if options.frame_cache_mb > 0 and report.looped:  # each source frame comes back
            frames.plan(source_index)
            encodings = FaceEncodings()
        progress.start("denoising", n_out)
        sink = open_sink()
        try:
            for start in range(0, n_out, options.chunk_frames):
                idx = source_index[start : start + options.chunk_frames]
                with record_function("lipsync.read_frames"), parts("read_frames"):
                    chunk = frames.get(idx)
                usable = track.usable[idx]
                on_gpu = engine.device.type == "cuda" and isinstance(sink, VideoWriter)
                if on_gpu:  # the frames go to the GPU once and come back as YUV 4:2:0
                    chunk = to_device(chunk, engine.device)
                if usable.any():
                    with record_function("lipsync.audio_windows"):
                        windows = frame_windows(features, FPS, start=start, stop=start + len(idx))
                    reuse = None
                    if encodings is not None:
                        reuse = FaceReuse(encodings, idx[usable].tolist())
                    chunk = self._sync_chunk(
                        chunk, track.matrices[idx], usable, windows, mask, denoise_options,
                        seed=report.seed, chunk_index=start // options.chunk_frames,
                        reuse=reuse, timers=parts,
                    )  # fmt: skip
                    report.frames_with_face += int(usable.sum())
                with record_function("lipsync.write_frames"), parts("write"):
                    if on_gpu:  # colour conversion on the GPU: the CPU encoder only runs x264
                        sink.write(rgb_to_yuv420(chunk))
                    else:
                        sink.write(chunk)
                progress.advance("denoising", len(idx))
                release_memory()  # long runs: keep fragmentation from growing the heap
            progress.finish("denoising")
            report.seconds["denoise"] = time.perf_counter() - t
            t = time.perf_counter()
            progress.start("encoding", n_out)  # what the encoder has not finished yet
            result = sink.close(on_frames=lambda n: progress.advance("encoding", n))
            progress.finish("encoding")
            report.seconds["encode"] = time.perf_counter() - t
        except BaseException:
            sink.abort()
            raise
        finally:
            frames.close()
        report.details = {
            "pass2_seconds": {k: round(v, 3) for k, v in parts.seconds.items()},
            "frames_decoded": frames.frames_decoded,
            "face_encodings": None
            if encodings is None
            else {"reused_chunks": encodings.hits, "encoded_chunks": encodings.misses,
                  "bytes": encodings.bytes},
        }  # fmt: skip
        if self.models is not None:
            report.warnings += [n for n in self.models.notes if n not in report.warnings]
        if counters_before is not None:
            now = compile_counters()
            art = self.models.precompiled
            report.compile = {
                "mode": self.models.compile_mode,
                "precompiled": art.path.name if art else None,
                **{k: now[k] - counters_before[k] for k in now},
            }
        statuses = [track.status[i] for i in source_index]
        report.frames_face_too_small = sum(s == FrameStatus.TOO_SMALL for s in statuses)
        report.frames_without_face = n_out - report.frames_with_face
        return result

    def _sync_chunk(
        self, frames, matrices, usable, windows, mask, options, seed, chunk_index, reuse=None,
        timers=None,
    ):  # fmt: skip
        """frames (n, H, W, 3) uint8, a numpy array or a tensor on the engine's device -> the
        same frames (same kind) with the usable faces re-synthesised. ``reuse``: the usable
        faces' source frames and the run's store of their encodings (looped dubs)."""
        timers = timers or _Timers()
        sel = np.flatnonzero(usable)
        mats = matrices[sel]
        dev = self.engine.device
        on_device = isinstance(frames, torch.Tensor)
        every = len(sel) == len(frames)  # the usual case: no gather, no scatter
        if on_device:
            src = frames if every else frames[to_device(sel, dev)]
        else:
            src = to_device(frames if every else frames[sel], dev)
        with record_function("lipsync.align"), timers("align"):
            crops = warp_faces(src, mats, self.resolution)
            faces = crops_to_model_input(crops, self.resolution)  # (k, 3, r, r) in [-1, 1]
            # Made before the model's work is queued: it reads the mask areas back from the GPU,
            # which waits only for the work queued so far; restore then queues without waiting,
            # and the host reads and aligns the next chunk while the GPU denoises this one.
            paste = paste_mask(mats, src.shape[1:3], crop_size(self.resolution), dev)
        with record_function("lipsync.denoise"), timers("model"):
            audio = windows if every else windows[sel]
            synced = self.engine.denoise(faces, audio, mask, seed, chunk_index, options, reuse)
        with record_function("lipsync.restore"), timers("restore"):
            restored = restore(src, synced, mats, resolution=self.resolution, mask=paste)
        if on_device:
            if every:
                return restored
            frames[to_device(sel, dev)] = restored
            return frames
        out = frames.copy()
        out[sel] = restored.cpu().numpy() if isinstance(restored, torch.Tensor) else restored
        return out


class _Timers:
    """Host seconds per named part: ``with timers("align"): ...`` adds up."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t
