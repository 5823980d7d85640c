"""``lipsync data synth``: plan, splits, parallel generation, resumable output.

Layout of ``OUT``::

    synth.json            the corpus's settings (seed, resolution, sources); a re-run must match
    sources/<key>/        footage caches (frames, landmarks, mouth geometry), built once
    clips/<id>.mp4        H.264 + AAC 16 kHz mono, 25 fps, R x R
    clips/<id>.json       the sidecar (schema ``lipsync.synth/1``, written after the mp4)
    corpus.jsonl          one line per clip: id, split, identity, voice, sentence_id, frames
    splits.json           identities / voices / sentences of each split

Determinism: clip ``i`` depends only on ``(seed, i)``, the sources and the resolution (every
random choice comes from ``numpy.random.default_rng([seed, i, purpose])``), not on ``--clips`` or
``--workers``: a larger ``--clips`` extends a corpus, and two runs give identical sidecars and
identical decoded frames (x264 runs single-threaded, limited to AVX2 code, see
:mod:`lipsync.media.encode`).

Splits: sentence ``k`` is spoken by clips ``2k`` and ``2k + 1`` (two voices) and belongs to
train / val / test with probabilities 0.8 / 0.1 / 0.1; a clip's split is its sentence's. The
voices (language x variant) are partitioned 80 / 10 / 10 once per seed and a clip takes a voice
of its split, so val and test clips share neither sentence nor voice with train. Identities are
partitioned too when there are at least 3 (with 2, train gets one and val / test the other); with
one identity every split uses it (``splits.json`` says ``"identity_split": false``).

Resuming: a clip is done when its sidecar exists. The mp4 is written to a temporary file and
renamed, then the sidecar likewise, so a killed run leaves at most a finished mp4 without
sidecar, which the next run rewrites, and temporary files, which the next run deletes. A lock
(``OUT/.synth.lock``, ``flock``) keeps two runs from writing one folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from lipsync.data.synth.faces import (
    MAX_SOURCE_SECONDS,
    Augment,
    ColourTransform,
    FaceSource,
    Footage,
    augment_affine,
    build_footage,
    discover_sources,
    load_footage,
    sample_augment,
)
from lipsync.data.synth.phones import (
    LINK_MNEMONIC,
    PARAMS,
    PHONE_SET,
    PHONE_TO_VISEME,
    normalise_espeak,
)
from lipsync.data.synth.render import MouthRenderer
from lipsync.data.synth.text import sentence_text
from lipsync.data.synth.tts import (
    ESPEAK_SAMPLE_RATE,
    VoiceSettings,
    espeak_version,
    resample,
    synthesize,
)
from lipsync.data.synth.visemes import viseme_track
from lipsync.errors import ConfigError, MediaError
from lipsync.media import VideoWriter
from lipsync.media.timeline import pingpong_indices

__all__ = [
    "GENERATOR",
    "LANGUAGES",
    "SCHEMA",
    "SPLITS",
    "VARIANTS",
    "ClipLabels",
    "ClipPlan",
    "clip_labels",
    "SynthOptions",
    "SynthSummary",
    "generate_clip",
    "plan_clip",
    "run_synth",
    "split_plan",
]

SCHEMA = "lipsync.synth/1"
GENERATOR = "lipsync.data.synth 1"
FPS = 25
SAMPLE_RATE = 16000
SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
CLIPS_PER_SENTENCE = 2

#: eSpeak NG English voices (accents) and voice variants used; a voice is one (language, variant)
LANGUAGES = (
    "en-us", "en", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029",
    "en-us-nyc",
)  # fmt: skip
VARIANTS = (
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5", "klatt", "klatt2",
    "klatt3", "klatt4", "Alex", "Andy", "Annie", "Lee", "Michael", "belinda", "linda", "steph",
    "aunty", "rob", "robert", "travis",
)  # fmt: skip
_FEMALE = {"f1", "f2", "f3", "f4", "f5", "Annie", "belinda", "linda", "steph", "aunty"}

# rng purposes
_R_SPLIT, _R_VOICES, _R_TEXT, _R_CLIP_VOICE, _R_IDENTITY, _R_CLIP, _R_IDENTITIES = range(7)


@dataclass(frozen=True)
class SynthOptions:
    """Options of ``lipsync data synth`` (see the command's help)."""

    out: Path
    clips: int
    seed: int = 0
    resolution: int = 256
    faces: Path | None = None
    base: tuple[Path, ...] = ()
    workers: int = 0  # 0: one per CPU core
    crf: float = 18.0
    preset: str = "fast"
    min_words: int = 13
    max_words: int = 19
    max_source_seconds: float = MAX_SOURCE_SECONDS


# -- splits and plans ----------------------------------------------------------------------------


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *keys])


