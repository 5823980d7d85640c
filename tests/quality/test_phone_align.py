"""Per-frame phone labels (issue 16): the corpus source, CTC forced alignment on a TorchScript
acoustic model (a real scripted model whose emissions follow tones in the audio), eSpeak G2P,
and the one-line errors when the acoustic model is missing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from lipsync.data.phone_align import (
    CorpusPhoneAligner,
    EspeakG2P,
    ForcedPhoneAligner,
    Utterance,
    annotate_corpus,
    ctc_forced_align,
    phones_from_spans,
)
from lipsync.data.synth.phones import PHONES
from lipsync.errors import CheckpointNotFoundError, ConfigError
from lipsync.train.pack import Pack, PackSegment

UNITS = ["<blank>", "AA", "M", "IY"]
TONES = {"AA": 500.0, "M": 800.0, "IY": 1100.0}  # whole cycles in a 20 ms emission frame


class ToneRecogniser(nn.Module):
    """A CTC 'phone recogniser' for tone-coded audio: per 20 ms frame, the share of the frame's
    energy at each unit's tone; the blank wins where no tone dominates (silence)."""

    def __init__(self):
        super().__init__()
        t = torch.arange(320, dtype=torch.float32) / 16000
        freqs = torch.tensor([TONES[u] for u in UNITS[1:]])
        self.register_buffer("cos", torch.cos(2 * torch.pi * freqs[:, None] * t[None]))
        self.register_buffer("sin", torch.sin(2 * torch.pi * freqs[:, None] * t[None]))

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        frames = wav[:, : wav.shape[1] // 320 * 320].reshape(wav.shape[0], -1, 320)
        power = (frames @ self.cos.T) ** 2 + (frames @ self.sin.T) ** 2  # (1, T, 3)
        share = power / (frames.pow(2).sum(-1, keepdim=True) * 160 + 1e-6)
        blank = torch.full_like(share[..., :1], 0.3)
        return 30 * torch.cat([blank, share], dim=-1)


def tone_wav(parts: list[tuple[str | None, float]]) -> np.ndarray:
    out = []
    for unit, seconds in parts:
        t = np.arange(int(seconds * 16000)) / 16000
        out.append(np.zeros_like(t) if unit is None else 0.5 * np.sin(2 * np.pi * TONES[unit] * t))
    return np.concatenate(out).astype(np.float32)


@pytest.fixture(params=["export", "torchscript"])
def acoustic_model(tmp_path, request):
    if request.param == "export":  # torch.export.save, any audio length
        path = tmp_path / "tones.pt2"
        program = torch.export.export(
            ToneRecogniser(), (torch.zeros(1, 3200),), dynamic_shapes=({1: torch.export.Dim.AUTO},)
        )
        torch.export.save(program, str(path))
    else:
        path = tmp_path / "tones.pt"
        torch.jit.script(ToneRecogniser()).save(str(path))
    path.with_suffix(".json").write_text(json.dumps({"labels": UNITS, "blank": 0, "stride": 320}))
    return path


def test_forced_alignment_recovers_the_phone_times(acoustic_model):
    wav = tone_wav([(None, 0.2), ("AA", 0.32), ("M", 0.2), ("IY", 0.28), (None, 0.2)])
    aligner = ForcedPhoneAligner(acoustic_model, g2p=str.split)
    spans = aligner.spans(wav, ["AA", "M", "IY"])
    assert [s[0] for s in spans] == ["SIL", "AA", "M", "IY", "SIL"]
    for (_, start, end), (want_start, want_end) in zip(
        spans[1:4], [(0.2, 0.52), (0.52, 0.72), (0.72, 1.0)], strict=True
    ):
        assert abs(start - want_start) <= 0.02 and abs(end - want_end) <= 0.02
    frames = aligner.frame_phones(Utterance(frames=30, wav=wav, transcript="AA M IY"))
    want = phones_from_spans(
        [
            ("SIL", 0, 0.2),
            ("AA", 0.2, 0.52),
            ("M", 0.52, 0.72),
            ("IY", 0.72, 1.0),
            ("SIL", 1.0, 1.2),
        ],
        30,
    )
    assert (frames == want).mean() >= 0.9
    assert frames[7] == PHONES.index("AA") and frames[26] == PHONES.index("SIL")


def test_ctc_forced_align_takes_the_best_path_and_refuses_impossible_ones():
    # 6 frames, targets [1, 1] (a repeat needs a blank between): best path 1 1 0 0 1 1
    lp = np.log(np.full((6, 3), 1e-3))
    lp[[0, 1, 4, 5], 1] = 0.0
    lp[[2, 3], 0] = 0.0
    assert ctc_forced_align(lp, [1, 1], blank=0).tolist() == [0, 0, -1, -1, 1, 1]
    with pytest.raises(ValueError, match="do not fit"):
        ctc_forced_align(lp[:2], [1, 1], blank=0)


def test_a_missing_acoustic_model_is_one_clear_error(tmp_path, acoustic_model):
    with pytest.raises(ConfigError, match="needs an acoustic model"):
        ForcedPhoneAligner(None)
    with pytest.raises(CheckpointNotFoundError, match="acoustic model not found"):
        ForcedPhoneAligner(tmp_path / "nope.pt")
    lonely = tmp_path / f"lonely{acoustic_model.suffix}"
    lonely.write_bytes(acoustic_model.read_bytes())
    with pytest.raises(CheckpointNotFoundError, match="no sidecar"):
        ForcedPhoneAligner(lonely)
    aligner = ForcedPhoneAligner(acoustic_model, g2p=str.split)
    with pytest.raises(ConfigError, match="no unit for SH"):
        aligner.spans(tone_wav([("AA", 0.2)]), ["SH"])
    with pytest.raises(ConfigError, match="audio and transcript"):
        aligner.frame_phones(Utterance(frames=5))


def test_espeak_g2p_gives_corpus_phones():
    phones = EspeakG2P()("mama see")
    assert phones[:2] == ["M", "AA"] or phones[:2] == ["M", "AH"]
    assert "S" in phones and "IY" in phones and set(phones) <= set(PHONES)


def test_corpus_aligner_reads_a_pack_split():
    inventory = ["SIL", "M", "AA"]
    phones = np.array([0, 1, 2, 2, -1, 0, 0], dtype=np.int64)
    pack = Pack(
        root=None,
        meta={"phone_inventory": inventory},
        segments=[PackSegment("a", "train", 4, 0), PackSegment("b", "train", 3, 4)],
        frames={},
        audio={},
        visemes={},
        phones={"train": phones},
    )
    aligner = CorpusPhoneAligner.from_pack(pack, "train")
    ids = [PHONES.index(p) for p in inventory]
    assert aligner.frame_phones(Utterance(4, "a")).tolist() == [ids[0], ids[1], ids[2], ids[2]]
    assert aligner.frame_phones(Utterance(5, "b")).tolist() == [-1, ids[0], ids[0], -1, -1]
    with pytest.raises(ConfigError, match="no phone labels for segment 'c'"):
        aligner.frame_phones(Utterance(3, "c"))


def test_annotating_a_processed_corpus_feeds_the_corpus_aligner(tmp_path, acoustic_model):
    final = tmp_path / "final"
    final.mkdir()
    wavs = {"a": tone_wav([(None, 0.2), ("AA", 0.4), ("M", 0.2), (None, 0.2)]),
            "b": tone_wav([(None, 0.4)])}  # fmt: skip
    for seg, text in (("a", "AA M"), ("b", None)):
        labels = {"text": text} if text else {}
        (final / f"{seg}.json").write_text(json.dumps(
            {"id": seg, "frames": 25, "media": f"{seg}.mp4", "labels": labels}))  # fmt: skip
    aligner = ForcedPhoneAligner(acoustic_model, g2p=str.split)
    counts = annotate_corpus(tmp_path, aligner, load=lambda p: wavs[p.stem])
    assert counts == {"annotated": 1, "skipped": 1}
    rec = json.loads((final / "a.json").read_text())
    assert [p["label"] for p in rec["labels"]["phones"]] == ["SIL", "AA", "M", "SIL"]
    frames = CorpusPhoneAligner.from_processed_corpus(tmp_path).frame_phones(Utterance(25, "a"))
    assert frames[8] == PHONES.index("AA") and frames[16] == PHONES.index("M")
    assert frames[0] == PHONES.index("SIL")
