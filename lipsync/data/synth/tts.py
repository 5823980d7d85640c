"""Speech with exact phone timings: libespeak-ng through ctypes, resampled to 16 kHz.

How the timings are exact
-------------------------
eSpeak NG is a formant synthesiser: it turns the text into a list of phonemes with durations,
then a wave generator renders that list into samples. With the phoneme-events option
(``espeakINITIALIZE_PHONEME_EVENTS``) the generator puts a *marker* into its command queue at the
start of every phoneme, and one before the first phoneme of every word. In synchronous mode
(``AUDIO_OUTPUT_SYNCHRONOUS``) the library calls our callback with each buffer of samples and the
markers it crossed; each marker's ``sample`` field is the index, in the produced audio, of the
sample where the generator was when it met the marker (``count_samples`` + position in the
buffer, see eSpeak NG's ``MarkerEvent``). These are the synthesiser's own boundaries, read while
it writes the audio, not estimated afterwards.

From the events we build a tiling of the whole waveform:

* A phone lasts from its phoneme event to the next phoneme event; the last one ends at the last
  sample. Pause phonemes (``_``, ``_:``, ``_!``...) are phones too (silence in the audio).
* eSpeak renders a phoneme's *pre-pause* (the silent closure before a stop, a short gap at some
  word starts) after the word marker and before the phoneme marker. Where a word marker lies
  strictly inside the previous phone, the stretch from the word marker to the word's first
  phoneme marker is that pre-pause; it becomes part of the word's first phone (a stop's closure
  is part of the stop), so the previous phone ends at the word marker. Inside words eSpeak places
  no marker before a pre-pause; there it stays with the previous phone.
* After a nasal or liquid, eSpeak emits a vowel's phoneme marker only after the consonant-to-vowel
  transition, which it renders while processing the vowel; the word marker of a word that follows
  such a consonant can therefore precede that consonant's audio. Words are therefore not timed by
  their word markers but by their phones: every phoneme event carries the text position of its
  word, so a word lasts from its first phone's start to its last phone's end.
* Zero-length phones (two markers at one sample) are dropped.

Resampling: eSpeak writes 22050 Hz int16. :func:`resample` converts to 16 kHz float32 with
libswresample (PyAV's ``AudioResampler``, the resampler ``lipsync.audio.load_audio`` uses at
inference). It has no delay: an impulse at sample ``s`` of the 22050 Hz signal peaks at
``s * 16000 / 22050`` (to 0.1 sample, checked by ``tests/data/test_synth.py``), so times in
seconds (``sample / 22050``) hold in the new rate unchanged.

Reproducibility: eSpeak NG keeps state between utterances in static variables (the wave
generator's pitch-flutter phase, for one), so the same text spoken twice in one process can come
out a few samples longer or shorter, depending on what was spoken before. :func:`synthesize`
therefore loads a fresh copy of the library for every utterance (``dlopen``, speak, then
``espeak_Terminate`` and ``dlclose``, about 25 ms). Voices with breath noise or roughness draw
from the C library's ``rand()``, which :func:`synthesize` seeds (``srand(noise_seed)``) just
before speaking. So the same text, voice and noise seed always give the same samples and events,
whatever the process spoke before. The library is not thread-safe; calls are serialised by a
lock.
"""

from __future__ import annotations

import _ctypes
import ctypes
import ctypes.util
import functools
import re
import threading
from dataclasses import dataclass, field

import av
import numpy as np

from lipsync.errors import ConfigError

__all__ = [
    "ESPEAK_SAMPLE_RATE",
    "Espeak",
    "PhoneTiming",
    "Speech",
    "VoiceSettings",
    "WordTiming",
    "espeak_version",
    "resample",
    "synthesize",
]

ESPEAK_SAMPLE_RATE = 22050

# speak_lib.h (eSpeak NG 1.51), the parts we use
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_PHONEME_EVENTS = 0x0001
_INITIALIZE_DONT_EXIT = 0x8000
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_EVENT_LIST_TERMINATED = 0
_EVENT_WORD = 1
_EVENT_PHONEME = 7
_EVENT_SAMPLERATE = 8
_PARAM_RATE, _PARAM_VOLUME, _PARAM_PITCH, _PARAM_RANGE = 1, 2, 3, 4


class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),  # 1-based character position of the word in the text
        ("length", ctypes.c_int),  # word length in characters (word events)
        ("audio_position", ctypes.c_int),  # milliseconds, truncated: not used
        ("sample", ctypes.c_int),  # exact sample index in the produced audio
        ("user_data", ctypes.c_void_p),
        ("id", _EventId),
    ]


_WORD_TRIM = re.compile(r"^[^\w']+|[^\w']+$")

_Callback = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event)
)


