"""Embedding a dataset across processes and scoring it: what validation and the final corpus export run.

Both embed through `lineclip.encoder.embed_batches`, the one image-embedding path (`LineEncoder` takes it too),
each process its share of unpadded single-bucket batches dealt round-robin. `embed_dataset` then gathers the
rows on every process (validation: val sets are small, and every process scores); `export_corpus` never does:
each process appends its rows to its own part file as they are made and the main process merges the parts into
the corpus file, so no process holds the corpus in memory. `validate` turns val-set embeddings into Recall@K/MRR
(lineclip.metrics, chunked: O(N x chunk) memory) and, with a ValidationPlan, within-group and phrase-query metrics
(lineclip.galleries).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from omegaconf import DictConfig

from lineclip.artifacts import EMBEDDINGS
from lineclip.batch import LineCollator, LineDataset, byte_encode
from lineclip.checkpoint import all_or_none
from lineclip.corpus import EmbeddingPart, merge_parts
from lineclip.encoder import embed_batches, line_batches
from lineclip.files import as_write_error
from lineclip.galleries import ValidationPlan
from lineclip.metrics import ranks_metrics, retrieval_ranks


@dataclass
class EmbeddedLines:
    image: torch.Tensor  # [N, D] float32, rows for the dataset indices below, in ascending index order
    text: torch.Tensor
    indices: torch.Tensor
    n_corrupt: int
    readings: list[str] | None = None  # the reading head's greedy decoding, rows as `indices` (when asked for)


@dataclass
class CorpusExport:
    """The training corpus as `export_corpus` left it on the main process."""

    embeddings: Path  # float32 [N, D] .npy, L2-normalised, rows in ascending dataset index
    indices: np.ndarray  # int64 [N]: those dataset indices (lines whose image could be read)
    directory: Path  # the export's working dir (parts, then the merged file); removed once the corpus is in place


def embed_dataset(
    accelerator: Accelerator, model: torch.nn.Module, dataset: LineDataset, collate: LineCollator,
    batch_size: int, num_workers: int, with_text: bool = True, with_reading: bool = False,
) -> EmbeddedLines:
    """Embed every readable line once across all processes (batches dealt round-robin, never padded with
    repeats), then gather so every process holds all rows in dataset order. `with_reading` (a model with a
    reading head): each line's greedy decoding too."""
    raw = accelerator.unwrap_model(model)
    device, dim = accelerator.device, raw.image_head.output_dim
    batches = line_batches(dataset.buckets, batch_size, accelerator.process_index, accelerator.num_processes)
    images, texts, indices, n_corrupt = [], [], [], 0
    with_reading = with_reading and raw.reading_head is not None
    read: list[tuple[int, str]] = []
    for batch in embed_batches(raw, dataset, batches, collate, num_workers, device, with_text=with_text,
                               autocast=accelerator.autocast, with_reading=with_reading):
        n_corrupt += len(batch.failed)
        if with_reading:
            read += zip(batch.indices.tolist(), batch.readings, strict=True)
        images.append(batch.image)
        if with_text:
            texts.append(batch.text)
        indices.append(batch.indices)

    def stacked(parts: list[np.ndarray], empty: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.concatenate(parts) if parts else empty).to(device)

    image = stacked(images, np.empty((0, dim), np.float32))
    text = stacked(texts, np.empty((0, dim), np.float32))
    index = stacked(indices, np.empty(0, np.int64))
    # Ranks hold different counts: pad to the longest with index -1, gather, drop the padding, sort.
    image, text, index = (accelerator.pad_across_processes(t, dim=0, pad_index=-1) for t in (image, text, index))
    image, text, index = accelerator.gather((image, text, index))
    keep = index >= 0
    order = torch.argsort(index[keep])
    n_corrupt_total = int(accelerator.reduce(torch.tensor(n_corrupt, device=device), "sum"))
    readings = None
    if with_reading:  # strings: gathered as objects, then put in the rows' order
        by_index = dict(gather_object(read) if accelerator.num_processes > 1 else read)
        readings = [by_index[i] for i in index[keep][order].tolist()]
    return EmbeddedLines(
        image=image[keep][order].cpu(),
        text=text[keep][order].cpu() if with_text else torch.empty(0),
        indices=index[keep][order].cpu(),
        n_corrupt=n_corrupt_total,
        readings=readings,
    )


