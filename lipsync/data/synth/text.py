"""Random English sentences from a small grammar and the shipped word list (``words.txt``).

:func:`sentence_text` makes the text of one corpus sentence (one or more grammatical sentences,
``min_words``..``max_words`` words in all) from a numpy ``Generator``; the same generator state
gives the same text. The templates cover statements, questions and requests so that eSpeak's
intonation (and the pauses it puts at commas and sentence ends) varies; the word list is common
vocabulary (about 550 words and phrases) that eSpeak NG's English dictionaries pronounce
without guessing.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

import numpy as np

__all__ = ["Lexicon", "lexicon", "sentence_text"]


class Lexicon:
    """Word classes of ``words.txt``: ``name``, ``noun``, ``adjective``, ``verb`` (base, past),
    ``adverb``, ``place`` and ``time`` (multi-word phrases)."""

    def __init__(self, text: str) -> None:
        sections: dict[str, list[str]] = {}
        current: list[str] | None = None
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            if line.startswith("[") and line.endswith("]"):
                current = sections.setdefault(line[1:-1], [])
                continue
            if current is None:
                raise ValueError(f"word outside a section: {line!r}")
            for word in line.split():
                if word not in current:
                    current.append(word.replace("_", " "))
        self.names = sections["name"]
        self.nouns = sections["noun"]
        self.adjectives = sections["adjective"]
        self.verbs = [tuple(v.split("/")) for v in sections["verb"]]
        self.adverbs = sections["adverb"]
        self.places = sections["place"]
        self.times = sections["time"]
        if any(len(v) != 2 for v in self.verbs):
            raise ValueError("verbs must be listed as base/past")

    @property
    def size(self) -> int:
        return sum(
            len(x)
            for x in (
                self.names,
                self.nouns,
                self.adjectives,
                self.verbs,
                self.adverbs,
                self.places,
                self.times,
            )
        )


@lru_cache(maxsize=1)
def lexicon() -> Lexicon:
    """The shipped word list."""
    return Lexicon(resources.files(__package__).joinpath("words.txt").read_text("utf-8"))


def _article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


def _one_sentence(rng: np.random.Generator, lex: Lexicon) -> str:
    def pick(items):
        return items[int(rng.integers(len(items)))]

    n1, n2, n3 = pick(lex.nouns), pick(lex.nouns), pick(lex.nouns)
    a1, a2 = pick(lex.adjectives), pick(lex.adjectives)
    base, past = pick(lex.verbs)
    past2 = pick(lex.verbs)[1]
    name, name2 = pick(lex.names), pick(lex.names)
    adv, place, when = pick(lex.adverbs), pick(lex.places), pick(lex.times)
    templates = (
        f"The {a1} {n1} {past} the {n2} {place}.",
        f"{name} {past} {_article(a1)} {a1} {n1} {when}.",
        f"Did the {n1} {base} the {a1} {n2}?",
        f"{name} and {name2} {past} the {n1} {adv}.",
        f"We will {base} the {a1} {n1} {when}.",
        f"My {n1} {past} the {n2} {adv} {place}.",
        f"Please {base} the {a1} {n1} {place}.",
        f"The {n1} was {a1}, but the {n2} was {a2}.",
        f"Why did {name} {base} the {n1} {when}?",
        f"{_article(a1).capitalize()} {a1} {n1} and {_article(a2)} {a2} {n2} stood {place}.",
        f"{name} never wanted to {base} the {a1} {n1}.",
        f"When the {n1} {past} the {n2}, {name} {adv} {past2} the {n3}.",
        f"Could you {base} the {n1} {when}, {name}?",
        f"Nobody knew why the {a1} {n1} {past} the {a2} {n2}.",
    )
    return pick(templates)


def sentence_text(rng: np.random.Generator, min_words: int = 13, max_words: int = 19) -> str:
    """One or more random sentences with ``min_words`` to ``max_words`` words in all: a target
    count is drawn uniformly, sentences are added while the count is below it (each must keep
    the total within ``max_words``); a draw that cannot reach ``min_words`` starts again (after
    100 attempts the last one is returned as it is). The templates make sentences of 6 to 12
    words; when not even one fits in ``max_words``, the shortest one drawn is returned."""
    if not 1 <= min_words <= max_words:
        raise ValueError(f"need 1 <= min_words <= max_words, got {min_words}, {max_words}")
    lex = lexicon()
    parts: list[str] = []
    shortest = ""
    for _ in range(100):
        target = int(rng.integers(min_words, max_words + 1))
        parts, count = [], 0
        while count < target:
            for _ in range(30):
                s = _one_sentence(rng, lex)
                n = len(s.split())
                if not shortest or n < len(shortest.split()):
                    shortest = s
                if count + n <= max_words:
                    parts.append(s)
                    count += n
                    break
            else:
                break  # nothing fits in the words left
        if count >= min_words:
            break
    return " ".join(parts) if parts else shortest
