"""The files a run leaves behind besides its bundles (lineclip.bundle): the corpus embeddings, the data report,
and what marks a dir as a run's or a corpus's own, so that no command writes over one.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from omegaconf import DictConfig, OmegaConf

from lineclip.bundle import (  # noqa: F401
    BACKBONE,
    BUNDLE_ENTRIES,
    CONFIG,
    IMAGE_HEAD,
    PREFIX_PATTERN,
    TEXT_ENCODER,
    TEXT_HEAD,
    TRAINING_STATE,
)
from lineclip.errors import LineclipError

# The bundle's entry names, which a run dir holds too (re-exported: artifacts.CONFIG reads as "a run's config").
from lineclip.files import foreign_entries
from lineclip.lines import LineRecord, LineTable

EMBEDDINGS = "faiss_embeddings.npy"
EMBEDDINGS_META = "faiss_embeddings_meta.parquet"
META_COLUMNS = ("sample_id", "doc_id", "page_id", "line_id", "text", "image_path")
DATA_REPORT = "data_report.json"
# The training run's corpus export at work: each process's part, then the merged file (lineclip.validation).
CORPUS_EXPORT = ".staging_corpus"
# The empty file whose flock claims a run dir for the one lineclip.train writing into it (lineclip.checkpoint).
RUN_LOCK = ".lineclip_run.lock"
# What else lineclip.train (and Hydra, W&B) keep in a run dir besides bundles.
# The reading head (lineclip.reading) is saved beside the final bundle, never in it.
RUN_FILES = (EMBEDDINGS, EMBEDDINGS_META, DATA_REPORT, "train.log", "wandb_run_id", ".hydra", "wandb", RUN_LOCK,
             "reading_head.safetensors", "reading_head.json")
# A lineclip.index corpus dir's own files (lineclip.corpus).
CORPUS_FILES = (EMBEDDINGS, EMBEDDINGS_META, "corpus.json", "text_embeddings.npy", "index.faiss")
_BUNDLE_ENTRY = re.compile(
    rf"^({PREFIX_PATTERN})?(" + "|".join(re.escape(e) for e in (*BUNDLE_ENTRIES, TRAINING_STATE)) + ")$")


class OutputPathError(LineclipError, ValueError):
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
    hydra_own = {".hydra", "train.log", "wandb", "wandb_run_id", RUN_LOCK}  # the lock: any run's, even a refused one
    try:
        names = os.listdir(directory)
    except OSError:  # an unlistable dir is no run of ours
        return []
    return sorted(n for n in names if is_run_entry(n) and n not in hydra_own)


def write_launch_record(output_dir: str | Path, cfg: DictConfig) -> None:
    """`.hydra/config.yaml`, `hydra.yaml` and `overrides.yaml` as Hydra writes them at a job's start. Training turns
    Hydra's own write off (conf/train.yaml: `hydra.output_subdir: null`): it comes before the trainer can refuse a
    dir that holds another run, whose record it would overwrite. Nothing outside a Hydra job (a test's in-process
    train()) has a record to write."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.instance().cfg
    record = Path(output_dir) / ".hydra"
    record.mkdir(exist_ok=True)
    for name, node in (("config.yaml", cfg), ("hydra.yaml", hydra_cfg),
                       ("overrides.yaml", hydra_cfg.hydra.overrides.task)):
        (record / name).write_text(OmegaConf.to_yaml(node), encoding="utf-8")


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
        # A corpus dir holds faiss_embeddings.npy as a run dir does; its corpus.json (never in a run dir) tells it
        # apart, and foreign_entries below still refuses one that holds anything else (a run's bundle, ...).
        own_corpus = replace_corpus and corpus_dir_files(target) is not None
        if is_run_dir(target) and not own_corpus:
            raise OutputPathError(f"{option}={path} is a training run dir; lineclip never writes over one")
        if not replace_corpus:
            raise OutputPathError(f"{option}={path} is a directory")
        problem = foreign_entries(target, "lineclip.index corpus dir", corpus_dir_files(target))
        if problem:
            raise OutputPathError(f"{option}={path} {problem}")
    elif target.exists() and replace_corpus:
        raise OutputPathError(f"{option}={path} exists and is not a directory")
    return target


# How lineclip.search's page and lineclip.evaluate's report begin: what marks an existing file as one they wrote.
SEARCH_PAGE_START = '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>lineclip search</title>'
EVAL_REPORT_KEYS = ("manifest", "bundle", "manifest_report", "lineclip_version")
_MAX_REPORT_BYTES = 256 << 20  # larger than any report lineclip.evaluate writes: not read to be recognised


