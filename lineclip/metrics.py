"""Retrieval metrics over a gallery, in chunks: memory O(chunk * N), never N x N.

Each query's rank is counted directly (how many gallery items score above its best correct one), so no
sort or top-k over the gallery is needed: one matrix product per chunk plus one pass over its scores is the
whole cost (experiments/bench_eval.py measures it against a plain matmul + top-k).

Two notions of "correct":
- duplicate-aware (default): a gallery item is correct when its normalised text equals the query's, so a
  line whose transcription also belongs to another line is not a miss;
- strict: only the query's own pair (gallery index == query index) is correct.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

DEFAULT_KS = (1, 5, 10)


def text_ids(texts: Sequence[str]) -> np.ndarray:
    """One integer per distinct normalised transcription, in first-seen order: the ids that decide which gallery
    items are correct (and, in training, which lines are positives of each other)."""
    return pd.factorize(pd.Series(list(texts), dtype=object))[0].astype(np.int64)


def _correct_pairs(
    query_ids: torch.Tensor, gallery_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per query, where its correct gallery items sit in ``order`` (gallery indices sorted by id):
    ``(order, first, count)``, so query i's correct items are ``order[first[i] : first[i] + count[i]]``."""
    order = torch.argsort(gallery_ids, stable=True)
    sorted_ids = gallery_ids[order]
    first = torch.searchsorted(sorted_ids, query_ids, side="left")
    count = torch.searchsorted(sorted_ids, query_ids, side="right") - first
    return order, first, count


