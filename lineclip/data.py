"""The training run's data, assembled from lineclip.batch's parts: manifests -> records -> datasets ->
bucketed sampler dealt to processes -> loader (`build_data`), plus the data report that goes into the run dir."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from lineclip.batch import (
    BucketBatchSampler,
    LineCollator,
    LineDataset,
    ShownTexts,
    TrainTexts,
    count_truncated,
    group_keys,
    text_lengths,
    text_padding_fraction,
)
from lineclip.config import ConfigError
from lineclip.galleries import ValidationPlan, setting_name
from lineclip.lines import LineRecord, LineTable, return_free_heap
from lineclip.manifest import ManifestError, ManifestReport
from lineclip.metrics import text_ids
from lineclip.preprocess import LineGeometry, LineImageTransform
from lineclip.shards import load_shards
from lineclip.sizes import load_line_table, main_first

log = logging.getLogger(__name__)


def text_ids_of(records: Sequence[LineRecord] | LineTable) -> torch.Tensor:
    """One integer per distinct normalised transcription: lines sharing a text are each other's positives."""
    texts = records.texts if isinstance(records, LineTable) else [r.text for r in records]
    return torch.as_tensor(text_ids(texts), dtype=torch.long)


class ShardedBatches:
    """Whole single-bucket batches dealt round-robin to processes; the list is padded by repeating its first
    batches so every process gets the same count (DDP needs equal step counts; a padded *batch* would
    mix buckets, so pad with whole batches)."""

    def __init__(self, sampler: BucketBatchSampler, rank: int, world_size: int) -> None:
        self.sampler, self.rank, self.world_size = sampler, rank, world_size
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """`skip`: batches of this epoch already consumed before a resume; they are not loaded again."""
        self.sampler.set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        # Index arrays, not lists of Python ints: a million-line epoch is a few thousand small arrays.
        arrays = getattr(self.sampler, "batch_arrays", None)
        batches = arrays() if arrays is not None else [np.asarray(batch, dtype=np.int64) for batch in self.sampler]
        if self.world_size > 1 and batches:
            batches += batches[: (-len(batches)) % self.world_size]
        return (batch.tolist() for batch in batches[self.rank :: self.world_size][self.skip :])

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.world_size)


def make_loader(dataset: LineDataset, batch_sampler: Any, collate: LineCollator, num_workers: int,
                seed: int = 0) -> DataLoader:
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        # Its own generator: starting an iterator must not draw from the global RNG, or a resumed run's
        # dropout masks would drift from the uninterrupted run's.
        generator=torch.Generator().manual_seed(seed),
    )


def load_lines(cfg: DictConfig, run_dir: str | Path | None = None, is_main: bool = True,
               wait_for_everyone: Callable[[], None] = lambda: None,
               timings: dict[str, float] | None = None) -> tuple[LineTable, LineTable, dict[str, Any]]:
    """The train and val lines as LineTables with their image sizes, and the data report. From the line cache
    (lineclip.sizes) when it matches, else parsed and scanned by the main process first, then read from its
    cache by the others (`is_main`, `wait_for_everyone`: the accelerator's). `timings`: seconds per phase of
    lineclip.sizes.load_line_table (parse, header scan, cache write or read) are added to it."""
    pixels = cfg.data.max_image_pixels or 0

    def read(path: str) -> tuple[LineTable, ManifestReport]:
        if cfg.data.format == "shards":
            return load_shards(path, cfg.data.on_bad_row)
        return load_line_table(path, cfg.data.dataset_dir, cfg.data.on_bad_row, cfg.data.max_text_bytes, pixels,
                               fallback_dir=run_dir, use_cache=cfg.data.line_cache, cache_dir=cfg.data.line_cache_dir,
                               scan_workers=cfg.data.scan_workers, progress=is_main, timings=timings)

    def read_all() -> tuple[LineTable, LineTable, dict[str, Any]]:
        train_source, val_source = cfg.data.train_manifest, cfg.data.val_manifest
        if cfg.data.format == "shards":  # the shards' index: no manifest parse, no header scan
            train_source, val_source = cfg.data.train_shards, cfg.data.val_shards
        train, train_report = read(train_source)
        val, report = LineTable.empty(), {"train": train_report.to_dict()}
        if val_source:
            val, val_report = read(val_source)
            report["val"] = val_report.to_dict()
        return train, val, report

    train_records, val_records, report = main_first(is_main, wait_for_everyone, read_all)
    truncated = count_truncated(train_records.texts, cfg.text.max_length)
    report["train_truncated_texts"] = truncated
    report["train_truncated_share"] = truncated / max(1, len(train_records))
    if truncated:
        log.warning("text: %d of %d train transcriptions exceed text.max_length=%d bytes and are truncated",
                    truncated, len(train_records), cfg.text.max_length)
    # What the cache's checks and the length pass read and allocated (hundreds of MB at 10M lines).
    train_records.release_pages()
    return_free_heap()
    return train_records, val_records, report


