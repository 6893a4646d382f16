"""Retrieval settings that knowing a line's collection cannot satisfy, and the levels of the known shortcuts.

Shared by `lineclip.evaluate` and training validation; pure (embeddings and per-line arrays in, dicts out),
except `image_aspects`, which reads image headers.

- whole gallery: every line against every line (lineclip.metrics.retrieval_metrics);
- within-group galleries (`gallery_by`: page_id, doc_id, collection or any manifest field): each query is
  ranked only against the lines that share its value. Lines without a value are neither queries nor gallery
  items (counted in `n_without_value`); a query alone in its group is counted in the metrics but is never a
  hit (`n_alone`): finding the only line of a page says nothing about reading;
- phrase queries: per line a seeded run of whole syllables of its transcription (lineclip.phrases) is the text
  query, and every line containing the phrase is a correct answer (text -> image only).

Beside each setting's metrics, `levels` gives expected Recall@K / MRR of three rankers that never read:
- `chance`: random order;
- `collection`: knows only each line's collection; ranks the lines of the query's collection first, each
  part in random order (null when no line has the field);
- `length_t2i` / `length_i2t`: knows only lengths: a text's UTF-8 length (of the normalised transcription) and
  a line image's aspect ratio (width / height, what the image tower sees at a fixed height), from which it
  predicts the line's text length by a least-squares line fitted on the gallery itself (`predicted_lengths`;
  an optimistic fit). Whole-line t2i ranks the images by |predicted length - query length|, i2t the texts by
  |length - the query image's predicted length| (equal distances in random order); phrase queries (t2i) rank
  the lines predicted at least as long as the phrase longest first (a longer line holds more phrases), then
  the others.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lineclip.metrics import (
    DEFAULT_KS,
    expected_recall,
    first_correct_ranks,
    summarize_ranks,
    tier_counts,
)
from lineclip.phrases import DEFAULT_MAX_SYLLABLES, DEFAULT_MIN_SYLLABLES, phrase_matches, sample_phrases

RECORD_FIELDS = ("doc_id", "page_id", "line_id")
SHORT_NAMES = {"page_id": "page", "doc_id": "doc", "line_id": "line"}
LEVEL_CHUNK = 512  # query rows per dense [rows, N] block of the level computation
# a level's name in flat metric keys: val_chance_r1, val_collection_level_r1, val_page_t2i_length_level_r1
LEVEL_KEYS = {"chance": "chance", "collection": "collection_level", "length_t2i": "t2i_length_level",
              "length_i2t": "i2t_length_level"}


def field_values(records: Sequence[Any], key: str) -> list[str | None]:
    """Each record's value of `key` (a LineRecord field such as page_id, or a manifest key in `extra`);
    None where it has none (an empty string counts as none)."""
    if key in RECORD_FIELDS:
        return [getattr(r, key) or None for r in records]
    return [r.extra.get(key) or None for r in records]


def group_codes(values: Sequence[str | None]) -> np.ndarray:
    """One integer per distinct value, -1 for None."""
    codes: dict[str, int] = {}
    return np.array([-1 if v is None else codes.setdefault(v, len(codes)) for v in values], dtype=np.int64)


def optional_codes(records: Sequence[Any], key: str) -> np.ndarray | None:
    """group_codes of `key`, or None when no record has it (then there is no level for it)."""
    values = field_values(records, key)
    return group_codes(values) if any(v is not None for v in values) else None


def setting_name(key: str) -> str:
    """The short name of a gallery_by field in metric keys: page_id -> page (val_page_t2i_r1)."""
    return SHORT_NAMES.get(key, key)


def text_bytes(texts: Sequence[str]) -> np.ndarray:
    return np.array([len(t.encode("utf-8")) for t in texts], dtype=np.int64)


# ------------------------------------------------------------------------------------------------ levels


def _levels(
    n_queries: int,
    correct: Callable[[slice], np.ndarray],
    member: Callable[[slice], np.ndarray] | None,
    tiers: dict[str, Callable[[slice], np.ndarray] | None],
    ks: Sequence[int],
) -> dict[str, dict[str, float] | None]:
    """Expected recall of each tier ranker, computed in dense blocks of query rows."""
    out: dict[str, dict[str, float] | None] = {}
    for name, tier in tiers.items():
        parts = []
        for start in range(0, n_queries, LEVEL_CHUNK):
            rows = slice(start, min(start + LEVEL_CHUNK, n_queries))
            ok = correct(rows)
            parts.append(tier_counts(tier(rows) if tier is not None else np.zeros(1), ok,
                                     member(rows) if member is not None else None))
        counts = [np.concatenate([p[i] for p in parts]) if parts else np.zeros(0, np.int64) for i in range(3)]
        out[name] = expected_recall(*counts, ks=ks)
    return out


def _collection_tiers(collection: np.ndarray | None,
                      query_collection: np.ndarray | None) -> dict[str, Callable[[slice], np.ndarray] | None]:
    tiers: dict[str, Callable[[slice], np.ndarray] | None] = {"chance": None}
    if collection is not None and query_collection is not None:
        tiers["collection"] = lambda rows: query_collection[rows, None] != collection[None, :]
    return tiers


def image_aspects(paths: Sequence[str]) -> np.ndarray:
    """Width / height of each image from its header (NaN where it cannot be read), as training reads headers
    (lineclip.preprocess.header_size: raster formats only, regular files only, the pixel limit)."""
    from lineclip.preprocess import header_size

    out = np.full(len(paths), np.nan)
    for i, path in enumerate(paths):
        size = header_size(path)
        if not isinstance(size, BaseException) and size[1] > 0:
            out[i] = size[0] / size[1]
    return out


def predicted_lengths(aspects: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """A line's text length as a length-only model predicts it from its image: the least-squares line
    lengths ~ a * aspect + b over the lines with a known aspect (the mean length where the aspect is unknown,
    or when fewer than two distinct aspects are known)."""
    aspects, lengths = np.asarray(aspects, dtype=np.float64), np.asarray(lengths, dtype=np.float64)
    known = np.isfinite(aspects)
    out = np.full(len(lengths), lengths.mean() if len(lengths) else 0.0)
    if len(np.unique(aspects[known])) >= 2:
        slope, intercept = np.polyfit(aspects[known], lengths[known], 1)
        out[known] = slope * aspects[known] + intercept
    return out


def line_levels(ids: np.ndarray, lengths: np.ndarray, collection: np.ndarray | None,
                groups: np.ndarray | None = None, ks: Sequence[int] = DEFAULT_KS,
                predicted: np.ndarray | None = None) -> dict[str, Any]:
    """Levels for whole-line queries: the whole gallery, or within `groups` (codes; -1 = no value, left out; a
    query alone in its group is a miss). `collection`: codes or None. `predicted`: each line's text length as
    predicted from its image (`predicted_lengths`); without it there is no length level.
    Keys: chance, collection (None without codes), length_t2i, length_i2t."""
    if groups is not None:
        keep = groups >= 0
        ids, lengths, groups = ids[keep], lengths[keep], groups[keep]
        collection = collection[keep] if collection is not None else None
        predicted = predicted[keep] if predicted is not None else None
        alone = np.bincount(groups)[groups] == 1
    n = len(ids)

    def correct(rows: slice) -> np.ndarray:
        ok = ids[rows, None] == ids[None, :]
        if groups is not None:
            ok[alone[rows]] = False
        return ok

    member = (lambda rows: groups[rows, None] == groups[None, :]) if groups is not None else None
    tiers = _collection_tiers(collection, collection)
    if predicted is not None:
        tiers["length_t2i"] = lambda rows: np.abs(predicted[None, :] - lengths[rows, None])
        tiers["length_i2t"] = lambda rows: np.abs(lengths[None, :] - predicted[rows, None])
    levels = _levels(n, correct, member, tiers, ks)
    levels.setdefault("collection", None)
    return levels


def phrase_levels(answers: Sequence[np.ndarray], query_lines: np.ndarray, phrase_lengths: np.ndarray,
                  n_gallery: int, collection: np.ndarray | None, ks: Sequence[int] = DEFAULT_KS,
                  predicted: np.ndarray | None = None) -> dict[str, Any]:
    """Levels for phrase queries (t2i) against `n_gallery` lines: `answers[q]` the lines containing phrase q,
    `query_lines[q]` the line it was drawn from, `phrase_lengths[q]` its UTF-8 bytes, `predicted` the lines'
    text lengths as predicted from their images. Keys: chance, collection (None without codes), length_t2i."""

    def correct(rows: slice) -> np.ndarray:
        ok = np.zeros((rows.stop - rows.start, n_gallery), dtype=bool)
        for i, cols in enumerate(answers[rows]):
            ok[i, cols] = True
        return ok

    query_collection = collection[query_lines] if collection is not None else None
    tiers = _collection_tiers(collection, query_collection)
    if predicted is not None:
        def length_tier(rows: slice) -> np.ndarray:
            fits = predicted[None, :] >= phrase_lengths[rows, None]
            return np.where(fits, -predicted[None, :], np.inf)

        tiers["length_t2i"] = length_tier
    levels = _levels(len(answers), correct, None, tiers, ks)
    levels.setdefault("collection", None)
    return levels


# ------------------------------------------------------------------------------------------ model metrics


def within_group_metrics(image: torch.Tensor, text: torch.Tensor, ids: np.ndarray, groups: np.ndarray,
                         ks: Sequence[int] = DEFAULT_KS, chunk_size: int = 1024) -> dict[str, Any]:
    """i2t and t2i Recall@K / MRR / median rank (duplicate-aware) with each query ranked among the lines of its
    group. Keys as retrieval_metrics (`t2i_r1`, ...); a miss ranks past all kept lines (reciprocal rank 0)."""
    keep = torch.from_numpy(groups >= 0)
    image, text = image.float()[keep], text.float()[keep]
    ids_t, groups_t = torch.from_numpy(ids)[keep], torch.from_numpy(groups)[keep]
    n = len(ids_t)
    alone = (torch.bincount(groups_t)[groups_t] == 1) if n else torch.zeros(0, dtype=torch.bool)
    metrics: dict[str, float] = {}
    for name, queries, gallery in (("i2t", image, text), ("t2i", text, image)):
        ranks = first_correct_ranks(queries, gallery, ids_t, ids_t, chunk_size=chunk_size,
                                    query_groups=groups_t, gallery_groups=groups_t)
        ranks[alone] = n + 1
        metrics.update({f"{name}_{k}": v for k, v in summarize_ranks(ranks, tuple(ks), n_gallery=n).items()})
    return {"n_queries": n, "n_groups": int(len(torch.unique(groups_t))), "n_alone": int(alone.sum()),
            "n_without_value": int((~keep).sum()), "metrics": metrics}


def phrase_metrics(phrase_emb: torch.Tensor, image: torch.Tensor, answers: Sequence[np.ndarray],
                   ks: Sequence[int] = DEFAULT_KS, chunk_size: int = 1024) -> dict[str, float]:
    """t2i Recall@K / MRR / median rank of phrase queries: row q of `phrase_emb` against all images, the lines
    in `answers[q]` correct. Keys `t2i_r1`, ..., `t2i_mrr`, `t2i_median_rank`."""
    rows = torch.from_numpy(np.repeat(np.arange(len(answers)), [len(a) for a in answers]))
    cols = torch.from_numpy(np.concatenate(answers) if len(answers) else np.zeros(0, np.int64))
    ranks = first_correct_ranks(phrase_emb.float(), image.float(), chunk_size=chunk_size,
                                correct_pairs=(rows, cols))
    return {f"t2i_{k}": v for k, v in summarize_ranks(ranks, tuple(ks), n_gallery=len(image)).items()}



def phrase_queries(texts: Sequence[str], seed: int, min_syl: int = DEFAULT_MIN_SYLLABLES,
                   max_syl: int = DEFAULT_MAX_SYLLABLES) -> tuple[list[str], np.ndarray, list[np.ndarray]]:
    """The phrase query of each line that has at least `min_syl` syllables (lineclip.phrases.sample_phrases:
    deterministic for a seed): ``(phrases, query_lines, answers)``, `query_lines[q]` the line phrase q comes
    from and `answers[q]` every line whose transcription contains it (its own line included)."""
    drawn = sample_phrases(texts, seed, min_syl, max_syl)
    query_lines = np.array([i for i, p in enumerate(drawn) if p is not None], dtype=np.int64)
    phrases = [drawn[i] for i in query_lines]
    return phrases, query_lines, phrase_matches(phrases, texts)


# ------------------------------------------------------------------------------------- training validation


@dataclass
class ValidationPlan:
    """The settings of a validation gallery beyond the whole one, fixed before anything is embedded: text ids,
    byte lengths, collection codes, one group code array per within-group setting, the phrase queries.
    `metrics` / `levels` give flat keys (`page_t2i_r1`, `phrase_t2i_mrr`, `page_t2i_length_level_r1`, ...)."""

    ids: np.ndarray
    lengths: np.ndarray
    collection: np.ndarray | None
    aspects: np.ndarray | None = None  # image width / height (NaN: unreadable); None: no length level
    groups: dict[str, np.ndarray] = field(default_factory=dict)  # setting name (page, doc, ...) -> codes
    phrases: list[str] = field(default_factory=list)
    query_lines: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    answers: list[np.ndarray] = field(default_factory=list)
    with_phrases: bool = False
    embedded_levels: dict[str, float] = field(default_factory=dict)  # set by training validation
    _restricted: dict[bytes, ValidationPlan] = field(default_factory=dict, repr=False)
    _levels: dict[str, float] | None = field(default=None, repr=False)

    @classmethod
    def build(cls, records: Sequence[Any], gallery_by: Sequence[str] = ("page_id",), phrases: bool = True,
              seed: int = 0, min_syl: int = DEFAULT_MIN_SYLLABLES, max_syl: int = DEFAULT_MAX_SYLLABLES,
              collection_field: str = "collection", levels: bool = True) -> ValidationPlan:
        """A field no record has is skipped (a val manifest without page ids has no within-page setting).
        With `levels`, the image headers are read for the length level's aspect ratios."""
        from lineclip.metrics import text_ids

        texts = [r.text for r in records]
        plan = cls(ids=text_ids(texts), lengths=text_bytes(texts), collection=optional_codes(records, collection_field),
                   aspects=image_aspects([r.image_path for r in records]) if levels else None,
                   with_phrases=phrases)
        for key in gallery_by:
            codes = optional_codes(records, key)
            if codes is not None:
                plan.groups[setting_name(key)] = codes
        if phrases:
            plan.phrases, plan.query_lines, plan.answers = phrase_queries(texts, seed, min_syl, max_syl)
        return plan

    def restrict(self, kept: np.ndarray) -> ValidationPlan:
        """The plan for the lines `kept` (ascending indices: the lines whose images could be embedded); phrase
        queries of lines left out are dropped and their answers renumbered. Cached per `kept`."""
        kept = np.asarray(kept, dtype=np.int64)
        if len(kept) == len(self.ids):
            return self
        key = kept.tobytes()
        if key not in self._restricted:
            position = np.full(len(self.ids), -1, dtype=np.int64)
            position[kept] = np.arange(len(kept))
            queries = [q for q, line in enumerate(self.query_lines) if position[line] >= 0]
            self._restricted[key] = ValidationPlan(
                ids=self.ids[kept], lengths=self.lengths[kept],
                collection=self.collection[kept] if self.collection is not None else None,
                aspects=self.aspects[kept] if self.aspects is not None else None,
                groups={name: codes[kept] for name, codes in self.groups.items()},
                phrases=[self.phrases[q] for q in queries],
                query_lines=position[self.query_lines[queries]] if queries else np.zeros(0, np.int64),
                answers=[position[self.answers[q]][position[self.answers[q]] >= 0] for q in queries],
                with_phrases=self.with_phrases)
        return self._restricted[key]

    def metrics(self, image: torch.Tensor, text: torch.Tensor, phrase_emb: torch.Tensor | None,
                ks: Sequence[int] = DEFAULT_KS, chunk_size: int = 1024) -> dict[str, float]:
        """Within-group and phrase metrics of embedded lines (rows = this plan's lines); the whole-gallery
        ones are the caller's (retrieval_metrics)."""
        out: dict[str, float] = {}
        for name, codes in self.groups.items():
            block = within_group_metrics(image, text, self.ids, codes, ks, chunk_size)
            out.update({f"{name}_{k}": v for k, v in block["metrics"].items()})
        if self.with_phrases and phrase_emb is not None:
            out.update({f"phrase_{k}": v for k, v in phrase_metrics(phrase_emb, image, self.answers, ks,
                                                                      chunk_size).items()})
        return out

    def levels(self, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
        """`chance_r1`, `collection_level_r1`, `t2i_length_level_mrr`, `i2t_length_level_r5`, ... for the whole
        gallery, then the same prefixed by setting (`page_chance_r1`, `phrase_t2i_length_level_r10`); computed
        once."""
        if self._levels is None:
            predicted = predicted_lengths(self.aspects, self.lengths) if self.aspects is not None else None
            settings = {"": line_levels(self.ids, self.lengths, self.collection, ks=ks, predicted=predicted)}
            for name, codes in self.groups.items():
                settings[f"{name}_"] = line_levels(self.ids, self.lengths, self.collection, codes, ks, predicted)
            if self.with_phrases:
                settings["phrase_"] = phrase_levels(self.answers, self.query_lines, text_bytes(self.phrases),
                                                    len(self.ids), self.collection, ks, predicted)
            self._levels = {}
            for prefix, levels in settings.items():
                for level, values in levels.items():
                    self._levels.update({f"{prefix}{LEVEL_KEYS[level]}_{k}": v for k, v in (values or {}).items()})
        return self._levels
