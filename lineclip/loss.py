"""Symmetric InfoNCE over L2-normalised line image / transcription embeddings.

Lines whose normalised transcriptions are identical are positives of each other, not negatives: each
row's loss is `-log(sum over its positives of softmax(logits))`, which is plain cross-entropy on the
diagonal when every text in the batch is distinct.

Across processes each rank computes the loss rows of its own samples against the columns of *all*
samples (gathered with gradient), so the negatives are the global batch (open_clip's local loss).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All ranks' `x` concatenated in rank order; gradients flow back to the rank that owns each slice."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    # torch.distributed.nn.functional.all_gather is autograd-aware (its backward reduce-scatters).
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


@dataclass
class ContrastiveOutput:
    loss: torch.Tensor
    i2t_accuracy: torch.Tensor  # in-batch top-1: the best-scoring text of an image is one of its positives
    t2i_accuracy: torch.Tensor


def _multi_positive_ce(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    all_terms = torch.logsumexp(logits, dim=1)
    positive_terms = torch.logsumexp(logits.masked_fill(~positives, float("-inf")), dim=1)
    return (all_terms - positive_terms).mean()


def _top1_hits(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    best = logits.argmax(dim=1, keepdim=True)
    return positives.gather(1, best).float().mean()


def contrastive_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    text_ids: torch.Tensor,
    logit_scale: torch.Tensor,
    gather: bool = False,
) -> ContrastiveOutput:
    """`image`, `text`: [B, D] L2-normalised local embeddings of paired lines; `text_ids`: [B] ints, equal
    exactly when the normalised transcriptions are equal. With `gather`, columns span every process."""
    if gather:
        all_image, all_text, all_ids = gather_with_grad(image), gather_with_grad(text), gather_no_grad(text_ids)
    else:
        all_image, all_text, all_ids = image, text, text_ids
    positives = text_ids[:, None] == all_ids[None, :]
    logits_i2t = logit_scale * image @ all_text.T
    logits_t2i = logit_scale * text @ all_image.T
    loss = 0.5 * (_multi_positive_ce(logits_i2t, positives) + _multi_positive_ce(logits_t2i, positives))
    with torch.no_grad():
        i2t, t2i = _top1_hits(logits_i2t, positives), _top1_hits(logits_t2i, positives)
    return ContrastiveOutput(loss=loss, i2t_accuracy=i2t, t2i_accuracy=t2i)