def first_correct_ranks(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    query_ids: torch.Tensor | None = None,
    gallery_ids: torch.Tensor | None = None,
    strict: bool = False,
    chunk_size: int = 1024,
    *,
    correct_pairs: tuple[torch.Tensor, torch.Tensor] | None = None,
    query_groups: torch.Tensor | None = None,
    gallery_groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """1-based rank of the best-scoring correct gallery item for every query (ties count in its favour).

    `query_ids[i] == gallery_ids[j]` marks gallery item j correct for query i; with `strict`, only j == i;
    or `correct_pairs = (rows, cols)`, rows ascending, lists the correct (query, gallery item) pairs (phrase
    queries). With `query_groups` / `gallery_groups`, query i is ranked only among the items j with
    `gallery_groups[j] == query_groups[i]` (a within-page gallery). A query with no correct item (in its
    group) gets rank len(gallery) + 1.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if (query_groups is None) != (gallery_groups is None):
        raise ValueError("query_groups and gallery_groups go together")
    n_gallery = len(gallery)
    device = queries.device
    if query_groups is not None:
        query_groups, gallery_groups = query_groups.to(device), gallery_groups.to(device)
    if correct_pairs is not None:
        pair_rows, pair_cols = (t.to(device) for t in correct_pairs)
    ranks = torch.empty(len(queries), dtype=torch.long)
    # A float32 sum of 0/1 values is exact only below 2**24 per row.
    count_dtype = torch.float32 if n_gallery < 2**24 else torch.float64
    with torch.inference_mode():
        gallery_t = gallery.T.contiguous()
        if not strict and correct_pairs is None:
            order, first, count = _correct_pairs(query_ids.to(device), gallery_ids.to(device))
            gallery_ids = gallery_ids.to(device)
        # One score buffer for all chunks: a fresh chunk x N allocation per chunk is page-faulted in anew
        # each time, which at N = 100k costs as much as a third of the matmul.
        buffer = torch.empty((min(chunk_size, len(queries)), n_gallery), dtype=queries.dtype, device=device)
        for start in range(0, len(queries), chunk_size):
            stop = min(start + chunk_size, len(queries))
            rows = stop - start
            scores = torch.matmul(queries[start:stop], gallery_t, out=buffer[:rows])
            if query_groups is not None:  # items of other groups are not in this query's gallery
                scores.masked_fill_(query_groups[start:stop, None] != gallery_groups[None, :], float("-inf"))
            if strict:
                best_correct = scores[torch.arange(rows, device=device), torch.arange(start, stop, device=device)]
            elif correct_pairs is not None:
                lo, hi = (int(torch.searchsorted(pair_rows, v)) for v in (start, stop))
                best_correct = _scatter_best(scores, pair_rows[lo:hi] - start, pair_cols[lo:hi])
            else:
                best_correct = _best_correct(scores, start, stop, order, first, count, query_ids, gallery_ids)
            # Count in place, in float: a bool mask + integer sum is several times slower on CPU than the
            # matmul-sized pass that ``gt`` into the score buffer and a float row sum take.
            torch.gt(scores, best_correct[:, None], out=scores)
            above = scores.sum(dim=1, dtype=count_dtype)
            chunk_ranks = above.long() + 1
            chunk_ranks[torch.isinf(best_correct)] = n_gallery + 1
            ranks[start:stop] = chunk_ranks.cpu()
    return ranks


def _best_correct(
    scores: torch.Tensor,
    start: int,
    stop: int,
    order: torch.Tensor,
    first: torch.Tensor,
    count: torch.Tensor,
    query_ids: torch.Tensor,
    gallery_ids: torch.Tensor,
) -> torch.Tensor:
    """Best score among each query's correct gallery items (-inf where it has none)."""
    rows, n_gallery = scores.shape
    counts = count[start:stop]
    n_pairs = int(counts.sum())
    if n_pairs * 16 > rows * n_gallery:
        # Many duplicates: the (row, col) index pairs (16 bytes each) would outgrow a one-byte-per-score mask.
        correct = query_ids[start:stop].to(scores.device)[:, None] == gallery_ids[None, :]
        return torch.where(correct, scores, float("-inf")).amax(dim=1)
    # Mostly unique ids: gather the few correct scores rather than mask the whole chunk.
    row_of_pair = torch.repeat_interleave(torch.arange(rows, device=scores.device), counts)
    offset_in_group = torch.arange(n_pairs, device=scores.device) - torch.repeat_interleave(
        torch.cumsum(counts, 0) - counts, counts
    )
    col_of_pair = order[torch.repeat_interleave(first[start:stop], counts) + offset_in_group]
    return _scatter_best(scores, row_of_pair, col_of_pair)


def _scatter_best(scores: torch.Tensor, row_of_pair: torch.Tensor, col_of_pair: torch.Tensor) -> torch.Tensor:
    """Per row of `scores`, the best score among the listed (row, col) pairs (-inf where a row has none)."""
    best = torch.full((scores.shape[0],), float("-inf"), dtype=scores.dtype, device=scores.device)
    return best.scatter_reduce_(0, row_of_pair, scores[row_of_pair, col_of_pair], reduce="amax")


def summarize_ranks(ranks: torch.Tensor, ks: tuple[int, ...] = DEFAULT_KS,
                    n_gallery: int | None = None) -> dict[str, float]:
    """Recall@K, MRR and median rank; with `n_gallery`, a rank past it is a miss (reciprocal rank 0)."""
    if len(ranks) == 0:
        return {f"r{k}": 0.0 for k in ks} | {"mrr": 0.0, "median_rank": 0.0}
    r = ranks.double()
    out = {f"r{k}": float((r <= k).double().mean()) for k in ks}
    reciprocal = 1.0 / r
    if n_gallery is not None:
        reciprocal[r > n_gallery] = 0.0
    out["mrr"] = float(reciprocal.mean())
    out["median_rank"] = float(np.median(ranks.numpy()))
    return out


def retrieval_ranks(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_ids: torch.Tensor,
    strict: bool = False,
    chunk_size: int = 1024,
) -> dict[str, torch.Tensor]:
    """The 1-based rank of each query's best correct item, both directions, for paired rows of `image_emb` /
    `text_emb`: ``{"i2t": [N], "t2i": [N]}`` (int64). What Recall@K summarises and the W&B rank histograms
    show (lineclip.panels); `text_ids` and `strict` as in ``first_correct_ranks``."""
    image_emb, text_emb = image_emb.float(), text_emb.float()
    return {name: first_correct_ranks(queries, gallery, text_ids, text_ids, strict=strict, chunk_size=chunk_size)
            for name, queries, gallery in (("i2t", image_emb, text_emb), ("t2i", text_emb, image_emb))}


def ranks_metrics(ranks: dict[str, torch.Tensor], ks: tuple[int, ...] = DEFAULT_KS) -> dict[str, float]:
    """`retrieval_ranks`' ranks as Recall@K, MRR and median rank: `i2t_r1`, ..., `t2i_median_rank`."""
    return {f"{name}_{k}": v for name, r in ranks.items() for k, v in summarize_ranks(r, ks).items()}


def retrieval_metrics(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_ids: torch.Tensor,
    ks: tuple[int, ...] = DEFAULT_KS,
    strict: bool = False,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Recall@K, MRR and median rank in both directions for paired rows of `image_emb` / `text_emb`.

    Keys: `i2t_r1`, ..., `t2i_mrr`, `t2i_median_rank`. `text_ids` are equal exactly when the normalised
    transcriptions are equal.
    """
    return ranks_metrics(retrieval_ranks(image_emb, text_emb, text_ids, strict, chunk_size), ks)


# ------------------------------------------------------------------- expected levels of reference rankers


def tier_counts(
    tier: np.ndarray, correct: np.ndarray, member: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What a ranker that sorts the gallery by `tier` (ascending, equal tiers in random order) does with each
    query row: ``(before, tied_correct, tied_wrong)``, the wrong items in tiers ahead of the query's best
    correct tier, and the correct and wrong items in that tier. `correct`/`member` are [Q, N] booleans
    (`member`: item in the query's gallery; default all); `tier` broadcasts to [Q, N]. A row without a correct
    member gets (0, 0, 0), a miss."""
    tier = np.broadcast_to(np.asarray(tier, dtype=np.float64), correct.shape)
    if member is not None:
        correct = correct & member
        wrong = ~correct & member
    else:
        wrong = ~correct
    best = np.where(correct, tier, np.inf).min(axis=1, initial=np.inf)[:, None]
    before = (wrong & (tier < best)).sum(axis=1)
    tied = tier == best
    return before, (correct & tied).sum(axis=1), (wrong & tied).sum(axis=1)


def expected_recall(
    before: np.ndarray, tied_correct: np.ndarray, tied_wrong: np.ndarray, ks: Sequence[int] = DEFAULT_KS
) -> dict[str, float]:
    """Expected Recall@K and MRR over queries whose ranking puts `before` wrong items first, then a tier of
    `tied_correct` correct and `tied_wrong` wrong items in uniformly random order (see ``tier_counts``).
    A query with no correct item counts as a miss (0). With before = 0 and the whole gallery as the tier this
    is the chance level: a query with m correct items of N hits the top k with probability 1 - C(N-m,k)/C(N,k)."""
    out = {f"r{k}": 0.0 for k in ks} | {"mrr": 0.0}
    n_queries = len(before)
    if n_queries == 0:
        return out
    triples, counts = np.unique(np.stack([before, tied_correct, tied_wrong], axis=1), axis=0, return_counts=True)
    for (a, c, w), n in zip(triples.tolist(), counts.tolist(), strict=True):
        if c == 0:
            continue
        j = np.arange(1, w + 2, dtype=np.float64)  # position of the first correct item inside the tier
        # P(the first j-1 items of the tier are all wrong) as a running product; 1 for j = 1.
        survive = np.concatenate([[1.0], np.cumprod((w - j[:-1] + 1) / (c + w - j[:-1] + 1))])
        p_first = survive * c / (c + w - j + 1)
        weight = n / n_queries
        for k in ks:
            out[f"r{k}"] += weight * float(p_first[: max(0, min(k - a, len(p_first)))].sum())
        out["mrr"] += weight * float((p_first / (a + j)).sum())
    return out