def _partition(items: list[str], rng: np.random.Generator) -> dict[str, list[str]]:
    """Shuffle and cut 80 / 10 / 10 (val and test get at least one each when possible)."""
    order = [items[i] for i in rng.permutation(len(items))]
    n = len(order)
    n_val = max(1, int(round(n * SPLIT_FRACTIONS[1]))) if n >= 3 else 0
    n_test = max(1, int(round(n * SPLIT_FRACTIONS[2]))) if n >= 3 else 0
    n_train = n - n_val - n_test
    return {
        "train": sorted(order[:n_train]),
        "val": sorted(order[n_train : n_train + n_val]),
        "test": sorted(order[n_train + n_val :]),
    }


def all_voices() -> list[str]:
    return [f"{lang}+{var}" for lang in LANGUAGES for var in VARIANTS]


@dataclass(frozen=True)
class SplitPlan:
    voices: dict[str, list[str]]
    identities: dict[str, list[str]]
    identity_split: bool


def split_plan(seed: int, identities: Iterable[str]) -> SplitPlan:
    """Which voices and identities belong to which split (sentences: :func:`sentence_split`)."""
    voices = _partition(all_voices(), _rng(seed, _R_VOICES))
    ids = sorted(set(identities))
    if len(ids) >= 3:
        parts = _partition(ids, _rng(seed, _R_IDENTITIES))
        return SplitPlan(voices, parts, True)
    if len(ids) == 2:
        order = [ids[i] for i in _rng(seed, _R_IDENTITIES).permutation(2)]
        return SplitPlan(voices, {"train": [order[0]], "val": [order[1]], "test": [order[1]]}, True)
    return SplitPlan(voices, {s: list(ids) for s in SPLITS}, False)


def sentence_split(seed: int, sentence: int) -> str:
    x = _rng(seed, _R_SPLIT, sentence).random()
    return "train" if x < SPLIT_FRACTIONS[0] else "val" if x < sum(SPLIT_FRACTIONS[:2]) else "test"


@dataclass(frozen=True)
class ClipPlan:
    """Every random choice of one clip."""

    index: int
    id: str
    split: str
    sentence: int
    text: str
    voice: VoiceSettings
    identity: str
    source_key: str
    start_frame: int
    lead_in: float  # seconds of silence before the speech
    tail: float  # seconds of silence after it
    level_db: float  # speech RMS level, dBFS
    open_gain: float
    augment: Augment
    noise_seed: int  # seeds eSpeak's breath / roughness noise
    seed: int


def clip_id(index: int) -> str:
    return f"syn-{index:06d}"


def plan_clip(
    index: int,
    seed: int,
    splits: SplitPlan,
    sources: list[FaceSource],
    footage_frames: dict[str, int],
    min_words: int = 13,
    max_words: int = 19,
) -> ClipPlan:
    """The plan of clip ``index`` (depends only on the arguments)."""
    sentence = index // CLIPS_PER_SENTENCE
    split = sentence_split(seed, sentence)
    text = sentence_text(_rng(seed, _R_TEXT, sentence), min_words, max_words)
    pool = splits.voices[split] or splits.voices["train"]
    pair = _rng(seed, _R_CLIP_VOICE, sentence).choice(
        len(pool), size=min(2, len(pool)), replace=False
    )
    voice_name = pool[int(pair[(index % CLIPS_PER_SENTENCE) % len(pair)])]
    language, variant = voice_name.split("+")
    rng = _rng(seed, _R_CLIP, index)
    female = variant in _FEMALE
    voice = VoiceSettings(
        language=language,
        variant=variant,
        rate=int(rng.integers(140, 191)),
        pitch=int(rng.integers(45, 76) if female else rng.integers(30, 61)),
        range=int(rng.integers(30, 81)),
    )
    ids = splits.identities[split]
    identity = ids[int(_rng(seed, _R_IDENTITY, index).integers(len(ids)))]
    mine = [s for s in sources if s.identity == identity]
    source = mine[int(rng.integers(len(mine)))]
    n = footage_frames[source.key]
    return ClipPlan(
        index=index,
        id=clip_id(index),
        split=split,
        sentence=sentence,
        text=text,
        voice=voice,
        identity=identity,
        source_key=source.key,
        start_frame=int(rng.integers(0, max(1, 2 * n - 2))),
        lead_in=float(rng.uniform(0.15, 0.5)),
        tail=float(rng.uniform(0.25, 0.6)),
        level_db=float(rng.uniform(-26.0, -18.0)),
        open_gain=float(rng.uniform(0.85, 1.1)),
        augment=sample_augment(rng, static=source.kind == "image"),
        noise_seed=int(rng.integers(0, 2**31)),
        seed=seed,
    )


