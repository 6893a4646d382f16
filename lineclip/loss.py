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


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_gather_with_grad(x: torch.Tensor) -> list[torch.Tensor]:
    """The autograd-aware all-gather (its backward sums each rank's gradient back to the owner). It moved
    between torch releases: functional collectives where present, else torch.distributed.nn."""
    try:
        from torch.distributed import _functional_collectives as fc

        gathered = fc.wait_tensor(fc.all_gather_single_autograd(x.contiguous(), 0, dist.group.WORLD))
        return list(gathered.chunk(_world_size()))
    except (ImportError, AttributeError):
        from torch.distributed.nn.functional import all_gather

        return list(all_gather(x))


def gather_across_processes(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """All ranks' rows of each tensor, concatenated in rank order. Float tensors keep their gradient (the
    backward sends each rank the summed gradient of its own rows); ranks may hold different row counts
    (bucketed batches, skipped corrupt images), so rows are padded to the largest count and cut back."""
    if _world_size() == 1:
        return tensors
    count = torch.tensor([len(tensors[0])], device=tensors[0].device)
    counts = [torch.empty_like(count) for _ in range(_world_size())]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    most = max(counts)
    gathered = []
    for t in tensors:
        padded = torch.cat([t, t.new_zeros((most - len(t), *t.shape[1:]))]) if len(t) < most else t
        if t.is_floating_point() and t.requires_grad:
            parts = _all_gather_with_grad(padded)
        else:
            parts = [torch.empty_like(padded) for _ in range(_world_size())]
            dist.all_gather(parts, padded.contiguous())
        gathered.append(torch.cat([part[:n] for part, n in zip(parts, counts, strict=True)]))
    return tuple(gathered)


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
        all_image, all_text, all_ids = gather_across_processes(image, text, text_ids)
    else:
        all_image, all_text, all_ids = image, text, text_ids
    positives = text_ids[:, None] == all_ids[None, :]
    logits_i2t = logit_scale * image @ all_text.T
    logits_t2i = logit_scale * text @ all_image.T
    loss = 0.5 * (_multi_positive_ce(logits_i2t, positives) + _multi_positive_ce(logits_t2i, positives))
    with torch.no_grad():
        i2t, t2i = _top1_hits(logits_i2t, positives), _top1_hits(logits_t2i, positives)
    return ContrastiveOutput(loss=loss, i2t_accuracy=i2t, t2i_accuracy=t2i)


def mean_pairwise_cosine(embeddings: torch.Tensor) -> torch.Tensor:
    """Mean cosine over the distinct pairs of a batch of L2-normalised rows: 1.0 when every embedding is the
    same (collapse: the contrastive loss is then exactly ln B and its gradient vanishes), ~0 when spread out.
    From the norm of the sum, so O(B*D) rather than the B x B matrix: |sum|^2 = B + sum over pairs i != j."""
    n = embeddings.shape[0]
    if n < 2:
        return embeddings.new_tensor(float("nan"))
    total = embeddings.float().sum(dim=0)
    return (total.dot(total) - n) / (n * (n - 1))
