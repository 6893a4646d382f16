"""The files a run leaves behind: the Workbench's bundle format and the corpus embeddings.

A bundle is five entries sharing one prefix (`""` for the final model, `checkpoint_step_0002400_` for a
checkpoint). Every entry is first written into a staging dir and renamed into place, with
`training_config.json` last: a bundle whose config file exists is complete, even if the process was
killed in the middle of a save.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from transformers.utils import logging as hf_logging

from lineclip.manifest import LineRecord
from lineclip.towers import DualEncoder

BACKBONE = "text_hierarchy_vit_backbone"
IMAGE_HEAD = "text_hierarchy_projection_head.pt"
TEXT_ENCODER = "text_hierarchy_clip_text_encoder"
TEXT_HEAD = "text_hierarchy_clip_text_projection_head.pt"
CONFIG = "training_config.json"
BUNDLE_ENTRIES = (BACKBONE, IMAGE_HEAD, TEXT_ENCODER, TEXT_HEAD, CONFIG)
EMBEDDINGS = "faiss_embeddings.npy"
EMBEDDINGS_META = "faiss_embeddings_meta.parquet"
META_COLUMNS = ("sample_id", "doc_id", "page_id", "line_id", "text", "image_path")


def checkpoint_prefix(step: int) -> str:
    return f"checkpoint_step_{step:07d}_"


def workbench_keys(cfg: Any) -> dict[str, Any]:
    """The keys the PechaBridge Workbench reads to find a bundle and rebuild its preprocessing."""
    pre = cfg.preprocess
    return {
        "mode": "line_clip",
        "target_height": int(pre.target_height),
        "max_width": int(pre.max_width),
        "patch_multiple": int(pre.patch_multiple),
        "width_buckets": [int(b) for b in pre.width_buckets],
        "image_preprocess_pipeline": str(pre.pipeline),
        "image_preprocess_pb": pre.pipeline == "pb",
        "image_preprocess_bdrc": pre.pipeline == "bdrc",
        "text_max_length": int(cfg.text.max_length),
        "projection_dim": int(cfg.model.projection_dim),
    }


def staging_dir(output_dir: str | Path, prefix: str, reset: bool = False) -> Path:
    """Where a bundle is assembled before its entries are renamed into place."""
    staging = Path(output_dir) / f".staging_{prefix or 'final'}"
    if reset:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    return staging


def save_bundle(
    output_dir: str | Path,
    prefix: str,
    model: DualEncoder,
    image_processor: Any,
    tokenizer: Any,
    training_config: dict[str, Any],
    extra_entries: tuple[str, ...] = (),
) -> None:
    """Write one complete bundle. `model` must be the unwrapped module (accelerator.unwrap_model).

    `extra_entries` were already written into `staging_dir(output_dir, prefix)` by the caller (the training
    state); they are renamed into place with the rest, before the config."""
    output_dir = Path(output_dir)
    staging = staging_dir(output_dir, prefix, reset=not extra_entries)
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a shard-writing bar per save would break the training bar
    try:
        model.image_backbone.save_pretrained(staging / BACKBONE)
        image_processor.save_pretrained(staging / BACKBONE)
        model.image_head.save(staging / IMAGE_HEAD)
        model.text_encoder.save_pretrained(staging / TEXT_ENCODER)
        tokenizer.save_pretrained(staging / TEXT_ENCODER)
        model.text_head.save(staging / TEXT_HEAD)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    (staging / CONFIG).write_text(json.dumps(training_config, indent=2, ensure_ascii=False, default=str))
    for entry in (*extra_entries, *BUNDLE_ENTRIES):  # config last: its presence marks the bundle complete
        target = output_dir / f"{prefix}{entry}"
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        (staging / entry).rename(target)
    staging.rmdir()


def is_complete_bundle(output_dir: str | Path, prefix: str) -> bool:
    return all((Path(output_dir) / f"{prefix}{entry}").exists() for entry in BUNDLE_ENTRIES)


def corpus_meta(records: Sequence[LineRecord]) -> pd.DataFrame:
    """The meta parquet's rows: one per corpus line, in embedding order."""
    return pd.DataFrame({
        "sample_id": [r.sample_id for r in records],
        "doc_id": [r.doc_id for r in records],
        "page_id": [r.page_id for r in records],
        "line_id": [r.line_id for r in records],
        "text": [r.text for r in records],
        "image_path": [r.image_path for r in records],
    }, columns=list(META_COLUMNS))


def save_corpus_embeddings(output_dir: str | Path, embeddings: np.ndarray, records: Sequence[LineRecord]) -> None:
    """`faiss_embeddings.npy` (float32 [N, D], L2-normalised) and its meta parquet, rows in the same order."""
    if len(embeddings) != len(records):
        raise ValueError(f"{len(embeddings)} embeddings for {len(records)} records")
    output_dir = Path(output_dir)
    meta = corpus_meta(records)
    tmp_npy, tmp_meta = output_dir / f".{EMBEDDINGS}.tmp", output_dir / f".{EMBEDDINGS_META}.tmp"
    with open(tmp_npy, "wb") as f:
        np.save(f, np.ascontiguousarray(embeddings, dtype=np.float32))
    meta.to_parquet(tmp_meta, index=False)
    tmp_npy.rename(output_dir / EMBEDDINGS)
    tmp_meta.rename(output_dir / EMBEDDINGS_META)
