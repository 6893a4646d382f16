"""`python -m lineclip.shard manifest=M out_dir=D shard_size=N`: a manifest's lines as tar shards.

This module is the writer and its command; the format of a shard dir and reading it (`load_shards`, what training
with `data.format=shards` calls) are lineclip.shards, in the domain layer beside the manifest reader. The reader's
names stay importable from here.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from lineclip.cli import UsageError, hydra_command, run_command
from lineclip.config import register_configs
from lineclip.files import foreign_entries
from lineclip.manifest import DEFAULT_MAX_TEXT_BYTES, ON_BAD_ROW_CHOICES, ManifestError
from lineclip.preprocess import DEFAULT_MAX_IMAGE_PIXELS, open_regular
from lineclip.progress import Progress
from lineclip.shards import (  # noqa: F401 - the reader's names, importable here as before
    IMAGE_PROBLEM_REASONS,
    INDEX_FILE,
    INDEX_SCHEMA,
    SHARD_FORMAT,
    SHARD_VERSION,
    SHARDS_FILE,
    ShardImages,
    load_shards,
    read_summary,
    shard_dirs,
)
from lineclip.sizes import IMAGE_PROBLEMS, load_line_table

log = logging.getLogger(__name__)


@dataclass


class ShardConfig:
    manifest: str | None = None  # required: the JSONL line manifest to shard
    out_dir: str | None = None  # required: the shard dir to write (must not exist, unless overwrite)
    dataset_dir: str | None = None  # relative image paths resolve against it (as in training)
    # Lines per tar. 10,000 lines of ~115 KB are ~1 GB shards: large enough that an object store serves them at
    # full speed, small enough that a few shards spread over the loader workers.
    shard_size: int = 10_000
    on_bad_row: str = "skip"  # skip (and count) bad rows and image files | error: stop at the first
    max_text_bytes: int | None = DEFAULT_MAX_TEXT_BYTES
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS  # larger images are counted (too_large_image), not written
    scan_workers: int | None = None  # processes reading image headers; null: all CPUs
    overwrite: bool = False  # replace out_dir if it is a shard dir
    progress: bool = True


def _image_suffix(path: str) -> str:
    # The member's extension says what the bytes are (webdataset decodes by it); keys must hold no dot.
    suffix = Path(path).suffix.lower().lstrip(".")
    return suffix if suffix.isalnum() else "img"


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0  # mtime 0: the same manifest gives the same bytes
    tar.addfile(info, io.BytesIO(data))


def write_shards(manifest: str | Path, out_dir: str | Path, shard_size: int = 10_000, dataset_dir: str | None = None,
                 on_bad_row: str = "skip", max_text_bytes: int | None = DEFAULT_MAX_TEXT_BYTES,
                 max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, scan_workers: int | None = None,
                 overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Write the shard dir (into a staging dir renamed into place at the end) and return its summary."""
    if shard_size < 1:
        raise UsageError(f"shard_size must be >= 1, got {shard_size}")
    if on_bad_row not in ON_BAD_ROW_CHOICES:
        raise UsageError(f"on_bad_row={on_bad_row!r} is not one of {', '.join(ON_BAD_ROW_CHOICES)}")
    out = Path(os.path.abspath(os.path.expanduser(str(out_dir))))
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise UsageError(f"out_dir={out} already exists (overwrite=true replaces a shard dir)")
        if not out.is_dir() or out.is_symlink() or not (out / SHARDS_FILE).is_file():
            raise UsageError(f"out_dir={out} is not a shard dir (no {SHARDS_FILE}): not replacing it")
        problem = foreign_entries(out, "shard dir", _own_files(out))
        if problem:
            raise UsageError(f"out_dir={out} {problem}")
    table, report = load_line_table(manifest, dataset_dir, on_bad_row, max_text_bytes, max_pixels or 0,
                                    scan_workers=scan_workers, progress=progress)
    for reason in IMAGE_PROBLEM_REASONS:
        report.skipped.setdefault(reason, 0)

    def bad_image(index: int, reason: str) -> None:
        if on_bad_row == "error":
            raise ManifestError(f"{table.source(index)}: {reason} ({table.image_paths[index]})")
        report.skipped[reason] += 1
        report.rows_used -= 1
        report.first_bad.setdefault(reason, table.source(index))

    staging = out.parent / f".staging_{out.name}_{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        kept: list[int] = []
        locations: list[tuple[int, int, int]] = []
        shards: list[dict[str, Any]] = []
        tar: tarfile.TarFile | None = None
        names: list[str] = []
        bar = Progress(len(table), desc="shards", unit="line", enabled=progress)

        def close_shard() -> None:
            assert tar is not None
            tar.close()
            path = staging / shards[-1]["name"]
            # The data offsets as the tar itself records them (headers only are read): exact for any name length.
            with tarfile.open(path) as written:
                offsets = {m.name: (m.offset_data, m.size) for m in written.getmembers()}
            locations.extend((len(shards) - 1, *offsets[name]) for name in names)
            shards[-1].update(n_lines=len(names), bytes=path.stat().st_size)

        for index in range(len(table)):
            bar.update(1)
            width, height = (int(v) for v in table.sizes[index])
            if width < 0:
                bad_image(index, IMAGE_PROBLEMS[width])
                continue
            path = table.image_paths[index]
            try:
                with open_regular(path) as handle:
                    data = handle.read()
            except OSError:
                bad_image(index, "unreadable_image")
                continue
            if tar is None or len(names) == shard_size:
                if tar is not None:
                    close_shard()
                shards.append({"name": f"shard-{len(shards):06d}.tar"})
                tar = tarfile.open(staging / shards[-1]["name"], "w", format=tarfile.USTAR_FORMAT)
                names = []
            record = table[index]
            key = f"{len(kept):09d}"
            names.append(f"{key}.{_image_suffix(path)}")
            _member(tar, names[-1], data)
            meta = {"text": record.text, "sample_id": record.sample_id, "doc_id": record.doc_id,
                    "page_id": record.page_id, "line_id": record.line_id, "extra": dict(record.extra),
                    "width": width, "height": height, "image": path, "source": record.source}
            _member(tar, f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))
            kept.append(index)
        if tar is not None:
            close_shard()
        bar.close()
        if not kept:
            raise ManifestError(f"manifest {report.manifest} has no usable line to shard: {report.summary()}")
        rows = table.table.take(pa.array(kept, pa.int64()))
        where = np.array(locations, dtype=np.int64).reshape(-1, 3)
        index_table = pa.Table.from_arrays(
            [*rows.columns, pa.array(where[:, 0].astype(np.int32)), pa.array(where[:, 1]), pa.array(where[:, 2])],
            schema=INDEX_SCHEMA)
        with pa.OSFile(str(staging / INDEX_FILE), "wb") as sink, pa.ipc.new_file(sink, INDEX_SCHEMA) as writer:
            writer.write_table(index_table, max_chunksize=1 << 16)
        summary = {"format": SHARD_FORMAT, "version": SHARD_VERSION, "manifest": report.manifest,
                   "n_lines": len(kept), "shard_size": shard_size, "shards": shards, "report": report.to_dict()}
        (staging / SHARDS_FILE).write_text(json.dumps(summary, indent=1, ensure_ascii=False))
        if out.exists():
            shutil.rmtree(out)  # overwrite=true, and it is a shard dir (checked above)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("%s: %d lines in %d shards (%s)", out, len(kept), len(shards), report.summary())
    return summary