# -- one clip ------------------------------------------------------------------------------------


def _phones_record(speech, lead: int, total_s: float) -> list[dict[str, Any]]:
    """Normalised phones tiling ``[0, total_s]``: lead-in silence, eSpeak's phones (``;`` merged
    into the previous phone, adjacent silences merged), silence to the end."""
    sr = ESPEAK_SAMPLE_RATE
    rows: list[dict[str, Any]] = [{"label": "SIL", "start": 0, "end": lead, "espeak": []}]
    for p in speech.phones:
        start, end = p.start + lead, p.end + lead
        if p.label == LINK_MNEMONIC and rows:
            rows[-1]["end"] = end
            rows[-1]["espeak"].append(p.label)
            continue
        label = normalise_espeak(p.label)
        if label == "SIL" and rows[-1]["label"] == "SIL" and rows[-1]["end"] == start:
            rows[-1]["end"] = end
            rows[-1]["espeak"].append(p.label)
            continue
        rows.append({"label": label, "start": start, "end": end, "espeak": [p.label]})
    rows = [r for r in rows if r["end"] > r["start"]]
    out = []
    for r in rows:
        out.append(
            {
                "label": r["label"],
                "start": r["start"] / sr,
                "end": r["end"] / sr,
                "viseme": PHONE_TO_VISEME[r["label"]],
                "espeak": " ".join(r["espeak"]),
            }
        )
    last_end = out[-1]["end"]
    if out[-1]["label"] == "SIL":
        out[-1]["end"] = total_s
    elif total_s > last_end:
        out.append(
            {"label": "SIL", "start": last_end, "end": total_s, "viseme": "rest", "espeak": ""}
        )
    return out


_FOOTAGE: dict[str, Footage] = {}  # per process: cache folder -> opened footage


def _footage(root: Path, source: FaceSource) -> Footage:
    key = str(root.resolve())
    if key not in _FOOTAGE:
        _FOOTAGE[key] = load_footage(root, source)
    return _FOOTAGE[key]


def render_clip_frames(plan: ClipPlan, footage: Footage, track: np.ndarray, size: int):
    """Yield the clip's frames (size, size, 3) uint8, one per row of ``track``."""
    n = len(track)
    src = pingpong_indices(footage.num_frames, plan.start_frame + n)[plan.start_frame :]
    renderer = MouthRenderer(footage, size)
    colour = ColourTransform(plan.augment)
    for k in range(n):
        affine = augment_affine(plan.augment, footage.size, footage.crop_side, size, k / FPS)
        yield renderer.frame(int(src[k]), affine, track[k], colour)


@dataclass
class ClipLabels:
    """The audio and labels of a clip: 16 kHz ``audio`` (``frames * 640`` samples), ``phones``
    and ``words`` as in the sidecar, the viseme ``track`` (frames, 5)."""

    frames: int
    duration: float
    audio: np.ndarray
    phones: list[dict[str, Any]]
    words: list[dict[str, Any]]
    track: np.ndarray
    lead: int  # lead-in silence, samples at 22050 Hz
    tail: int


