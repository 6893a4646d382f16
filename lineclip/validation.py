"""Embedding a dataset across processes and scoring it: what validation and the final corpus export run.

`embed_dataset` deals unpadded single-bucket batches round-robin to the processes and gathers the rows in
dataset order; `validate` turns val-set embeddings into Recall@K/MRR (lineclip.metrics) and, with a
ValidationPlan, within-group and phrase-query metrics (lineclip.galleries).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from omegaconf import DictConfig

from lineclip.batch import BucketBatchSampler, LineCollator, LineDataset, byte_encode
from lineclip.data import make_loader
from lineclip.galleries import ValidationPlan
from lineclip.metrics import ranks_metrics, retrieval_ranks


@dataclass
class EmbeddedLines:
    image: torch.Tensor  # [N, D] float32, rows for the dataset indices below, in ascending index order
    text: torch.Tensor
    indices: torch.Tensor
    n_corrupt: int


@torch.inference_mode()
def embed_dataset(
    accelerator: Accelerator, model: torch.nn.Module, dataset: LineDataset, collate: LineCollator,
    batch_size: int, num_workers: int, with_text: bool = True,
) -> EmbeddedLines:
    """Embed every readable line once across all processes (batches dealt round-robin, never padded with
    repeats), then gather so every process holds all rows in dataset order."""
    sampler = BucketBatchSampler(dataset.buckets, batch_size, shuffle=False)
    batches = list(sampler)[accelerator.process_index :: accelerator.num_processes]
    loader = make_loader(dataset, batches, collate, num_workers)
    was_training = model.training
    model.eval()
    images, texts, indices, n_corrupt = [], [], [], 0
    for batch in loader:
        n_corrupt += batch["n_corrupt"]
        if len(batch["indices"]) == 0:
            continue
        out = model(
            pixel_values=batch["pixel_values"].to(accelerator.device, non_blocking=True),
            input_ids=batch["input_ids"].to(accelerator.device) if with_text else None,
            attention_mask=batch["attention_mask"].to(accelerator.device) if with_text else None,
        )
        images.append(out.image.float())
        if with_text:
            texts.append(out.text.float())
        indices.append(batch["indices"].to(accelerator.device))
    model.train(was_training)
    dim = accelerator.unwrap_model(model).image_head.output_dim
    empty = torch.empty(0, dim, device=accelerator.device)
    image = torch.cat(images) if images else empty
    text = torch.cat(texts) if texts else empty
    index = torch.cat(indices) if indices else torch.empty(0, dtype=torch.long, device=accelerator.device)
    # Ranks hold different counts: pad to the longest with index -1, gather, drop the padding, sort.
    image, text, index = (accelerator.pad_across_processes(t, dim=0, pad_index=-1) for t in (image, text, index))
    image, text, index = accelerator.gather((image, text, index))
    keep = index >= 0
    order = torch.argsort(index[keep])
    n_corrupt_total = int(accelerator.reduce(torch.tensor(n_corrupt, device=accelerator.device), "sum"))
    return EmbeddedLines(
        image=image[keep][order].cpu(),
        text=text[keep][order].cpu() if with_text else torch.empty(0),
        indices=index[keep][order].cpu(),
        n_corrupt=n_corrupt_total,
    )


@torch.inference_mode()
def embed_texts(accelerator: Accelerator, model: torch.nn.Module, texts: list[str], cfg: DictConfig) -> torch.Tensor:
    """[len(texts), D] float32 text embeddings on the CPU, computed on every process alike (the unwrapped model:
    no collective, so processes need not agree on anything)."""
    raw = accelerator.unwrap_model(model)
    was_training = raw.training
    raw.eval()
    out = torch.empty(len(texts), raw.image_head.output_dim)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i].encode("utf-8")))  # similar lengths together
    size = eval_batch_size(cfg)
    for start in range(0, len(order), size):
        rows = order[start : start + size]
        input_ids, attention_mask, _ = byte_encode([texts[i] for i in rows], cfg.text.max_length)
        with accelerator.autocast():
            emb = raw.encode_text(input_ids.to(accelerator.device), attention_mask.to(accelerator.device))
        out[rows] = emb.float().cpu()
    raw.train(was_training)
    return out


def validate(accelerator, model, dataset, collate, text_ids, cfg, plan: ValidationPlan | None = None,
             on_ranked: Callable[[EmbeddedLines, dict[str, torch.Tensor]], None] | None = None) -> dict[str, float]:
    """Whole-gallery Recall@K/MRR (`val_t2i_r1`, ...) and, with a plan, within-group (`val_page_t2i_r1`, ...)
    and phrase-query (`val_phrase_t2i_r1`, ...) metrics. The plan's reference levels (`plan.levels()`, for the
    lines actually embedded) are computed on the first call and kept in `plan.embedded_levels`.
    `on_ranked(embedded, ranks)`: called on every process with the embedded lines and the whole-gallery ranks
    (`metrics.retrieval_ranks`) the metrics came from (the W&B panels, lineclip.panels)."""
    emb = embed_dataset(accelerator, model, dataset, collate, eval_batch_size(cfg), cfg.data.num_workers)
    ranks = retrieval_ranks(emb.image, emb.text, text_ids[emb.indices])
    metrics = ranks_metrics(ranks)
    if on_ranked is not None:
        on_ranked(emb, ranks)
    if plan is not None:
        lines = plan.restrict(emb.indices.numpy())
        phrase_emb = embed_texts(accelerator, model, lines.phrases, cfg) if lines.phrases else None
        metrics.update(lines.metrics(emb.image, emb.text, phrase_emb))
        if cfg.trainer.val_levels:
            plan.embedded_levels = {f"val_{k}": v for k, v in lines.levels().items()}
    return {f"val_{k}": v for k, v in metrics.items()}


def eval_batch_size(cfg: DictConfig) -> int:
    return cfg.data.eval_batch_size or cfg.data.batch_size