def image_problems(dataset: LineDataset, cfg: DictConfig, split: str) -> dict[str, int]:
    """Count the lines whose image headers are unreadable or empty; in error mode, stop at the first."""
    counts = {"unreadable_image": 0, "empty_image": 0, "too_large_image": 0}
    for index, kind in sorted(dataset.image_problems.items()):
        if cfg.data.on_bad_row == "error":
            record = dataset.records[index]
            raise ManifestError(f"{record.source}: {kind} ({record.image_path})")
        counts[kind] += 1
    if any(counts.values()):
        log.warning("%s: skipping %s", split, ", ".join(f"{k}={v}" for k, v in counts.items() if v))
    return counts


def add_counts(skipped: dict[str, int], counts: dict[str, int]) -> None:
    """Add to the per-reason counts (shards arrive with the image problems found when they were written)."""
    for reason, n in counts.items():
        skipped[reason] = skipped.get(reason, 0) + n


def validation_plan(records: list[LineRecord], cfg: DictConfig, report: dict[str, Any] | None = None,
                    main_process: bool = True) -> ValidationPlan:
    """What validation scores besides the whole gallery (trainer.val_gallery_by, trainer.val_phrases), and the
    reference levels (trainer.val_levels). The ocr level is read on the main process only (the levels are logged
    from there), its report kept in `report["val_ocr"]`."""
    low, high = cfg.trainer.val_phrase_syllables
    plan = ValidationPlan.build(records, list(cfg.trainer.val_gallery_by), cfg.trainer.val_phrases,
                                cfg.trainer.val_phrase_seed, low, high, levels=cfg.trainer.val_levels)
    if "ocr" in plan.level_names and main_process:
        from lineclip.ocr import ocr_level

        texts = [r.text for r in records]
        ocr_report, plan.ocr = ocr_level(records, texts, plan.phrases if plan.with_phrases else None,
                                         OmegaConf.to_object(cfg.trainer.val_ocr), cfg.data.val_manifest,
                                         cfg.trainer.progress_bar)
        if report is not None:
            report["val_ocr"] = ocr_report
    skipped = [key for key in cfg.trainer.val_gallery_by if setting_name(key) not in plan.groups]
    if skipped:
        log.info("validation: no val line has %s; no within-group metrics for it", ", ".join(skipped))
    return plan


@dataclass
class TrainData:
    """Everything the loop and the final export read: the records, the datasets, the sampler and loader."""

    train_records: LineTable
    val_records: LineTable  # empty without a val manifest
    report: dict[str, Any]  # the data report (data_report.json), filled in further by the loop
    train_set: LineDataset
    val_set: LineDataset | None
    eval_transform: LineImageTransform
    max_image_pixels: int
    collate: LineCollator
    train_texts: TrainTexts
    val_ids: torch.Tensor | None
    val_plan: ValidationPlan | None
    sampler: ShardedBatches
    loader: DataLoader

    def corpus(self) -> LineDataset:
        """The train lines as the exported corpus sees them: the eval transform, no cropping."""
        return LineDataset(self.train_records, self.eval_transform, max_image_pixels=self.max_image_pixels)


