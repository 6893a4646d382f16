"""Readings of line images as text, measured as OCR is: character error rate, and search by text similarity.

A reading is what a reader decoded from a line image (Tesseract for the `ocr` level, lineclip.ocr; the
trainer's CTC reading head, lineclip.reading). Two questions are asked of readings:
- how close are they to the transcriptions: `character_error_rate` (edit distance / reference length);
- can they find lines: *decode-then-match*. A text query is compared with every line's reading, a line's
  reading with every transcription, by a rapidfuzz scorer (0-100, higher is more alike), and the gallery is
  ranked by that score. `match_scores` builds the score matrices of every setting evaluate and validation
  have (whole gallery both ways, within groups as a restriction of those, phrase queries text -> image); the
  ranks and Recall@K come from lineclip.galleries' levels (`line_levels(scores=...)`), so they sit beside
  chance, collection and length in the same tables. Equal scores count in random order (expected recall),
  unlike the embedding metrics' ties-in-favour: an empty reading scores 0 against everything, and must come
  out at chance, not at rank 1.

Pure: strings in, numbers out. rapidfuzz is imported on first use (the optional extra `lineclip[ocr]`).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# rapidfuzz.fuzz scorers a config may name. partial_ratio (the best-matching window of the longer string) is the
# default in every direction: a query is a whole line or a phrase of one, a reading a noisy line (or two noisy
# readings joined), so the question is "where in this reading does the text sit", not "are they the same
# length" (ratio). Measured on the dev eval lines (experiments/RESULTS.md, OCR level).
SCORERS = ("partial_ratio", "ratio", "token_set_ratio", "WRatio", "QRatio")
INSTALL_HINT = "pip install 'lineclip[ocr]' (rapidfuzz)"
# The scorers of a model's reading head (`reading_metrics`: validation, and evaluate's read+match rows): edit
# similarity (ratio) for whole lines, partial_ratio for phrases. partial_ratio with a whole line as the needle is
# far too slow to run at every validation: on 150-character strings over the Tibetan alphabet that do not match
# (what a half-trained head writes) it took 3.5 ms a pair against ratio's 14 us (rapidfuzz 3.14, the shared box),
# i.e. 80 min against 20 s for a 1,200-line val set; with a phrase (~25 characters) as the needle it takes 85 us.
READ_SCORERS = {"t2i": "ratio", "i2t": "ratio", "phrase": "partial_ratio"}


def normalize_reading(text: str) -> str:
    """NFC with all whitespace removed: OCR engines put spaces and line breaks where Tibetan has none (the tsheg
    separates syllables), and transcriptions differ in them too; both sides of every comparison pass here."""
    return unicodedata.normalize("NFC", "".join(text.split()))


def scorer(name: str) -> Callable[..., float]:
    """The rapidfuzz.fuzz scorer called `name` (one of SCORERS)."""
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}: one of {', '.join(SCORERS)}")
    from rapidfuzz import fuzz

    return getattr(fuzz, name)


def rapidfuzz_missing() -> str | None:
    """None when rapidfuzz imports, else a one-line reason with the install command."""
    try:
        import rapidfuzz  # noqa: F401
    except ImportError:
        return f"rapidfuzz is not installed: {INSTALL_HINT}"
    return None


def edit_distances(hypotheses: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """Levenshtein distance (insertions, deletions, substitutions of code points) of each pair."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    from rapidfuzz.distance import Levenshtein

    return np.array([Levenshtein.distance(h, r) for h, r in zip(hypotheses, references, strict=True)], dtype=np.int64)


def character_error_rate(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus CER: total edit distance over total reference length (code points), the usual OCR figure (a mean
    of per-line rates would weigh a 3-character line like a 150-character one). Pass normalised strings."""
    total = sum(len(r) for r in references)
    if total == 0:
        raise ValueError("character_error_rate: the references are empty")
    return float(edit_distances(hypotheses, references).sum() / total)


def similarity(
    queries: Sequence[str], choices: Sequence[str], scorer_name: str = "partial_ratio", workers: int = 1
) -> np.ndarray:
    """[len(queries), len(choices)] float32 scores (0-100) of `scorer_name`, by rapidfuzz's cdist (C++,
    `workers` threads; -1: all CPUs)."""
    from rapidfuzz.process import cdist

    if len(queries) == 0 or len(choices) == 0:
        return np.zeros((len(queries), len(choices)), dtype=np.float32)
    return cdist(list(queries), list(choices), scorer=scorer(scorer_name), dtype=np.float32, workers=workers)


@dataclass
class MatchScores:
    """Decode-then-match score matrices of one gallery of N lines (see the module doc).

    `t2i[i, j]`: transcription i (the query) against line j's reading; `i2t[i, j]`: line i's reading (the query)
    against transcription j; `phrase_t2i[q, j]`: phrase query q against line j's reading."""

    t2i: np.ndarray
    i2t: np.ndarray
    phrase_t2i: np.ndarray | None = None
    scorers: dict[str, str] = field(default_factory=dict)

    def restrict(self, kept: np.ndarray, phrase_queries: Sequence[int] | None = None) -> MatchScores:
        """The scores of the lines `kept` (indices) and, when given, of those phrase queries only."""
        phrase = None
        if self.phrase_t2i is not None:
            rows = np.arange(len(self.phrase_t2i)) if phrase_queries is None else np.asarray(phrase_queries, int)
            phrase = self.phrase_t2i[np.ix_(rows, kept)]
        return MatchScores(self.t2i[np.ix_(kept, kept)], self.i2t[np.ix_(kept, kept)], phrase, dict(self.scorers))

    def line_scores(self, prefix: str) -> dict[str, np.ndarray]:
        """For galleries.line_levels: {prefix_t2i, prefix_i2t}."""
        return {f"{prefix}_t2i": self.t2i, f"{prefix}_i2t": self.i2t}

    def phrase_scores(self, prefix: str) -> dict[str, np.ndarray]:
        """For galleries.phrase_levels: {prefix_t2i} (empty without phrase queries)."""
        return {} if self.phrase_t2i is None else {f"{prefix}_t2i": self.phrase_t2i}