@dataclass(frozen=True)
class VoiceSettings:
    """An eSpeak NG voice: ``language`` (a voice name, e.g. ``en-us``), ``variant`` (a file in
    ``espeak-ng-data/voices/!v``, e.g. ``m3``, or ""), ``rate`` (words per minute, 80-450),
    ``pitch`` and ``range`` (0-100)."""

    language: str
    variant: str = ""
    rate: int = 165
    pitch: int = 50
    range: int = 50

    @property
    def espeak_name(self) -> str:
        return f"{self.language}+{self.variant}" if self.variant else self.language


@dataclass(frozen=True)
class PhoneTiming:
    """One phone: eSpeak's mnemonic, ``[start, end)`` in samples of the 22050 Hz audio, and the
    index of its word in :attr:`Speech.words` (-1 for pauses between words)."""

    label: str
    start: int
    end: int
    word: int = -1


@dataclass(frozen=True)
class WordTiming:
    text: str
    start: int
    end: int


@dataclass
class Speech:
    """Synthesised speech: int16 ``samples`` at :data:`ESPEAK_SAMPLE_RATE`, phones tiling
    ``[0, len(samples))`` and the words (in text order) they belong to."""

    samples: np.ndarray
    phones: list[PhoneTiming]
    words: list[WordTiming]
    sample_rate: int = ESPEAK_SAMPLE_RATE
    raw_events: list[tuple[str, int, int, str]] = field(default_factory=list, repr=False)


def _load_library() -> ctypes.CDLL:
    name = ctypes.util.find_library("espeak-ng")
    if name is None:
        raise ConfigError(
            "the synthetic corpus needs the eSpeak NG library (libespeak-ng.so.1): "
            "apt-get install espeak-ng"
        )
    lib = ctypes.CDLL(name)
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_Initialize.restype = ctypes.c_int
    lib.espeak_SetSynthCallback.argtypes = [_Callback]
    lib.espeak_SetSynthCallback.restype = None
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetVoiceByName.restype = ctypes.c_int
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_SetParameter.restype = ctypes.c_int
    lib.espeak_Synth.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_uint,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.c_uint,
        ctypes.c_void_p,
        ctypes.c_void_p,
    ]
    lib.espeak_Synth.restype = ctypes.c_int
    lib.espeak_Info.argtypes = [ctypes.c_void_p]
    lib.espeak_Info.restype = ctypes.c_char_p
    lib.espeak_Terminate.argtypes = []
    lib.espeak_Terminate.restype = ctypes.c_int
    return lib


class Espeak:
    """One loaded instance of libespeak-ng; :meth:`close` unloads it (use :func:`synthesize`)."""

    def __init__(self) -> None:
        self._lib = _load_library()
        rate = self._lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, 0, None, _INITIALIZE_PHONEME_EVENTS | _INITIALIZE_DONT_EXIT
        )
        if rate != ESPEAK_SAMPLE_RATE:
            raise ConfigError(f"eSpeak NG did not initialise (returned {rate})")
        self.version = (self._lib.espeak_Info(None) or b"?").decode()
        self._chunks: list[np.ndarray] = []
        self._events: list[tuple[int, int, int, int, str]] = []
        self._callback = _Callback(self._on_audio)  # keep a reference: C holds a raw pointer
        self._lib.espeak_SetSynthCallback(self._callback)

    def close(self) -> None:
        """Terminate and unload the library (the next :class:`Espeak` starts from scratch)."""
        lib, self._lib = self._lib, None
        if lib is None:
            return
        lib.espeak_Terminate()
        _ctypes.dlclose(lib._handle)

    def __enter__(self) -> Espeak:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _on_audio(self, wav, num_samples, events) -> int:
        if num_samples > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
        i = 0
        while events[i].type != _EVENT_LIST_TERMINATED:
            ev = events[i]
            if ev.type == _EVENT_PHONEME:
                name = ev.id.string.decode("ascii", "replace")
                self._events.append((ev.type, ev.sample, ev.text_position, 0, name))
            elif ev.type == _EVENT_WORD:
                self._events.append((ev.type, ev.sample, ev.text_position, ev.length, ""))
            i += 1
        return 0

    def synth(self, text: str, voice: VoiceSettings) -> Speech:
        """Speak ``text`` with ``voice``; see the module docstring for the timing rules."""
        data = text.encode("utf-8")
        if self._lib is None:
            raise RuntimeError("this Espeak instance is closed")
        if self._lib.espeak_SetVoiceByName(voice.espeak_name.encode()) != 0:
            raise ConfigError(f"eSpeak NG has no voice {voice.espeak_name!r}")
        for param, value in (
            (_PARAM_RATE, voice.rate),
            (_PARAM_PITCH, voice.pitch),
            (_PARAM_RANGE, voice.range),
            (_PARAM_VOLUME, 100),
        ):
            self._lib.espeak_SetParameter(param, int(value), 0)
        self._chunks, self._events = [], []
        buf = ctypes.create_string_buffer(data)
        err = self._lib.espeak_Synth(
            buf, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None
        )
        if err != 0:
            raise RuntimeError(f"espeak_Synth failed with error {err} for {text!r}")
        chunks, events = self._chunks, self._events
        self._chunks, self._events = [], []
        samples = np.concatenate(chunks) if chunks else np.zeros(0, np.int16)
        phones, words = _timings(text, events, len(samples))
        raw = [("phoneme" if t == _EVENT_PHONEME else "word", s, p, n) for t, s, p, _, n in events]
        return Speech(samples=samples, phones=phones, words=words, raw_events=raw)


