"""The files a run leaves behind: the Workbench's bundle format and the corpus embeddings.

A bundle is five entries sharing one prefix (`""` for the final model, `checkpoint_step_0002400_` for a
checkpoint). Every entry is first written into a staging dir and renamed into place, with
`training_config.json` last: a bundle whose config file exists is complete, even if the process was
killed in the middle of a save.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
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
DATA_REPORT = "data_report.json"
TRAINING_STATE = "training_state"
# What else lineclip.train (and Hydra, W&B) keep in a run dir besides bundles.
RUN_FILES = (EMBEDDINGS, EMBEDDINGS_META, DATA_REPORT, "train.log", "wandb_run_id", ".hydra", "wandb")
# A lineclip.index corpus dir's own files (lineclip.corpus).
CORPUS_FILES = (EMBEDDINGS, EMBEDDINGS_META, "corpus.json", "text_embeddings.npy", "index.faiss")
_BUNDLE_ENTRY = re.compile(
    r"^(checkpoint_step_\d{7}_)?(" + "|".join(re.escape(e) for e in (*BUNDLE_ENTRIES, TRAINING_STATE)) + ")$")


class OutputPathError(ValueError):
    """An output option that points at a run's or a corpus's own files; one line."""


def is_run_entry(name: str) -> bool:
    """A name that lineclip.train writes (or Hydra/W&B write for it) in a run dir."""
    return bool(_BUNDLE_ENTRY.match(name)) or name in RUN_FILES or name.startswith(".staging_")


def run_entries(directory: str | Path) -> list[str]:
    """The entries of a dir that show a training run was started or finished there (not Hydra's own .hydra/ and
    train.log, which Hydra writes before the trainer starts)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    hydra_own = {".hydra", "train.log", "wandb", "wandb_run_id"}
    try:
        names = os.listdir(directory)
    except OSError:  # an unlistable dir is no run of ours
        return []
    return sorted(n for n in names if is_run_entry(n) and n not in hydra_own)


def is_run_dir(directory: str | Path) -> bool:
    directory = Path(directory)
    return directory.is_dir() and (bool(run_entries(directory)) or (directory / ".hydra").is_dir())


def is_corpus_dir(directory: str | Path) -> bool:
    directory = Path(directory)
    return directory.is_dir() and any((directory / n).exists() for n in ("corpus.json", EMBEDDINGS))


def check_output_path(path: str | Path, option: str, replace_corpus: bool = False,
                      inputs: Sequence[str | Path] = ()) -> Path:
    """Refuse an output path that is a run dir or corpus dir, or one of their own files or dirs (at any depth),
    or one of the command's inputs. `replace_corpus`: the path may be an existing lineclip.index corpus dir
    (index.overwrite=true), never a run dir. Returns the absolute path."""
    target = Path(os.path.abspath(os.path.expanduser(str(path))))
    for source in inputs:
        if source and os.path.exists(source) and target.exists() and os.path.samefile(source, target):
            raise OutputPathError(f"{option}={path} is one of this command's inputs ({source})")
    for child in [target, *target.parents][:-1]:
        parent, name = child.parent, child.name
        if is_run_dir(parent) and is_run_entry(name):
            raise OutputPathError(f"{option}={path}: {child} belongs to the run in {parent}; choose another path")
        if is_corpus_dir(parent) and name in CORPUS_FILES:
            raise OutputPathError(f"{option}={path}: {child} belongs to the corpus in {parent}; choose another path")
    if target.is_dir():
        if is_run_dir(target):
            raise OutputPathError(f"{option}={path} is a training run dir; lineclip never writes over one")
        if not replace_corpus:
            raise OutputPathError(f"{option}={path} is a directory")
        if not (target / "corpus.json").is_file():
            raise OutputPathError(f"{option}={path} exists and is not a lineclip.index corpus dir; refusing to "
                                  "replace it")
    elif target.exists() and replace_corpus:
        raise OutputPathError(f"{option}={path} exists and is not a directory")
    return target