def _own_files(directory: Path) -> set[str] | None:
    """The files lineclip.shard wrote into a shard dir, by its shards.json; None when that is not one it wrote."""
    try:
        summary = read_summary(directory, check_files=False)
    except ManifestError:
        return None
    return {SHARDS_FILE, INDEX_FILE, *(shard["name"] for shard in summary["shards"])}


def build(cfg: DictConfig) -> dict[str, Any]:
    if not cfg.manifest:
        raise UsageError("manifest=... is required (the JSONL line manifest to shard)")
    if not cfg.out_dir:
        raise UsageError("out_dir=... is required (the shard dir to write)")
    summary = write_shards(cfg.manifest, cfg.out_dir, cfg.shard_size, cfg.dataset_dir, cfg.on_bad_row,
                           cfg.max_text_bytes, cfg.max_image_pixels, cfg.scan_workers, cfg.overwrite, cfg.progress)
    skipped = {k: v for k, v in summary["report"]["skipped"].items() if v}
    print(f"{cfg.out_dir}: {summary['n_lines']} lines in {len(summary['shards'])} shards"
          + (f"; skipped: {', '.join(f'{k}={v}' for k, v in skipped.items())}" if skipped else ""))
    return summary


register_configs()
ConfigStore.instance().store(name="shard_schema", node=ShardConfig)


@hydra_command("shard")


def main(cfg: DictConfig) -> None:
    run_command(build, cfg)


if __name__ == "__main__":
    main()
