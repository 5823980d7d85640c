"""Per-frame phone labels for the phone head: one interface, two sources.

The phoneme-aware head (:mod:`lipsync.train.phone_ctc`) needs, for every video frame of a
training segment, the phone being spoken (an id of ``lipsync-phones/1``,
:data:`lipsync.data.synth.phones.PHONES`; -1 where unknown). :class:`PhoneAligner` is what it
asks:

* :class:`CorpusPhoneAligner` — the synthetic corpus, whose phone times are exact (taken from the
  speech synthesiser while it writes the audio, docs/DATA.md): read from a training pack or a
  processed corpus' ``final/*.json`` labels. What the demo and the quality protocol use.
* :class:`ForcedPhoneAligner` — real footage with a transcript: a grapheme-to-phoneme step
  (:class:`EspeakG2P`: eSpeak NG's phonemes of the text, mapped to the same inventory as the
  corpus) and CTC forced alignment (:func:`ctc_forced_align`, Viterbi over the CTC topology) of
  that phone sequence on the emissions of an **acoustic model you supply**: a phone recogniser
  (e.g. a wav2vec2 / HuBERT CTC phoneme model) saved with ``torch.export.save`` (``.pt2``, a
  dynamic length) or as TorchScript (``.pt``), plus a JSON sidecar naming its output units.
  None ships with lipsync (no weights of that kind are available here); without one, building
  the aligner fails with one line saying what to provide.

A video frame ``i`` (25 fps) gets the phone whose span covers its centre ``(i + 0.5) / 25`` s,
the rule the corpus' labels use. Spans tile the audio: a phone lasts from its first emission to
the next phone's first emission; frames before the first phone and after the last are ``SIL``.

For real footage, :func:`annotate_corpus` (``python -m lipsync.data.phone_align annotate CORPUS
--acoustic-model M``) writes the aligned phones into a processed corpus' ``final/*.json``
(``labels.phones``, the synthetic corpus' layout), from each segment's ``labels.text`` or a
transcripts file; ``lipsync train unet`` (``quality.phone_ctc``) and
:meth:`CorpusPhoneAligner.from_processed_corpus` then read them like the corpus' own.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import typer

from lipsync.audio import load_audio
from lipsync.data.synth.phones import PHONES, normalise_espeak
from lipsync.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    run_reporting_errors,
)

FPS = 25
SAMPLE_RATE = 16000
SIL = PHONES.index("SIL")


@dataclass(frozen=True)
class Utterance:
    """One segment to label: its id (corpus sources), 16 kHz mono audio and transcript (forced
    alignment), and how many video frames it has."""

    frames: int
    segment_id: str | None = None
    wav: np.ndarray | None = None
    transcript: str | None = None


class PhoneAligner(Protocol):
    """Per-frame phone ids of an utterance."""

    def frame_phones(self, utterance: Utterance) -> np.ndarray:
        """(frames,) int64 ids of :data:`PHONES`, -1 where unknown."""
        ...


def phones_from_spans(spans: Sequence[tuple[str, float, float]], frames: int) -> np.ndarray:
    """[(label, start s, end s)] -> (frames,) ids: the phone covering each frame's centre."""
    out = np.full(frames, -1, dtype=np.int64)
    centres = (np.arange(frames) + 0.5) / FPS
    for label, start, end in spans:
        out[(centres >= start) & (centres < end)] = PHONES.index(label) if label in PHONES else -1
    return out


# --------------------------------------------------------------------------- the corpus