def _timings(
    text: str, events: list[tuple[int, int, int, int, str]], total: int
) -> tuple[list[PhoneTiming], list[WordTiming]]:
    """Phones tiling ``[0, total)`` and their words, from the marker events (module docstring)."""
    # Word markers, in text order (eSpeak emits extra zero-length ones at clause ends). A word's
    # text runs to the next marker's position: eSpeak speaks some word pairs as one dictionary
    # entry ("of the") and marks only the first, so such a pair is one word of ours.
    positions = sorted(
        {pos for etype, _, pos, length, _ in events if etype == _EVENT_WORD and length > 0}
    )
    word_pos = {pos: i for i, pos in enumerate(positions)}
    word_text = []
    for i, pos in enumerate(positions):
        stop = positions[i + 1] - 1 if i + 1 < len(positions) else len(text)
        word_text.append(_WORD_TRIM.sub("", text[pos - 1 : stop]))
    starts: list[list] = []  # [label, start, word]
    pending_word_marker: int | None = None
    for etype, sample, pos, length, name in events:
        if etype == _EVENT_WORD:
            if length > 0:
                pending_word_marker = sample
            continue
        word = word_pos.get(pos, -1) if not name.startswith("_") else -1
        start = sample
        if (
            pending_word_marker is not None
            and word >= 0
            and starts
            and starts[-1][1] < pending_word_marker < sample
        ):
            start = pending_word_marker  # the pre-pause belongs to the word's first phone
        pending_word_marker = None
        starts.append([name, start, word])
    if not starts or starts[0][1] > 0:
        starts.insert(0, ["_", 0, -1])
    phones: list[PhoneTiming] = []
    for i, (name, start, word) in enumerate(starts):
        end = starts[i + 1][1] if i + 1 < len(starts) else total
        if end > start:
            phones.append(PhoneTiming(name, start, end, word))
    words: list[WordTiming] = []
    for w, wtext in enumerate(word_text):
        mine = [p for p in phones if p.word == w]
        if mine:
            words.append(WordTiming(wtext, mine[0].start, mine[-1].end))
    return phones, words


_LOCK = threading.Lock()


def synthesize(text: str, voice: VoiceSettings, noise_seed: int = 0) -> Speech:
    """Speak ``text`` with ``voice`` on a freshly loaded library, the C library's random
    generator seeded with ``noise_seed`` (reproducible, see the module docstring)."""
    with _LOCK:
        engine = Espeak()
        try:
            _libc().srand(ctypes.c_uint(noise_seed & 0xFFFFFFFF))
            return engine.synth(text, voice)
        finally:
            engine.close()


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL:
    lib = ctypes.CDLL(ctypes.util.find_library("c"))
    lib.srand.argtypes = [ctypes.c_uint]
    lib.srand.restype = None
    return lib


@functools.lru_cache(maxsize=1)
def espeak_version() -> str:
    with _LOCK:
        engine = Espeak()
        try:
            return engine.version
        finally:
            engine.close()


def resample(
    samples: np.ndarray, rate_in: int = ESPEAK_SAMPLE_RATE, rate_out: int = 16000
) -> np.ndarray:
    """int16 (or float in [-1, 1]) mono ``samples`` -> float32 at ``rate_out`` with libswresample
    (no delay: times in seconds are preserved). Output length ``round(n * rate_out / rate_in)``."""
    x = np.asarray(samples)
    if x.dtype != np.int16:
        x = np.clip(np.round(np.asarray(x, np.float64) * 32767.0), -32768, 32767).astype(np.int16)
    resampler = av.AudioResampler(format="flt", layout="mono", rate=rate_out)
    frame = av.AudioFrame.from_ndarray(x.reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate = rate_in
    frame.pts = 0
    out = [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
    out += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    y = np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)
    want = int(round(len(x) * rate_out / rate_in))
    if len(y) < want:
        y = np.pad(y, (0, want - len(y)))
    return y[:want]