def build_data(cfg: DictConfig, train_records: LineTable, val_records: LineTable,
               report: dict[str, Any], image_processor: Any, rank: int, world: int) -> TrainData:
    """Datasets (train augmented, val and corpus not), the collator, this epoch's texts, the validation plan
    and the bucketed sampler dealt to this process, from the records `load_lines` read."""
    geometry = LineGeometry(cfg.preprocess.target_height, cfg.preprocess.max_width,
                            tuple(cfg.preprocess.width_buckets), cfg.preprocess.patch_multiple)
    mean, std = tuple(image_processor.image_mean), tuple(image_processor.image_std)
    crop = cfg.text.max_length if cfg.data.crop_to_text else None
    pixels = cfg.data.max_image_pixels or 0  # null: no limit of lineclip's own
    train_set = LineDataset(train_records, LineImageTransform(cfg.preprocess.pipeline, geometry, mean, std,
                                                              augment=cfg.data.augment), crop_to_text_bytes=crop,
                            max_image_pixels=pixels)
    eval_transform = LineImageTransform(cfg.preprocess.pipeline, geometry, mean, std, augment=False)
    add_counts(report["train"]["skipped"], image_problems(train_set, cfg, "train"))
    val_set = LineDataset(val_records, eval_transform, crop_to_text_bytes=crop,
                          max_image_pixels=pixels) if val_records else None
    if val_set is not None:
        add_counts(report["val"]["skipped"], image_problems(val_set, cfg, "val"))
    collate = LineCollator(cfg.text.max_length, reading=cfg.loss.reading_weight > 0 or cfg.loss.bag_weight > 0)
    span = cfg.data.text_span
    # With crop_to_text the image shows only the text that fits text.max_length: phrases come from that part.
    shown = ShownTexts(train_records.texts, cfg.text.max_length - 1 if crop else None)
    train_texts = TrainTexts(shown, span.p, span.min_syllables, span.max_syllables, cfg.trainer.seed)
    val_ids = text_ids_of(val_records) if val_records else None
    val_plan = validation_plan(val_records, cfg, report, rank == 0) if val_records else None
    lengths = text_lengths(train_records.texts, cfg.text.max_length)
    groups = None
    if cfg.data.group_batches_by:
        groups = group_keys(train_records, cfg.data.group_batches_by)
        if (groups < 0).all():
            raise ConfigError(f"data.group_batches_by={cfg.data.group_batches_by}: no train line has that field")
    bucketed = BucketBatchSampler(train_set.buckets, cfg.data.batch_size, shuffle=True, seed=cfg.trainer.seed,
                                  lengths=lengths if cfg.data.text_bucket_bytes else None,
                                  text_bucket_bytes=cfg.data.text_bucket_bytes or 64, groups=groups,
                                  min_batch_size=min(cfg.data.min_batch_size, cfg.data.batch_size))
    report["train_lines_dropped_per_epoch"] = bucketed.n_dropped
    if bucketed.n_dropped:
        log.info("data.min_batch_size=%d: %d lines an epoch fall in bucket tails that small and are left out "
                 "(shuffled: mostly different ones each epoch)", cfg.data.min_batch_size, bucketed.n_dropped)
    report["text_padding_fraction"] = text_padding_fraction(bucketed.batch_arrays(), lengths)
    log.info("text padding: %.1f%% of the text positions of an epoch", 100 * report["text_padding_fraction"])
    # The bucketing's per-line temporaries and the cache pages its passes read, before the loader's workers fork
    # from this process (a 10M-line start: ~0.4 GB less in this process and in each worker).
    del lengths, groups
    train_records.release_pages()
    return_free_heap()
    sampler = ShardedBatches(bucketed, rank, world)
    loader = make_loader(train_set, sampler, collate, cfg.data.num_workers, cfg.trainer.seed)
    return TrainData(train_records, val_records, report, train_set, val_set, eval_transform, pixels, collate,
                     train_texts, val_ids, val_plan, sampler, loader)
