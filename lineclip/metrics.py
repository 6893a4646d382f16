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
    query_ids: torch.Tensor,
    gallery_ids: torch.Tensor,
    strict: bool = False,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """1-based rank of the best-scoring correct gallery item for every query (ties count in its favour).

    `query_ids[i] == gallery_ids[j]` marks gallery item j correct for query i; with `strict`, only j == i.
    A query with no correct item gets rank len(gallery) + 1.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n_gallery = len(gallery)
    device = queries.device
    ranks = torch.empty(len(queries), dtype=torch.long)
    # A float32 sum of 0/1 values is exact only below 2**24 per row.
    count_dtype = torch.float32 if n_gallery < 2**24 else torch.float64
    with torch.inference_mode():
        gallery_t = gallery.T.contiguous()
        if not strict:
            order, first, count = _correct_pairs(query_ids.to(device), gallery_ids.to(device))
            gallery_ids = gallery_ids.to(device)
        # One score buffer for all chunks: a fresh chunk x N allocation per chunk is page-faulted in anew
        # each time, which at N = 100k costs as much as a third of the matmul.
        buffer = torch.empty((min(chunk_size, len(queries)), n_gallery), dtype=queries.dtype, device=device)
        for start in range(0, len(queries), chunk_size):
            stop = min(start + chunk_size, len(queries))
            rows = stop - start
            scores = torch.matmul(queries[start:stop], gallery_t, out=buffer[:rows])
            if strict:
                best_correct = scores[torch.arange(rows, device=device), torch.arange(start, stop, device=device)]
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
    best = torch.full((rows,), float("-inf"), dtype=scores.dtype, device=scores.device)
    return best.scatter_reduce_(0, row_of_pair, scores[row_of_pair, col_of_pair], reduce="amax")


def summarize_ranks(ranks: torch.Tensor, ks: tuple[int, ...] = DEFAULT_KS) -> dict[str, float]:
    r = ranks.double()
    out = {f"r{k}": float((r <= k).double().mean()) for k in ks}
    out["mrr"] = float((1.0 / r).mean())
    out["median_rank"] = float(np.median(ranks.numpy()))
    return out


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
    image_emb, text_emb = image_emb.float(), text_emb.float()
    out: dict[str, float] = {}
    for name, queries, gallery in (("i2t", image_emb, text_emb), ("t2i", text_emb, image_emb)):
        ranks = first_correct_ranks(queries, gallery, text_ids, text_ids, strict=strict, chunk_size=chunk_size)
        out.update({f"{name}_{k}": v for k, v in summarize_ranks(ranks, ks).items()})
    return out
