"""Tibetan syllables and phrases of a transcription: what a user types to find a line.

A syllable is a maximal run of characters between delimiters: the tsheg (U+0F0B, U+0F0C), the shads and
other Tibetan punctuation (Unicode category P*, e.g. ། ༎ ༔ ༄ ༅), the Tibetan marks that are symbols (category So
in U+0F00-U+0FFF, e.g. ༓ ༴), and whitespace. Punctuation is never a syllable; combining signs (vowels,
subjoined letters, tsa-phru) and digits are part of their syllable.

A phrase is a run of consecutive whole syllables, written as the stretch of the transcription from its first
syllable's first character to its last syllable's last character (so a phrase that spans a shad keeps it:
``ཁ། ག``). Containment is by syllables: ``contains_phrase(text, phrase)`` is true when the phrase's syllables
occur as consecutive syllables of the text, whatever punctuation separates them in either, and never
matches half a syllable (``ག་ཁ`` is not in ``བག་ཁ``).

Pure functions, no I/O: used by the metrics (phrase queries) and by training (text spans). ``rng`` is either
a ``random.Random`` or a ``numpy.random.Generator``.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from typing import Any

import numpy as np

DEFAULT_MIN_SYLLABLES = 2
DEFAULT_MAX_SYLLABLES = 8


def is_delimiter(char: str) -> bool:
    """True for whitespace, punctuation (tsheg, shads, ...) and Tibetan symbol marks."""
    if char.isspace():
        return True
    category = unicodedata.category(char)
    return category.startswith("P") or (category == "So" and "\u0f00" <= char <= "\u0fff")


def syllable_spans(text: str) -> list[tuple[int, int]]:
    """``(start, stop)`` character offsets of each syllable of ``text``, in order."""
    spans, start = [], None
    for i, char in enumerate(text):
        if is_delimiter(char):
            if start is not None:
                spans.append((start, i))
                start = None
        elif start is None:
            start = i
    if start is not None:
        spans.append((start, len(text)))
    return spans


def syllables(text: str) -> list[str]:
    """The syllables of ``text``: ``syllables("བཀྲ་ཤིས་བདེ་ལེགས། ")`` is ``["བཀྲ", "ཤིས", "བདེ", "ལེགས"]``."""
    return [text[a:b] for a, b in syllable_spans(text)]


def _randint(rng: Any, low: int, high: int) -> int:
    """An integer in [low, high] (both included) from a numpy Generator or a random.Random."""
    if hasattr(rng, "integers"):
        return int(rng.integers(low, high + 1))
    return rng.randint(low, high)


def sample_phrase(text: str, rng: Any, min_syl: int = DEFAULT_MIN_SYLLABLES,
                  max_syl: int = DEFAULT_MAX_SYLLABLES) -> str | None:
    """A random run of whole syllables of ``text``: its length uniform in [min_syl, min(max_syl, #syllables)],
    then its start uniform among the places it fits. None when ``text`` has fewer than ``min_syl`` syllables.

    Two draws from ``rng`` per call (none when None is returned), so a seeded rng gives the same phrases."""
    if not 1 <= min_syl <= max_syl:
        raise ValueError(f"need 1 <= min_syl <= max_syl, got {min_syl}, {max_syl}")
    spans = syllable_spans(text)
    if len(spans) < min_syl:
        return None
    length = _randint(rng, min_syl, min(max_syl, len(spans)))
    first = _randint(rng, 0, len(spans) - length)
    return text[spans[first][0] : spans[first + length - 1][1]]


def sample_phrases(texts: Sequence[str], seed: int, min_syl: int = DEFAULT_MIN_SYLLABLES,
                   max_syl: int = DEFAULT_MAX_SYLLABLES) -> list[str | None]:
    """One phrase per text; text i's phrase depends only on (seed, i, text), not on the other texts."""
    return [sample_phrase(t, np.random.default_rng([seed, i]), min_syl, max_syl) for i, t in enumerate(texts)]


def _has_run(haystack: Sequence[str], needle: Sequence[str]) -> bool:
    n = len(needle)
    if n == 0:
        return False
    return any(haystack[i : i + n] == needle for i in range(len(haystack) - n + 1) if haystack[i] == needle[0])


def contains_phrase(text: str, phrase: str) -> bool:
    """True when the syllables of ``phrase`` occur as consecutive syllables of ``text`` (a phrase without
    syllables is in no text)."""
    return _has_run(syllables(text), syllables(phrase))


def phrase_matches(phrases: Sequence[str | None], texts: Sequence[str]) -> list[np.ndarray]:
    """For each phrase, the indices (ascending) of the texts that contain it; empty for a None phrase.

    An inverted index from syllables to texts keeps this near-linear: only the texts holding the phrase's
    rarest syllable are checked."""
    line_syllables = [tuple(syllables(t)) for t in texts]
    index: dict[str, list[int]] = {}
    for row, syls in enumerate(line_syllables):
        for syl in set(syls):
            index.setdefault(syl, []).append(row)
    out = []
    for phrase in phrases:
        needle = tuple(syllables(phrase)) if phrase is not None else ()
        if not needle or any(s not in index for s in needle):
            out.append(np.empty(0, dtype=np.int64))
            continue
        candidates = min((index[s] for s in set(needle)), key=len)
        out.append(np.array([row for row in candidates if _has_run(line_syllables[row], needle)], dtype=np.int64))
    return out


def phrase_spans(text: str, phrase: str) -> list[tuple[int, int]]:
    """``(start, stop)`` character offsets of each place in ``text`` where the syllables of ``phrase`` occur as
    consecutive syllables (``contains_phrase``'s matches), from the first syllable's first character to the last
    one's last: what the search page highlights. Matches do not overlap; none for a phrase without syllables."""
    spans, needle = syllable_spans(text), syllables(phrase)
    words = [text[a:b] for a, b in spans]
    n, out, i = len(needle), [], 0
    while n and i + n <= len(words):
        if words[i : i + n] == needle:
            out.append((spans[i][0], spans[i + n - 1][1]))
            i += n
        else:
            i += 1
    return out