def written_by_lineclip(path: Path, kind: str) -> bool:
    """True when the regular file `path` is a `kind` output ("search" page or "eval" report) that lineclip wrote
    (by its content, not its name). Anything else (another program's file, a FIFO, a dir) is False."""
    try:
        if not path.is_file() or path.is_symlink():
            return False
        if kind == "search":
            with open(path, "rb") as handle:
                return handle.read(len(SEARCH_PAGE_START.encode())) == SEARCH_PAGE_START.encode()
        if path.stat().st_size > _MAX_REPORT_BYTES:
            return False
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(report, dict) and all(key in report for key in EVAL_REPORT_KEYS)


def check_replaceable(path: Path, option: str, kind: str) -> None:
    """The rule for a command's output file (search.output, eval.output): a new path is written; an existing one is
    replaced only when lineclip itself wrote it there (a page or report of an earlier run: re-running a command
    updates its output), never a file of anyone else's, which stays as it was."""
    if (path.exists() or path.is_symlink()) and not written_by_lineclip(path, kind):
        what = "lineclip.search page" if kind == "search" else "lineclip.evaluate report"
        raise OutputPathError(f"{option}={path} exists and is not a {what}; lineclip replaces only its own "
                              "outputs: remove it or choose another path")


def corpus_dir_files(directory: Path) -> set[str] | None:
    """The files lineclip.index writes into a corpus dir, by its corpus.json (kind, text embeddings); None when
    corpus.json is not one lineclip.index wrote."""
    try:
        info = json.loads((directory / "corpus.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(info, dict) or "lineclip_version" not in info or info.get("kind") not in ("flat", "ivf", "hnsw"):
        return None
    own = set(CORPUS_FILES)
    if not info.get("text_embeddings", True):
        own.discard("text_embeddings.npy")
    if info["kind"] == "flat":
        own.discard("index.faiss")
    return own


def corpus_meta(records: Sequence[LineRecord], rows: np.ndarray | None = None) -> pd.DataFrame:
    """The meta parquet's rows: one per corpus line, in embedding order (`records[rows]`, or all of them). From a
    LineTable the columns are taken as they are: no LineRecord per line, which a 10M-line export cannot afford."""
    if isinstance(records, LineTable):
        table = records.table if rows is None else records.table.take(pa.array(rows, pa.int64()))
        return table.select(list(META_COLUMNS)).to_pandas()
    if rows is not None:
        records = [records[i] for i in rows.tolist()]
    return pd.DataFrame({
        "sample_id": [r.sample_id for r in records],
        "doc_id": [r.doc_id for r in records],
        "page_id": [r.page_id for r in records],
        "line_id": [r.line_id for r in records],
        "text": [r.text for r in records],
        "image_path": [r.image_path for r in records],
    }, columns=list(META_COLUMNS))


def save_corpus_embeddings(output_dir: str | Path, embeddings: np.ndarray | Path,
                           records: Sequence[LineRecord], rows: np.ndarray | None = None) -> None:
    """`faiss_embeddings.npy` (float32 [N, D], L2-normalised) and its meta parquet, rows in the same order: the
    lines `records[rows]` (or all of `records`). `embeddings`: the rows, or an `.npy` file of them already written
    (the corpus export's merged file, on the same file system), which is moved into place rather than read."""
    output_dir = Path(output_dir)
    n_rows = len(np.load(embeddings, mmap_mode="r")) if isinstance(embeddings, Path) else len(embeddings)
    n_lines = len(records) if rows is None else len(rows)
    if n_rows != n_lines:
        raise ValueError(f"{n_rows} embeddings for {n_lines} records")
    meta = corpus_meta(records, rows)
    tmp_npy, tmp_meta = output_dir / f".{EMBEDDINGS}.tmp", output_dir / f".{EMBEDDINGS_META}.tmp"
    if isinstance(embeddings, Path):
        os.replace(embeddings, tmp_npy)
    else:
        with open(tmp_npy, "wb") as f:
            np.save(f, np.ascontiguousarray(embeddings, dtype=np.float32))
    meta.to_parquet(tmp_meta, index=False)
    tmp_npy.rename(output_dir / EMBEDDINGS)
    tmp_meta.rename(output_dir / EMBEDDINGS_META)
