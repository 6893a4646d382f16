"""Retrieval metrics over a gallery, in chunks: memory O(chunk * N), never N x N.

Each query's rank is counted directly (how many gallery items score above its best correct one), so no
sort or top-k over the gallery is needed: one matrix product per chunk is the whole cost.

Two notions of "correct":
- duplicate-aware (default): a gallery item is correct when its normalised text equals the query's, so a
  line whose transcription also belongs to another line is not a miss;
- strict: only the query's own pair (gallery index == query index) is correct.
"""

from __future__ import annotations

import numpy as np
import torch

DEFAULT_KS = (1, 5, 10)


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
    gallery_t = gallery.T.contiguous()
    ranks = torch.empty(len(queries), dtype=torch.long)
    for start in range(0, len(queries), chunk_size):
        stop = min(start + chunk_size, len(queries))
        scores = queries[start:stop] @ gallery_t
        if strict:
            rows = torch.arange(stop - start)
            best_correct = scores[rows, torch.arange(start, stop)]
        else:
            correct = query_ids[start:stop, None] == gallery_ids[None, :]
            best_correct = scores.masked_fill(~correct, float("-inf")).max(dim=1).values
        ranks[start:stop] = (scores > best_correct[:, None]).sum(dim=1).cpu() + 1
        ranks[start:stop][torch.isinf(best_correct).cpu()] = len(gallery) + 1
    return ranks


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