def first_non_regular(paths: Sequence[str | Path]) -> Path | None:
    """The first of `paths` (or of the files directly inside those that are dirs) that is neither a regular file
    nor a dir: a FIFO or device would block or never end the read that opens it. Missing paths are skipped."""
    import stat

    for path in map(Path, paths):
        try:
            mode = path.stat().st_mode
        except OSError:
            continue
        if stat.S_ISDIR(mode):
            try:
                children = list(os.scandir(path))
            except OSError:
                continue
            for child in children:
                if not (child.is_file() or child.is_dir()):
                    return Path(child.path)
        elif not stat.S_ISREG(mode):
            return path
    return None


def heads_fingerprint(directory: str | Path, prefix: str = "") -> str:
    """A short hash of a bundle's two projection heads: they change at every training step, so two bundles with
    equal heads embed alike. Corpora record it so that a search never mixes embeddings of two models."""
    digest = hashlib.sha256()
    for entry in (IMAGE_HEAD, TEXT_HEAD):
        digest.update((Path(directory) / f"{prefix}{entry}").read_bytes())
    return digest.hexdigest()[:16]


def remove_staging(staging: str | Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)


class WriteError(OSError):
    """Writing a bundle, a corpus or a training state failed (disk full, read-only, quota); one line."""


def as_write_error(exc: BaseException, what: str) -> WriteError | None:
    """What a failed write becomes: a full disk surfaces as OSError from Python, RuntimeError from torch.save's
    zip writer and SafetensorError from safetensors; all three mean the same to the user. None: not a write error
    (re-raise as is)."""
    from safetensors import SafetensorError

    if isinstance(exc, WriteError) or not isinstance(exc, (OSError, RuntimeError, SafetensorError)):
        return None
    lines = str(exc).strip().splitlines()
    return WriteError(f"cannot write {what}: {type(exc).__name__}: {lines[-1] if lines else ''}".strip())


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
    corpus: dict[str, Any] | None = None,
) -> None:
    """Write one complete bundle. `model` must be the unwrapped module (accelerator.unwrap_model).

    `extra_entries` were already written into `staging_dir(output_dir, prefix)` by the caller (the training
    state; for the final bundle the corpus embeddings and data report); they are renamed into place with the
    rest, before the config. The old config goes first, so a failure half-way leaves no bundle that looks
    complete (and no old model beside new embeddings). `corpus`: recorded in the config as `corpus`, with the
    fingerprint of the heads written here (the model that embedded the staged corpus)."""
    output_dir = Path(output_dir)
    staging = staging_dir(output_dir, prefix, reset=not extra_entries)
    try:
        _save_bundle(output_dir, prefix, staging, model, image_processor, tokenizer, training_config, extra_entries,
                     corpus)
    except BaseException as exc:
        remove_staging(staging)  # a full disk leaves no half-written staging dir behind
        error = as_write_error(exc, f"the {prefix or 'final '}bundle in {output_dir}")
        if error is None:
            raise
        raise error from exc


def _save_bundle(output_dir: Path, prefix: str, staging: Path, model: DualEncoder, image_processor: Any,
                 tokenizer: Any, training_config: dict[str, Any], extra_entries: tuple[str, ...],
                 corpus: dict[str, Any] | None) -> None:
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
    if corpus is not None or not prefix:
        # The final bundle says whether the run dir's corpus is its own: None (not exported) or the fingerprint.
        training_config = {**training_config, "corpus": None if corpus is None else {
            **corpus, "fingerprint": heads_fingerprint(staging)}}
    (staging / CONFIG).write_text(json.dumps(training_config, indent=2, ensure_ascii=False, default=str))
    (output_dir / f"{prefix}{CONFIG}").unlink(missing_ok=True)  # the old bundle stops looking complete first
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