class CorpusPhoneAligner:
    """Exact labels of the synthetic corpus, looked up by segment id."""

    def __init__(self, table: Mapping[str, np.ndarray]):
        self.table = {k: np.asarray(v, dtype=np.int64) for k, v in table.items()}

    @classmethod
    def from_pack(cls, pack: Any, split: str) -> CorpusPhoneAligner:
        """From a decoded training pack (:class:`lipsync.train.pack.Pack`) split."""
        inventory = list(pack.meta.get("phone_inventory", []))
        ids = np.array([PHONES.index(p) if p in PHONES else -1 for p in inventory] + [-1])
        local = pack.phones[split]
        table = {}
        for seg in pack.split_segments(split):
            rows = local[seg.start : seg.start + seg.frames]
            table[seg.id] = ids[np.where(rows >= 0, rows, len(inventory))]
        return cls(table)

    @classmethod
    def from_processed_corpus(cls, root: str | os.PathLike) -> CorpusPhoneAligner:
        """From a processed corpus' ``final/*.json`` (segments whose labels carry phones)."""
        table = {}
        for path in sorted(Path(root, "final").glob("*.json")):
            rec = json.loads(path.read_text())
            phones = (rec.get("labels") or {}).get("phones")
            if phones:
                spans = [(p["label"], p["start"], p["end"]) for p in phones]
                table[rec["id"]] = phones_from_spans(spans, int(rec["frames"]))
        if not table:
            raise ConfigError(f"{root}: no segment of this corpus has phone labels")
        return cls(table)

    def frame_phones(self, utterance: Utterance) -> np.ndarray:
        if utterance.segment_id not in self.table:
            raise ConfigError(f"no phone labels for segment {utterance.segment_id!r}")
        got = self.table[utterance.segment_id][: utterance.frames]
        return np.pad(got, (0, utterance.frames - len(got)), constant_values=-1)


# --------------------------------------------------------------------------- real footage


class EspeakG2P:
    """Text -> phones of ``lipsync-phones/1`` with eSpeak NG (the corpus' own mapping of eSpeak's
    mnemonics, :data:`lipsync.data.synth.phones.ESPEAK_TO_PHONE`); pauses dropped."""

    def __init__(self, voice: str = "en-us"):
        self.voice = voice

    def __call__(self, text: str) -> list[str]:
        # eSpeak through the corpus' binding (it needs PyAV and libespeak-ng): loaded on use
        from lipsync.data.synth.tts import VoiceSettings, synthesize

        speech = synthesize(text, VoiceSettings(self.voice))
        labels = [normalise_espeak(p.label) for p in speech.phones]
        return [p for p in labels if p != "SIL"]


def ctc_forced_align(log_probs: np.ndarray, targets: Sequence[int], blank: int) -> np.ndarray:
    """Viterbi alignment of ``targets`` on CTC emissions: log_probs (T, C) -> (T,) the index
    into ``targets`` each emission frame is aligned to (-1 for blank frames). ValueError when
    the targets cannot fit in T frames."""
    lp = np.asarray(log_probs, dtype=np.float64)
    t_max, n = lp.shape[0], len(targets)
    ext = [blank]
    for tok in targets:
        ext += [int(tok), blank]
    s_max = len(ext)
    repeats = sum(1 for i in range(1, n) if targets[i] == targets[i - 1])
    if n + repeats > t_max:
        raise ValueError(f"{n} labels ({repeats} repeats) do not fit in {t_max} emission frames")
    neg = -np.inf
    score = np.full((t_max, s_max), neg)
    back = np.zeros((t_max, s_max), dtype=np.int8)  # 0: stay, 1: from s-1, 2: from s-2
    score[0, 0] = lp[0, ext[0]]
    if s_max > 1:
        score[0, 1] = lp[0, ext[1]]
    ext_arr = np.array(ext)
    skip_ok = np.zeros(s_max, dtype=bool)
    skip_ok[2:] = (ext_arr[2:] != blank) & (ext_arr[2:] != ext_arr[:-2])
    for t in range(1, t_max):
        prev = score[t - 1]
        stay = prev
        step = np.concatenate([[neg], prev[:-1]])
        skip = np.where(skip_ok, np.concatenate([[neg, neg], prev[:-2]]), neg)
        options = np.stack([stay, step, skip])
        back[t] = options.argmax(axis=0)
        score[t] = options.max(axis=0) + lp[t, ext_arr]
    end = s_max - 1 if s_max == 1 or score[-1, -1] >= score[-1, -2] else s_max - 2
    if not np.isfinite(score[-1, end]):
        raise ValueError("no CTC path aligns these targets")
    path = np.empty(t_max, dtype=np.int64)
    s = end
    for t in range(t_max - 1, -1, -1):
        path[t] = s
        s -= int(back[t, s])
    return np.where(path % 2 == 1, (path - 1) // 2, -1)


@dataclass(frozen=True)
class AcousticModelSpec:
    """The JSON sidecar ``<model>.json`` of a TorchScript acoustic model:

    ``labels`` (its output units, in order), ``blank`` (index of the CTC blank), ``stride``
    (16 kHz samples per emission frame, e.g. 320 for wav2vec2), and optionally ``label_map``
    (its unit -> a phone of lipsync-phones/1, for models with other inventories: IPA...)."""

    labels: tuple[str, ...]
    blank: int
    stride: int
    label_map: Mapping[str, str] | None = None

    @classmethod
    def read(cls, path: Path) -> AcousticModelSpec:
        try:
            raw = json.loads(path.read_text())
            spec = cls(
                tuple(raw["labels"]), int(raw["blank"]), int(raw["stride"]), raw.get("label_map")
            )
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"cannot read the acoustic model's sidecar {path}: {e} (needs labels, blank, "
                "stride)"
            ) from None
        if not 0 <= spec.blank < len(spec.labels) or spec.stride < 1:
            raise CheckpointError(f"{path}: blank {spec.blank} or stride {spec.stride} invalid")
        return spec

    def phone(self, unit: str) -> str:
        return (self.label_map or {}).get(unit, unit)