def match_scores(
    readings: Sequence[str],
    texts: Sequence[str],
    phrases: Sequence[str] | None = None,
    scorers: Mapping[str, str] | None = None,
    workers: int = 1,
) -> MatchScores:
    """Score every transcription (and phrase) against every reading and back. Readings, texts and phrases are
    normalised here (`normalize_reading`). `scorers`: per direction `t2i`, `i2t`, `phrase`; partial_ratio
    where not given."""
    chosen = {"t2i": "partial_ratio", "i2t": "partial_ratio", "phrase": "partial_ratio", **(scorers or {})}
    readings = [normalize_reading(r) for r in readings]
    texts = [normalize_reading(t) for t in texts]
    t2i = similarity(texts, readings, chosen["t2i"], workers)
    # Every scorer of SCORERS is symmetric (partial_ratio slides the shorter string along the longer whichever
    # comes first; tested), so with one scorer both ways one matrix serves both.
    i2t = t2i.T.copy() if chosen["i2t"] == chosen["t2i"] else similarity(readings, texts, chosen["i2t"], workers)
    phrase = None
    if phrases is not None:
        phrase = similarity([normalize_reading(p) for p in phrases], readings, chosen["phrase"], workers)
    return MatchScores(t2i, i2t, phrase, chosen)


def summary(levels: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """Flat `{prefix}_t2i_r1, ...` of the `prefix_*` entries of a galleries levels dict."""
    out: dict[str, float] = {}
    for name, values in levels.items():
        if name.startswith(f"{prefix}_") and values:
            out.update({f"{name}_{k}": v for k, v in values.items()})
    return out


def reading_metrics(
    readings: Sequence[str],
    texts: Sequence[str],
    ids: np.ndarray,
    plan: Any = None,
    references: Sequence[str] | None = None,
    ks: Sequence[int] = (1, 5, 10),
    scorers: Mapping[str, str] = READ_SCORERS,
    workers: int = 1,
) -> dict[str, float]:
    """How well a reader reads lines, as flat metrics: `cer` (against `references`, default `texts`; both
    normalised) and decode-then-match Recall@K / MRR (`scorers` per direction, READ_SCORERS by default),
    `read_t2i_r1`, `read_i2t_r1`, ..., and with a galleries.ValidationPlan for these lines (`plan`, rows as
    `readings`) per within-group setting (`page_read_t2i_r1`) and for its phrase queries (`phrase_read_t2i_r1`).
    `ids`: text ids (equal texts); `workers`: rapidfuzz threads (-1: all CPUs)."""
    from lineclip import galleries

    refs = [normalize_reading(r) for r in (references if references is not None else texts)]
    out = {"cer": character_error_rate([normalize_reading(r) for r in readings], refs)}
    phrases = plan.phrases if plan is not None and plan.with_phrases else None
    scores = match_scores(readings, texts, phrases, scorers, workers)
    lengths = galleries.text_bytes(texts)
    settings = {"": galleries.line_levels(ids, lengths, None, ks=ks, scores=scores.line_scores("read"))}
    for name, codes in plan.groups.items() if plan is not None else ():
        settings[f"{name}_"] = galleries.line_levels(ids, lengths, None, codes, ks, scores=scores.line_scores("read"))
    if phrases is not None:
        settings["phrase_"] = galleries.phrase_levels(
            plan.answers,
            plan.query_lines,
            galleries.text_bytes(phrases),
            len(texts),
            None,
            ks,
            scores=scores.phrase_scores("read"),
        )
    for prefix, levels in settings.items():
        out.update({f"{prefix}{k}": v for k, v in summary(levels, "read").items()})
    return out