def export_corpus(
    accelerator: Accelerator, model: torch.nn.Module, dataset: LineDataset, collate: LineCollator,
    batch_size: int, num_workers: int, directory: Path, progress: bool = False,
) -> CorpusExport | None:
    """Embed every readable line of `dataset` once across all processes, each process appending its rows to its
    own part file in `directory` (which every process must see: the run dir) as they are made; then the main
    process merges the parts, in dataset order, into `directory/faiss_embeddings.npy`. Memory: one batch per
    process, plus 8 bytes a line on the main process while merging. Returns the export on the main process,
    None on the others. `progress`: a bar with a rate on the main process (its share of the lines)."""
    raw = accelerator.unwrap_model(model)
    rank, world, dim = accelerator.process_index, accelerator.num_processes, raw.image_head.output_dim
    batches = line_batches(dataset.buckets, batch_size, rank, world)
    title = "corpus export" + (f" (process 0 of {world})" if world > 1 else "")
    what = f"the corpus export in {directory}"
    try:  # each phase ends in a barrier that tells every process whether any of them failed
        with all_or_none(accelerator, what):
            if accelerator.is_main_process:
                shutil.rmtree(directory, ignore_errors=True)  # an interrupted earlier export's parts
                directory.mkdir(parents=True)
        with all_or_none(accelerator, what), EmbeddingPart(directory, rank, dim) as part:
            for batch in embed_batches(raw, dataset, batches, collate, num_workers, accelerator.device,
                                       autocast=accelerator.autocast,
                                       progress=title if progress and accelerator.is_main_process else None):
                part.append(batch.indices, batch.image)
        with all_or_none(accelerator, what):
            indices = merge_parts(directory, world, dim, directory / EMBEDDINGS) if accelerator.is_main_process \
                else None
        if not accelerator.is_main_process:
            return None
    except OSError as exc:
        error = as_write_error(exc, what)
        if error is None:  # already a WriteError
            raise
        raise error from exc
    return CorpusExport(directory / EMBEDDINGS, indices, directory)


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
    reads = reading_measured(accelerator.unwrap_model(model))
    emb = embed_dataset(accelerator, model, dataset, collate, eval_batch_size(cfg), cfg.data.num_workers,
                        with_reading=reads)
    ranks = retrieval_ranks(emb.image, emb.text, text_ids[emb.indices])
    metrics = ranks_metrics(ranks)
    if on_ranked is not None:
        on_ranked(emb, ranks)
    lines = plan.restrict(emb.indices.numpy()) if plan is not None else None
    if lines is not None:
        phrase_emb = embed_texts(accelerator, model, lines.phrases, cfg) if lines.phrases else None
        metrics.update(lines.metrics(emb.image, emb.text, phrase_emb))
        if cfg.trainer.val_levels:
            plan.embedded_levels = {f"val_{k}": v for k, v in lines.levels().items()}
    if emb.readings is not None:
        from lineclip.reading import readable_text
        from lineclip.transcripts import reading_metrics

        texts = [dataset.records[int(i)].text for i in emb.indices]
        metrics.update(reading_metrics(emb.readings, texts, text_ids[emb.indices].numpy(), lines,
                                       references=[readable_text(t) for t in texts]))
    return {f"val_{k}": v for k, v in metrics.items()}


_warned_no_rapidfuzz = False


def reading_measured(model: torch.nn.Module) -> bool:
    """Whether validation decodes the reading head: it has one, and rapidfuzz (lineclip[ocr]) is there to
    measure it (else one warning per process, and no val_cer)."""
    global _warned_no_rapidfuzz
    if getattr(model, "reading_head", None) is None:
        return False
    from lineclip.transcripts import rapidfuzz_missing

    missing = rapidfuzz_missing()
    if missing is not None and not _warned_no_rapidfuzz:
        _warned_no_rapidfuzz = True
        logging.getLogger("lineclip.validation").warning("no val_cer or decode-then-match: %s", missing)
    return missing is None


def eval_batch_size(cfg: DictConfig) -> int:
    return cfg.data.eval_batch_size or cfg.data.batch_size