def clip_labels(plan: ClipPlan) -> ClipLabels:
    """Speak the clip's text, pad it with the planned silences, resample, set the level, and
    derive its phones, words and viseme track (deterministic)."""
    speech = synthesize(plan.text, plan.voice, noise_seed=plan.noise_seed)
    sr = ESPEAK_SAMPLE_RATE
    lead = int(round(plan.lead_in * sr))
    tail = int(round(plan.tail * sr))
    samples = np.concatenate([np.zeros(lead, np.int16), speech.samples, np.zeros(tail, np.int16)])
    audio = resample(samples, sr, SAMPLE_RATE)
    frames = math.ceil(len(audio) * FPS / SAMPLE_RATE)
    audio = np.pad(audio, (0, frames * SAMPLE_RATE // FPS - len(audio)))
    # level: speech RMS to plan.level_db, peak at most 0.95
    voiced = audio[np.abs(audio) > 1e-4]
    rms = float(np.sqrt(np.mean(voiced.astype(np.float64) ** 2))) if voiced.size else 1.0
    gain = 10 ** (plan.level_db / 20) / max(rms, 1e-9)
    gain = min(gain, 0.95 / max(float(np.abs(audio).max()), 1e-9))
    audio = (audio * gain).astype(np.float32)
    duration = frames / FPS
    phones = _phones_record(speech, lead, duration)
    words = [
        {"word": w.text, "start": (w.start + lead) / sr, "end": (w.end + lead) / sr}
        for w in speech.words
    ]
    track = viseme_track(
        [(p["label"], p["start"], p["end"]) for p in phones], frames, FPS, plan.open_gain
    )
    return ClipLabels(frames, duration, audio, phones, words, track, lead, tail)


def generate_clip(
    plan: ClipPlan, sources_root: Path, source: FaceSource, clips_dir: Path, options: SynthOptions
) -> dict[str, Any]:
    """Synthesise, render and write one clip (mp4, then sidecar); returns its corpus line plus
    timing (``cpu_s``, ``wall_s``)."""
    t_wall, t_cpu = time.perf_counter(), time.process_time()
    labels = clip_labels(plan)
    frames, duration, audio, track = labels.frames, labels.duration, labels.audio, labels.track
    phones, words = labels.phones, labels.words
    footage = _footage(sources_root / source.key, source)
    size = options.resolution
    mp4 = clips_dir / f"{plan.id}.mp4"
    with VideoWriter(
        mp4,
        fps=FPS,
        size=(size, size),
        audio=audio,
        sample_rate=SAMPLE_RATE,
        crf=options.crf,
        preset=options.preset,
        codec="libx264",
        threads=1,
        overwrite=True,
    ) as writer:
        batch: list[np.ndarray] = []
        for frame in render_clip_frames(plan, footage, track, size):
            batch.append(frame)
            if len(batch) == 25:
                writer.write(np.stack(batch))
                batch = []
        if batch:
            writer.write(np.stack(batch))
    voice = {
        "name": plan.voice.language,
        "variant": plan.voice.variant,
        "rate": plan.voice.rate,
        "pitch": plan.voice.pitch,
        "range": plan.voice.range,
        "engine": f"espeak-ng {espeak_version()}",
    }
    sidecar = {
        "schema": SCHEMA,
        "id": plan.id,
        "split": plan.split,
        "fps": FPS,
        "sample_rate": SAMPLE_RATE,
        "frames": frames,
        "duration": duration,
        "identity": plan.identity,
        "source": {
            "key": source.key,
            "path": str(source.path),
            "kind": source.kind,
            "start_frame": plan.start_frame,
            "loop": "pingpong",
            "frames": footage.num_frames,
            "augment": asdict(plan.augment),
        },
        "voice": voice,
        "audio": {
            "level_db": plan.level_db,
            "lead_in": labels.lead / ESPEAK_SAMPLE_RATE,
            "tail": labels.tail / ESPEAK_SAMPLE_RATE,
        },
        "sentence_id": f"s{plan.sentence:05d}",
        "text": plan.text,
        "words": words,
        "phones": phones,
        "phone_set": PHONE_SET,
        "visemes": {
            "names": list(PARAMS),
            "open_gain": plan.open_gain,
            "per_frame": [[round(float(x), 5) for x in row] for row in track],
        },
        "seed": plan.seed,
        "clip_index": plan.index,
        "generator": GENERATOR,
    }
    write_json_atomic(clips_dir / f"{plan.id}.json", sidecar)
    return {
        **corpus_line(sidecar),
        "cpu_s": time.process_time() - t_cpu,
        "wall_s": time.perf_counter() - t_wall,
    }


def corpus_line(sidecar: dict[str, Any]) -> dict[str, Any]:
    v = sidecar["voice"]
    return {
        "id": sidecar["id"],
        "split": sidecar["split"],
        "identity": sidecar["identity"],
        "voice": f"{v['name']}+{v['variant']}",
        "sentence_id": sidecar["sentence_id"],
        "frames": sidecar["frames"],
    }


def write_json_atomic(path: Path, data: Any, *, lines: bool = False) -> None:
    """Write JSON (or JSON lines from a list) to ``path`` through a temporary file + rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual mode
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            if lines:
                for row in data:
                    f.write(json.dumps(row) + "\n")
            else:
                json.dump(data, f, indent=1)
                f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# -- the whole corpus ----------------------------------------------------------------------------


@dataclass
class SynthSummary:
    out: Path
    clips: int
    generated: int
    skipped: int
    frames_generated: int
    wall_s: float
    cpu_s: float
    per_split: dict[str, dict[str, int]] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)
    skipped_sources: list[str] = field(default_factory=list)

    @property
    def frames_per_s(self) -> float:
        return self.frames_generated / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def cpu_ms_per_frame(self) -> float:
        return 1000 * self.cpu_s / self.frames_generated if self.frames_generated else 0.0


def _settings(options: SynthOptions, sources: list[FaceSource]) -> dict[str, Any]:
    return {
        "generator": GENERATOR,
        "seed": options.seed,
        "resolution": options.resolution,
        "crf": options.crf,
        "preset": options.preset,
        "words": [options.min_words, options.max_words],
        "max_source_seconds": options.max_source_seconds,
        "sources": [
            {"identity": s.identity, "key": s.key, "path": str(s.path), "kind": s.kind}
            for s in sources
        ],
    }


def _check_settings(out: Path, settings: dict[str, Any]) -> None:
    path = out / "synth.json"
    if path.is_file():
        old = json.loads(path.read_text())
        for key in settings:
            if old.get(key) != settings[key]:
                raise ConfigError(
                    f"{out} holds a corpus made with other settings ({key}: {old.get(key)!r}, "
                    f"now {settings[key]!r}); use another folder or the same options"
                )
    else:
        write_json_atomic(path, settings)


_WORKER: dict[str, Any] = {}


def _worker_init(sources_root: str, sources: list[FaceSource], clips_dir: str, options) -> None:
    cv2.setNumThreads(1)  # parallelism is across clips: one thread per worker for OpenCV
    _WORKER.update(
        sources_root=Path(sources_root),
        sources={s.key: s for s in sources},
        clips_dir=Path(clips_dir),
        options=options,
    )


def _worker_run(plan: ClipPlan) -> dict[str, Any]:
    w = _WORKER
    return generate_clip(
        plan, w["sources_root"], w["sources"][plan.source_key], w["clips_dir"], w["options"]
    )


def run_synth(
    options: SynthOptions,
    *,
    on_start: Callable[[int, int], None] | None = None,
    on_clip: Callable[[dict[str, Any]], None] | None = None,
    on_status: Callable[[str], None] | None = None,
) -> SynthSummary:
    """Generate (or finish) the corpus described by ``options``; see the module docstring."""
    if options.clips < 1:
        raise ConfigError(f"--clips must be at least 1, got {options.clips}")
    if not 1 <= options.min_words <= options.max_words:
        raise ConfigError(
            f"need 1 <= --min-words <= --max-words, got {options.min_words}, {options.max_words}"
        )
    if options.max_source_seconds <= 0:
        raise ConfigError(
            f"--max-source-seconds must be positive, got {options.max_source_seconds}"
        )
    if options.resolution < 64 or options.resolution % 2:
        raise ConfigError(f"--resolution must be an even number >= 64, got {options.resolution}")
    out = options.out
    out.mkdir(parents=True, exist_ok=True)
    with _exclusive(out):
        return _run_locked(options, on_start, on_clip, on_status)


@contextlib.contextmanager
def _exclusive(out: Path):
    """Hold ``OUT/.synth.lock`` (released by the kernel even on SIGKILL) and remove what a
    killed run left half-written: temporary mp4 / JSON files and footage cache folders."""
    with open(out / ".synth.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"another 'lipsync data synth' is writing {out}") from None
        for pattern in ("clips/.*.partial.*", "clips/.*.tmp", ".*.tmp"):
            for junk in out.glob(pattern):
                junk.unlink(missing_ok=True)
        for junk in out.glob("sources/.tmp-*"):
            shutil.rmtree(junk, ignore_errors=True)
        yield


def _run_locked(
    options: SynthOptions,
    on_start: Callable[[int, int], None] | None,
    on_clip: Callable[[dict[str, Any]], None] | None,
    on_status: Callable[[str], None] | None,
) -> SynthSummary:
    out = options.out
    sources_root, clips_dir = out / "sources", out / "clips"
    clips_dir.mkdir(exist_ok=True)
    sources = discover_sources(list(options.base), options.faces)
    _check_settings(out, _settings(options, sources))
    say = on_status or (lambda _msg: None)
    footage_frames: dict[str, int] = {}
    usable: list[FaceSource] = []
    skipped_sources: list[str] = []
    for source in sources:
        say(f"footage {source.key}: landmarks and cache")
        try:
            root = build_footage(
                source, sources_root, options.resolution, options.max_source_seconds
            )
        except MediaError as exc:  # no face, unreadable: the other sources may still do
            say(f"skipping {source.path}: {exc}")
            skipped_sources.append(f"{source.path}: {exc}")
            continue
        footage_frames[source.key] = load_footage(root, source).num_frames
        usable.append(source)
    if not usable:
        raise ConfigError("no usable base footage: " + "; ".join(skipped_sources))
    splits = split_plan(options.seed, [s.identity for s in usable])
    plans = [
        plan_clip(
            i, options.seed, splits, usable, footage_frames, options.min_words, options.max_words
        )
        for i in range(options.clips)
    ]
    todo = [p for p in plans if not (clips_dir / f"{p.id}.json").is_file()]
    if on_start:
        on_start(len(plans), len(plans) - len(todo))
    t0 = time.perf_counter()
    cpu = 0.0
    frames = 0
    workers = options.workers or os.cpu_count() or 1
    if todo:
        if workers == 1:
            _worker_init(str(sources_root), usable, str(clips_dir), options)
            for plan in todo:
                row = _worker_run(plan)
                cpu += row["cpu_s"]
                frames += row["frames"]
                if on_clip:
                    on_clip(row)
        else:
            # spawn, not fork: the parent has run MediaPipe's and OpenCV's threads, and a forked
            # child can inherit one of their locks held (it then hangs)
            with ProcessPoolExecutor(
                max_workers=min(workers, len(todo)),
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_worker_init,
                initargs=(str(sources_root), usable, str(clips_dir), options),
            ) as pool:
                pending = set()
                queue = iter(todo)
                for plan in queue:
                    pending.add(pool.submit(_worker_run, plan))
                    if len(pending) >= 2 * workers:
                        break
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        row = fut.result()
                        cpu += row["cpu_s"]
                        frames += row["frames"]
                        if on_clip:
                            on_clip(row)
                        nxt = next(queue, None)
                        if nxt is not None:
                            pending.add(pool.submit(_worker_run, nxt))
    wall = time.perf_counter() - t0
    lines = []
    for plan in plans:
        sidecar = json.loads((clips_dir / f"{plan.id}.json").read_text())
        lines.append(corpus_line(sidecar))
    write_json_atomic(out / "corpus.jsonl", lines, lines=True)
    split_doc: dict[str, Any] = {
        "identity_split": splits.identity_split,
        "note": (
            "held-out splits share neither sentence nor voice with train"
            + ("" if splits.identity_split else "; one identity only: all splits share it")
        ),
    }
    per_split: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        rows = [r for r in lines if r["split"] == split]
        split_doc[split] = {
            "identities": splits.identities[split],
            "voices": splits.voices[split],
            "sentences": sorted({r["sentence_id"] for r in rows}),
            "clips": len(rows),
            "frames": sum(r["frames"] for r in rows),
        }
        per_split[split] = {"clips": len(rows), "frames": sum(r["frames"] for r in rows)}
    write_json_atomic(out / "splits.json", split_doc)
    return SynthSummary(
        out=out,
        clips=len(plans),
        generated=len(todo),
        skipped=len(plans) - len(todo),
        frames_generated=frames,
        wall_s=wall,
        cpu_s=cpu,
        per_split=per_split,
        sources=[s.key for s in usable],
        skipped_sources=skipped_sources,
    )
