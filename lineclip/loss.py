"""Symmetric InfoNCE, and SigLIP's pairwise sigmoid loss, over L2-normalised line image / transcription
embeddings.

Which texts are positives of which images comes in as either text ids (lines with identical normalised
transcriptions are positives of each other) or a boolean matrix over the whole contrastive batch
(`positives[i, j]`: text j describes image i, e.g. a phrase contained in line i's transcription). InfoNCE
rows then lose `-log(sum over its positives of softmax(logits))`, which is plain cross-entropy on the
diagonal when every text is a distinct whole line.

Across processes each rank computes the loss rows of its own samples against the columns of *all*
samples (gathered with gradient), so the negatives are the global batch (open_clip's local loss).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F


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


def _gather(tensors: tuple[torch.Tensor, ...]) -> tuple[tuple[torch.Tensor, ...], list[int]]:
    if _world_size() == 1:
        return tensors, [len(tensors[0])]
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
    return tuple(gathered), counts


def gather_across_processes(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """All ranks' rows of each tensor, concatenated in rank order. Float tensors keep their gradient (the
    backward sends each rank the summed gradient of its own rows); ranks may hold different row counts
    (bucketed batches, skipped corrupt images), so rows are padded to the largest count and cut back."""
    return _gather(tensors)[0]


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


def _columns_and_positives(
    image: torch.Tensor, text: torch.Tensor, positives: torch.Tensor, gather: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """All images and texts (gathered or local) and the local rows of positives for each direction:
    `pos_i2t[b, n]` (local image b, any text n) and `pos_t2i[b, n]` (local text b, any image n)."""
    if positives.dim() == 1:  # text ids: equal ids are positives, a symmetric relation
        all_image, all_text, all_ids = _gather((image, text, positives))[0] if gather else (image, text, positives)
        pos = positives[:, None] == all_ids[None, :]
        return all_image, all_text, pos, pos
    (all_image, all_text), counts = _gather((image, text)) if gather else ((image, text), [len(image)])
    n = sum(counts)
    if positives.shape != (n, n):
        raise ValueError(f"positives has shape {tuple(positives.shape)}; the contrastive batch has {n} pairs")
    rank = dist.get_rank() if gather and _world_size() > 1 else 0
    mine = slice(sum(counts[:rank]), sum(counts[: rank + 1]))
    return all_image, all_text, positives[mine], positives[:, mine].T


def contrastive_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    positives: torch.Tensor,
    logit_scale: torch.Tensor,
    gather: bool = False,
) -> ContrastiveOutput:
    """Symmetric multi-positive InfoNCE. `image`, `text`: [B, D] L2-normalised local embeddings of paired
    lines. `positives`: [B] ints, equal exactly when the normalised transcriptions are equal; or an [N, N]
    bool matrix over the whole contrastive batch (all processes' pairs in rank order when gathering, else
    N = B) whose [i, j] says text j is a positive of image i (the diagonal must be true). With `gather`,
    columns span every process."""
    all_image, all_text, pos_i2t, pos_t2i = _columns_and_positives(image, text, positives, gather)
    logits_i2t = logit_scale * image @ all_text.T
    logits_t2i = logit_scale * text @ all_image.T
    loss = 0.5 * (_multi_positive_ce(logits_i2t, pos_i2t) + _multi_positive_ce(logits_t2i, pos_t2i))
    with torch.no_grad():
        i2t, t2i = _top1_hits(logits_i2t, pos_i2t), _top1_hits(logits_t2i, pos_t2i)
    return ContrastiveOutput(loss=loss, i2t_accuracy=i2t, t2i_accuracy=t2i)


def sigmoid_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    positives: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    gather: bool = False,
) -> ContrastiveOutput:
    """SigLIP's pairwise sigmoid loss (Zhai et al. 2023; open_clip's SigLipLoss): every (image, text) pair is
    a binary decision, `logits = logit_scale * image @ text.T + logit_bias`, label +1 for a positive pair
    and -1 otherwise, loss `-sum(log sigmoid(label * logits)) / B` over the local images' rows. Arguments as
    for `contrastive_loss`. With `gather` each process takes its images against every process's texts (the
    same pairs open_clip's neighbour exchange visits); DDP's gradient average then equals one process
    with the global batch. The accuracies are in-batch top-1, as for InfoNCE (the bias does not move them)."""
    all_image, all_text, pos_i2t, pos_t2i = _columns_and_positives(image, text, positives, gather)
    logits = logit_scale * image @ all_text.T + logit_bias
    labels = pos_i2t.to(logits.dtype) * 2 - 1
    loss = -F.logsigmoid(labels * logits).sum() / len(image)
    with torch.no_grad():
        i2t = _top1_hits(logits, pos_i2t)
        t2i = _top1_hits(logit_scale * text @ all_image.T, pos_t2i)
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