class ForcedPhoneAligner:
    """G2P + CTC forced alignment on a user-supplied acoustic model (module docstring)."""

    def __init__(
        self,
        acoustic_model: str | os.PathLike | None,
        g2p: Callable[[str], list[str]] | None = None,
        device: str | torch.device = "cpu",
    ):
        if not acoustic_model:
            raise ConfigError(
                "forced phone alignment needs an acoustic model: a TorchScript CTC phone "
                "recogniser (wav (1, N) 16 kHz -> (1, T, units)) with a JSON sidecar "
                "(labels, blank, stride); lipsync ships none"
            )
        path = Path(acoustic_model).expanduser()
        sidecar = path.with_suffix(".json")
        if not path.is_file():
            raise CheckpointNotFoundError(f"acoustic model not found: {path}")
        if not sidecar.is_file():
            raise CheckpointNotFoundError(
                f"the acoustic model {path} has no sidecar {sidecar} (labels, blank, stride)"
            )
        self.spec = AcousticModelSpec.read(sidecar)
        self.device = torch.device(device)
        try:
            if path.suffix == ".pt2":  # torch.export.save
                self.model = torch.export.load(str(path)).module().to(self.device)
            else:
                self.model = torch.jit.load(str(path), map_location=self.device).eval()
        except (RuntimeError, ValueError) as e:
            raise CheckpointError(
                f"{path} is neither a TorchScript (.pt) nor a torch.export (.pt2) model: {e}"
            ) from None
        self.g2p = g2p or EspeakG2P()
        self.unit_of = {}
        for i, unit in enumerate(self.spec.labels):
            if i != self.spec.blank:
                self.unit_of.setdefault(self.spec.phone(unit), i)

    @torch.inference_mode()
    def emissions(self, wav: np.ndarray) -> np.ndarray:
        """(N,) 16 kHz -> (T, units) log-probabilities."""
        x = torch.as_tensor(np.asarray(wav, dtype=np.float32), device=self.device)[None]
        out = self.model(x)
        out = out[0] if out.dim() == 3 else out
        return torch.log_softmax(out.float(), dim=-1).cpu().numpy()

    def spans(self, wav: np.ndarray, phones: Sequence[str]) -> list[tuple[str, float, float]]:
        """Align ``phones`` on ``wav``: [(phone, start s, end s)] tiling the audio (SIL around)."""
        missing = sorted({p for p in phones if p not in self.unit_of})
        if missing:
            raise ConfigError(
                f"the acoustic model has no unit for {', '.join(missing)}: add a label_map to "
                "its sidecar"
            )
        lp = self.emissions(wav)
        path = ctc_forced_align(lp, [self.unit_of[p] for p in phones], self.spec.blank)
        sec = self.spec.stride / SAMPLE_RATE
        firsts = [int(np.flatnonzero(path == k)[0]) for k in range(len(phones))]
        end = len(wav) / SAMPLE_RATE
        out = [("SIL", 0.0, firsts[0] * sec)] if firsts and firsts[0] > 0 else []
        for k, p in enumerate(phones):
            last = firsts[k + 1] if k + 1 < len(phones) else int(np.flatnonzero(path == k)[-1]) + 1
            out.append((p, firsts[k] * sec, last * sec))
        if out and out[-1][2] < end:
            out.append(("SIL", out[-1][2], end))
        return out

    def frame_phones(self, utterance: Utterance) -> np.ndarray:
        if utterance.wav is None or not utterance.transcript:
            raise ConfigError("forced phone alignment needs the utterance's audio and transcript")
        phones = self.g2p(utterance.transcript)
        if not phones:
            return np.full(utterance.frames, SIL, dtype=np.int64)
        return phones_from_spans(self.spans(utterance.wav, phones), utterance.frames)


