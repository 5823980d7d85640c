"""The phone inventory ``lipsync-phones/1``: labels, integer ids, viseme classes and targets.

Phones
    The 39 phones of ARPAbet (CMUdict's set, no stress) plus ``SIL`` (silence / pause), ``Q``
    (glottal stop) and ``SPN`` (a phone eSpeak produced that this table does not know; none does
    for the shipped voices, a test checks it). :data:`PHONES` fixes the order, so a phone's id is
    its index: ``SIL`` = 0, ... For CTC, use ``len(PHONES)`` (or a shifted table) as the blank.

    eSpeak NG's English phoneme mnemonics (``ph_english*`` tables: ``D``, ``@2``, ``aI@``,
    ``t#``...) differ between its English voices; :data:`ESPEAK_TO_PHONE` maps every mnemonic
    the shipped voices produce (and the other common ones) to one phone. eSpeak's diphthongs and
    r-coloured vowels map to the nearest ARPAbet vowel (``A@`` "car" -> ``AA``, ``e@`` "air" ->
    ``EH``, ``aI@`` "fire" -> ``AY``), syllabic consonants to the consonant (``@L`` -> ``L``),
    flaps and dental variants of t to ``T``. The mnemonic ``;`` (a voiced link eSpeak inserts
    between a word-final and a word-initial vowel) is not a phone: its time is added to the
    preceding phone.

Visemes
    Every phone belongs to one of the 14 viseme classes of :data:`VISEMES` (mouth shapes that
    look alike: ``bilabial`` P B M, ``labiodental`` F V, ``dental`` TH DH, ...). A class has a
    target for each of the 5 mouth parameters :data:`PARAMS` (all in [0, 1]):

    - ``open``: jaw / inner-lip opening (0 closed, 1 wide open "aa");
    - ``width``: mouth-corner spread (0 narrow, 0.5 relaxed, 1 spread "ee");
    - ``round``: lip rounding and protrusion ("oo", "w");
    - ``teeth``: how much of the teeth shows when the lips part;
    - ``tongue``: how far the tongue tip shows (between the teeth for TH / DH).

    and a *dominance* per parameter: how strongly the class imposes that target on its
    neighbours in co-articulation (:mod:`lipsync.data.synth.visemes`). Bilabials dominate
    ``open`` (the lips must close), rounded classes dominate ``round``, /h/ and the glottal stop
    barely dominate anything (they take the shape of the next vowel).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "ESPEAK_TO_PHONE",
    "PARAMS",
    "PHONES",
    "PHONE_SET",
    "PHONE_TO_VISEME",
    "VISEMES",
    "VisemeClass",
    "normalise_espeak",
    "phone_id",
    "viseme_of",
]

PHONE_SET = "lipsync-phones/1"

PHONES: tuple[str, ...] = (
    "SIL",
    # vowels
    "AA", "AE", "AH", "AO", "AW", "AY", "EH", "ER", "EY", "IH", "IY", "OW", "OY", "UH", "UW",
    # consonants
    "B", "CH", "D", "DH", "F", "G", "HH", "JH", "K", "L", "M", "N", "NG", "P", "R", "S", "SH",
    "T", "TH", "V", "W", "Y", "Z", "ZH",
    # extra
    "Q", "SPN",
)  # fmt: skip
_PHONE_IDS = {p: i for i, p in enumerate(PHONES)}

PARAMS: tuple[str, ...] = ("open", "width", "round", "teeth", "tongue")


@dataclass(frozen=True)
class VisemeClass:
    """A viseme class: its phones, the 5 targets and the 5 dominances (order of :data:`PARAMS`)."""

    name: str
    phones: tuple[str, ...]
    target: tuple[float, float, float, float, float]
    dominance: tuple[float, float, float, float, float]


VISEMES: tuple[VisemeClass, ...] = (
    #            name            phones                          open width round teeth tongue
    VisemeClass("rest", ("SIL",), (0.0, 0.45, 0.0, 0.0, 0.0), (1.0, 0.6, 1.0, 1.0, 1.0)),
    VisemeClass(
        "bilabial", ("P", "B", "M"), (0.0, 0.45, 0.1, 0.0, 0.0), (30.0, 1.0, 0.7, 8.0, 1.0)
    ),
    VisemeClass(
        "labiodental", ("F", "V"), (0.12, 0.5, 0.0, 0.95, 0.0), (6.0, 1.0, 1.0, 8.0, 1.0)
    ),
    VisemeClass("dental", ("TH", "DH"), (0.24, 0.52, 0.0, 0.7, 0.9), (2.5, 1.0, 1.0, 3.0, 5.0)),
    VisemeClass(
        "alveolar", ("T", "D", "N", "L", "S", "Z"), (0.18, 0.55, 0.0, 0.75, 0.25),
        (1.5, 0.8, 0.6, 2.0, 2.0),
    ),
    VisemeClass(
        "postalveolar", ("SH", "ZH", "CH", "JH"), (0.2, 0.32, 0.7, 0.8, 0.05),
        (1.5, 2.0, 2.5, 2.0, 1.0),
    ),
    VisemeClass("velar", ("K", "G", "NG"), (0.26, 0.5, 0.0, 0.4, 0.0), (0.8, 0.5, 0.5, 0.8, 1.0)),
    VisemeClass("glottal", ("HH", "Q"), (0.35, 0.5, 0.0, 0.3, 0.0), (0.2, 0.2, 0.2, 0.2, 0.2)),
    VisemeClass("rhotic", ("R", "ER"), (0.26, 0.36, 0.55, 0.35, 0.15), (1.2, 1.5, 2.0, 1.0, 1.0)),
    VisemeClass("glide_w", ("W",), (0.08, 0.15, 1.0, 0.0, 0.0), (2.0, 3.0, 4.0, 1.0, 1.0)),
    VisemeClass(
        "open", ("AA", "AE", "AY", "AW"), (0.85, 0.58, 0.0, 0.45, 0.0),
        (1.6, 1.0, 1.0, 1.0, 1.0),
    ),
    VisemeClass(
        "mid", ("AH", "EH", "EY", "SPN"), (0.52, 0.6, 0.0, 0.5, 0.0),
        (1.0, 1.0, 1.0, 1.0, 1.0),
    ),
    VisemeClass(
        "spread", ("IY", "IH", "Y"), (0.3, 0.85, 0.0, 0.75, 0.0),
        (1.0, 2.0, 1.5, 1.5, 1.0),
    ),
    VisemeClass(
        "round", ("UW", "UH", "OW", "OY", "AO"), (0.42, 0.25, 0.9, 0.2, 0.0),
        (1.0, 2.5, 3.0, 1.0, 1.0),
    ),
)  # fmt: skip

PHONE_TO_VISEME: dict[str, str] = {p: v.name for v in VISEMES for p in v.phones}
_VISEME_BY_NAME = {v.name: v for v in VISEMES}

# eSpeak NG English mnemonics -> phones. The ones the shipped voices produce (measured over the
# word list in all 8 English voices) and the rest of the English tables' common mnemonics.
ESPEAK_TO_PHONE: dict[str, str] = {
    # pauses
    "_": "SIL", "_:": "SIL", "_!": "SIL", "_;_": "SIL", "_^_": "SIL", "_#": "SIL",
    # vowels
    "0": "AA", "A:": "AA", "A@": "AA", "A": "AA", "aa": "AE", "a": "AE", "a#": "AH",
    "@": "AH", "@-": "AH", "@2": "AH", "@5": "AH", "V": "AH", "VR": "ER",
    "3": "ER", "3:": "ER", "IR": "ER", "@r": "ER",
    "E": "EH", "e": "EH", "e@": "EH", "E2": "EH", "E3": "EH", "eI": "EY", "eI@": "EY",
    "I": "IH", "I#": "IH", "I2": "IH", "I2#": "IH", "i@": "IH", "i@3": "IH",
    "i": "IY", "i:": "IY",
    "O": "AO", "O:": "AO", "O2": "AO", "O@": "AO", "o@": "AO", "OI": "OY",
    "o": "OW", "o:": "OW", "oU": "OW", "oU#": "OW",
    "U": "UH", "U@": "UH", "u:": "UW", "u": "UW",
    "aI": "AY", "aI2": "AY", "aI3": "AY", "aI@": "AY", "aU": "AW", "aU@": "AW",
    # consonants
    "b": "B", "tS": "CH", "d": "D", "d#": "D", "D": "DH", "f": "F", "g": "G", "h": "HH",
    "dZ": "JH", "k": "K", "x": "K", "l": "L", "@L": "L", "l/": "L", "L": "L", "m": "M",
    "n": "N", "n-": "N", "N": "NG", "p": "P", "r": "R", "r-": "R", "r/": "R", "s": "S",
    "S": "SH", "t": "T", "t#": "T", "t2": "T", "t[": "T", "T": "TH", "v": "V", "w": "W",
    "w#": "W", "W": "W", "j": "Y", "z": "Z", "Z": "ZH", "?": "Q",
}  # fmt: skip

LINK_MNEMONIC = ";"  # merged into the preceding phone (see the module docstring)


def normalise_espeak(mnemonic: str) -> str:
    """The phone of an eSpeak mnemonic; ``SPN`` when unknown."""
    return ESPEAK_TO_PHONE.get(mnemonic, "SPN")


def phone_id(label: str) -> int:
    """Integer id of a phone label (its index in :data:`PHONES`)."""
    return _PHONE_IDS[label]


def viseme_of(label: str) -> VisemeClass:
    """The viseme class of a phone label."""
    return _VISEME_BY_NAME[PHONE_TO_VISEME[label]]


def viseme_tables() -> tuple[np.ndarray, np.ndarray]:
    """``(targets, dominance)``, each ``(len(PHONES), 5)`` float64, indexed by phone id."""
    targets = np.array([viseme_of(p).target for p in PHONES], dtype=np.float64)
    dominance = np.array([viseme_of(p).dominance for p in PHONES], dtype=np.float64)
    return targets, dominance
