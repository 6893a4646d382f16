"""Tibetan syllables and phrases: the units a user types to find a line.

A syllable is a maximal run of characters between delimiters: the tsheg (U+0F0B, and the non-breaking
U+0F0C), the shads, yig mgo marks and other Tibetan punctuation, brackets, and whitespace. Punctuation is
never a syllable of its own.
"""

from __future__ import annotations

import re

import numpy as np

# Head marks and yig mgo (U+0F01-0F07), sbrul shad .. tsheg .. shads .. gter tsheg (U+0F08-0F14), the
# marks and brackets U+0F34 and U+0F3A-0F3D, paluta (U+0F85), the later marks U+0FD0-0FD4 and U+0FD9-0FDA.
_DELIMITERS = "\\s\u0f01-\u0f14\u0f34\u0f3a-\u0f3d\u0f85\u0fd0-\u0fd4\u0fd9\u0fda"
_SYLLABLE = re.compile(f"[^{_DELIMITERS}]+")


def _spans(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in _SYLLABLE.finditer(text)]


def syllables(text: str) -> list[str]:
    """The syllables of `text` in order, without tsheg or punctuation: "བཀྲ་ཤིས། །" -> ["བཀྲ", "ཤིས"]."""
    return _SYLLABLE.findall(text)


def sample_phrase(text: str, rng: np.random.Generator, min_syllables: int = 2, max_syllables: int = 8) -> str:
    """A run of whole syllables of `text`, as it is written there (its inner tsheg, shad and spaces kept), so
    the phrase is always a substring of `text`. Its length is drawn uniformly from [min_syllables,
    min(max_syllables, n)], then its start uniformly; a text of fewer than `min_syllables` syllables is
    returned whole. `rng`: a numpy Generator (two draws)."""
    if not 1 <= min_syllables <= max_syllables:
        raise ValueError(f"need 1 <= min_syllables <= max_syllables, got {min_syllables}, {max_syllables}")
    spans = _spans(text)
    if len(spans) < min_syllables:
        return text
    length = int(rng.integers(min_syllables, min(max_syllables, len(spans)) + 1))
    start = int(rng.integers(0, len(spans) - length + 1))
    return text[spans[start][0] : spans[start + length - 1][1]]