# --------------------------------------------------------------------------- a processed corpus


def annotate_corpus(
    root: str | os.PathLike,
    aligner: ForcedPhoneAligner,
    transcripts: Mapping[str, str] | None = None,
    load: Callable[[Path], np.ndarray] | None = None,
) -> dict[str, int]:
    """Write forced-aligned phones into every ``final/<id>.json`` of a processed corpus that has
    a transcript (``transcripts[id]``, else its ``labels.text``): ``labels.phones`` as
    ``[{label, start, end}]`` in seconds (atomic rewrite). ``load``: the segment's 16 kHz audio
    (default :func:`lipsync.audio.load_audio` of its media). Returns counts (annotated, skipped)."""
    load = load or load_audio
    counts = {"annotated": 0, "skipped": 0}
    final = Path(root, "final")
    if not final.is_dir():
        raise ConfigError(f"{root} is not a processed corpus (no final/ folder)")
    for path in sorted(final.glob("*.json")):
        rec = json.loads(path.read_text())
        labels = rec.setdefault("labels", {})
        text = (transcripts or {}).get(rec["id"]) or labels.get("text")
        if not text:
            counts["skipped"] += 1
            continue
        wav = load(final / rec.get("media", f"{rec['id']}.mp4"))
        phones = aligner.g2p(text)
        spans = aligner.spans(wav, phones) if phones else [("SIL", 0.0, len(wav) / SAMPLE_RATE)]
        labels["phones"] = [{"label": p, "start": round(a, 4), "end": round(b, 4)}
                            for p, a, b in spans]  # fmt: skip
        labels["phones_source"] = "forced alignment (lipsync.data.phone_align)"
        tmp = path.with_name(path.name + ".part")
        tmp.write_text(json.dumps(rec))
        os.replace(tmp, path)
        counts["annotated"] += 1
    return counts


app = typer.Typer(no_args_is_help=True, help="Per-frame phone labels (module docstring).")


@app.callback()
def _commands() -> None:
    """Per-frame phone labels for the phone head."""


@app.command("annotate")
def annotate_command(
    corpus: Path = typer.Argument(..., help="A processed corpus (lipsync data process output)."),
    acoustic_model: Path = typer.Option(..., help="TorchScript (.pt) or torch.export (.pt2)."),
    transcripts: Path | None = typer.Option(None, help="JSONL of {id, text} (else labels.text)."),
    voice: str = typer.Option("en-us", help="eSpeak NG voice of the transcripts' language."),
) -> None:
    """Forced-align each segment's transcript and write its phones into final/<id>.json."""
    texts = None
    if transcripts is not None:
        lines = transcripts.read_text().splitlines()
        texts = {r["id"]: r["text"] for r in (json.loads(x) for x in lines if x.strip())}
    aligner = ForcedPhoneAligner(acoustic_model, EspeakG2P(voice))
    typer.echo(json.dumps(annotate_corpus(corpus, aligner, texts)))


def main() -> None:
    run_reporting_errors(app)


if __name__ == "__main__":
    main()
