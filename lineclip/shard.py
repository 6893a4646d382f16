"""`python -m lineclip.shard manifest=M out_dir=D shard_size=N`: a manifest's lines as tar shards, and reading them.

A shard dir holds
- `shard-000000.tar`, ...: webdataset-style tars (plain POSIX tar, no compression), per line two members with the
  same key (the line's index in the shard set, `000000042`): the image file's bytes as they were
  (`000000042.jpg`) and `000000042.json` with `text`, `sample_id`, `doc_id`, `page_id`, `line_id`, `extra`,
  `width`, `height` (as the model sees the image), `image` and `source` (the original path and manifest row).
  Any tar reader, webdataset included, can stream them.
- `index.arrow`: per line the same fields as a LineTable (Arrow IPC, memory-mapped when read) plus where its image
  bytes are: `shard`, `offset`, `nbytes` (tar data offsets recorded when the shard was written).
- `shards.json`, written last: the format, the shards with their line counts and byte sizes, and the manifest
  report (bad rows per reason, and the bad image files found while sharding: unreadable, empty, too large).

Training (`data.format=shards data.train_shards=D`) reads the index, not the tars, so it starts without a manifest
parse or a header scan, and then reads each line's bytes by offset: random access, so the bucketed sampler, its
resume position and the bad-sample counting are exactly those of manifest training (same lines in the same order:
the same batches). webdataset itself streams shards in order with a shuffle buffer; bucketing by width and an exact
resume position need random access, which the recorded offsets give in a few lines.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import shutil
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig
from PIL import Image

from lineclip.cli import Progress, UsageError, hydra_command, run_command
from lineclip.config import register_configs
from lineclip.files import foreign_entries
from lineclip.lines import TABLE_SCHEMA, LineTable, open_arrow_file, table_problem
from lineclip.manifest import DEFAULT_MAX_TEXT_BYTES, ON_BAD_ROW_CHOICES, ManifestError, ManifestReport
from lineclip.preprocess import DEFAULT_MAX_IMAGE_PIXELS, decode_image, open_regular
from lineclip.sizes import IMAGE_PROBLEMS, load_line_table

log = logging.getLogger(__name__)

SHARDS_FILE = "shards.json"
INDEX_FILE = "index.arrow"
SHARD_FORMAT = "lineclip-shards"
SHARD_VERSION = 1
IMAGE_PROBLEM_REASONS = tuple(IMAGE_PROBLEMS.values())
INDEX_SCHEMA = pa.schema([*TABLE_SCHEMA, pa.field("shard", pa.int32()), pa.field("offset", pa.int64()),
                          pa.field("nbytes", pa.int64())])


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


class ShardImages:
    """The image bytes of shard lines, read by offset (`os.pread` on one descriptor per shard and process)."""

    def __init__(self, shard_paths: Sequence[str], locations: np.ndarray) -> None:
        self.shard_paths = list(shard_paths)
        self.locations = locations  # [N, 4] int64: shard, offset, nbytes, the line's key in its shard dir
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def read(self, index: int) -> bytes:
        """The image bytes of line `index`. The tar header just before them is read too and must name this line's
        member (its key, then the image suffix) with this size: an index whose offset points at another line's
        member fails here (OSError: the line is counted as corrupt) instead of training on the wrong image."""
        shard, offset, nbytes, key = (int(v) for v in self.locations[index])
        if self._pid != os.getpid():  # a forked loader worker: its own descriptors
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            with open_regular(self.shard_paths[shard]) as handle:
                fd = os.dup(handle.fileno())
            self._fds[shard] = fd
        block = os.pread(fd, 512 + nbytes, offset - 512)
        header, data = block[:512], block[512:]
        if len(data) != nbytes:
            raise OSError(f"{self.shard_paths[shard]}: {len(data)} of {nbytes} bytes at offset {offset} (truncated)")
        name = header[:100].split(b"\0", 1)[0]
        try:
            size = int(header[124:136].split(b"\0", 1)[0].strip() or b"-1", 8)
        except ValueError:
            size = -1
        if not name.startswith(f"{key:09d}.".encode()) or name.endswith(b".json") or size != nbytes:
            raise OSError(f"{self.shard_paths[shard]}@{offset}: the member there is {name[:40]!r} of {size} bytes, "
                          f"not line {key:09d}'s image of {nbytes} bytes (a damaged index)")
        return data

    def load(self, index: int, max_pixels: int | None) -> Image.Image:
        """The line image decoded as lineclip.preprocess.load_image decodes a file (EXIF orientation, pixel limit)."""
        shard, offset = (int(v) for v in self.locations[index][:2])
        return decode_image(io.BytesIO(self.read(index)), max_pixels, f"{self.shard_paths[shard]}@{offset}")

    def __getstate__(self) -> dict[str, Any]:
        return {"shard_paths": self.shard_paths, "locations": self.locations}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["shard_paths"], state["locations"])


class _ShardSources(Sequence[str]):
    """`manifest:line` of each line of several shard dirs, built on demand."""

    def __init__(self, manifests: list[str], part: np.ndarray, line_nos: np.ndarray) -> None:
        self.manifests, self.part, self.line_nos = manifests, part, line_nos

    def __len__(self) -> int:
        return len(self.part)

    def __getitem__(self, index: int) -> str:  # type: ignore[override]
        return f"{self.manifests[int(self.part[index])]}:{int(self.line_nos[index])}"


def shard_dirs(spec: str) -> list[Path]:
    """The shard dirs a `data.*_shards` value names: a shard dir, its shards.json, or a glob of either."""
    matches = sorted(glob.glob(os.path.expanduser(spec))) if glob.has_magic(spec) else [os.path.expanduser(spec)]
    dirs = [Path(m).parent if Path(m).name == SHARDS_FILE else Path(m) for m in matches]
    dirs = [d for d in dirs if (d / SHARDS_FILE).is_file()]
    if not dirs:
        raise ManifestError(f"{spec}: no shard dir (a dir with {SHARDS_FILE}, written by lineclip.shard)")
    return list(dict.fromkeys(dirs))


def _own_files(directory: Path) -> set[str] | None:
    """The files lineclip.shard wrote into a shard dir, by its shards.json; None when that is not one it wrote."""
    try:
        summary = _read_summary(directory, check_files=False)
    except ManifestError:
        return None
    return {SHARDS_FILE, INDEX_FILE, *(shard["name"] for shard in summary["shards"])}


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _summary_problem(summary: Any) -> str | None:
    """What makes a shards.json other than what write_shards writes, or None (types and ranges of every field
    that reading uses: a file is data, checked rather than trusted)."""
    if not isinstance(summary, dict):
        return f"not a JSON object (a JSON {type(summary).__name__})"
    if summary.get("format") != SHARD_FORMAT or summary.get("version") != SHARD_VERSION:
        return f"not a {SHARD_FORMAT} v{SHARD_VERSION} summary"
    for key, test, kind in (("manifest", lambda v: isinstance(v, str), "a string"), ("n_lines", _count, "a count"),
                            ("shards", lambda v: isinstance(v, list), "a list"),
                            ("report", lambda v: isinstance(v, dict), "a JSON object")):
        if not test(summary.get(key)):
            return f"{key} is missing or not {kind}"
    names = set()
    for i, shard in enumerate(summary["shards"]):
        if not isinstance(shard, dict) or not isinstance(shard.get("name"), str):
            return f"shards[{i}] has no name"
        name = shard["name"]
        if Path(name).name != name or name in (".", "..", SHARDS_FILE, INDEX_FILE) or name in names:
            return f"shards[{i}] name {name[:80]!r} is not a shard file of this dir"
        names.add(name)
        if not _count(shard.get("n_lines")) or not _count(shard.get("bytes")):
            return f"shard {name}: n_lines and bytes must be counts (integers >= 0)"
    if sum(shard["n_lines"] for shard in summary["shards"]) != summary["n_lines"]:
        return "the shards' n_lines do not add up to n_lines"
    report = summary["report"]
    if not _count(report.get("rows_total")):
        return "report.rows_total is not a count"
    for key, kind in (("skipped", _count), ("first_bad", lambda v: isinstance(v, str))):
        table = report.get(key)
        if not isinstance(table, dict) or not all(kind(v) for v in table.values()):
            return f"report.{key} is not a JSON object of {'counts' if key == 'skipped' else 'strings'}"
    return None


def _read_summary(directory: Path, check_files: bool = True) -> dict[str, Any]:
    path = directory / SHARDS_FILE
    try:
        with open_regular(path) as handle:  # a FIFO would block the read
            summary = json.loads(handle.read().decode("utf-8"))
        problem = _summary_problem(summary)
        if problem:
            raise ValueError(problem)
        for shard in summary["shards"] if check_files else ():
            shard_path = directory / shard["name"]
            if not shard_path.is_file():
                raise ValueError(f"shard {shard['name']} is missing")
            if shard_path.stat().st_size != shard["bytes"]:
                raise ValueError(f"shard {shard['name']} has {shard_path.stat().st_size} bytes, shards.json says "
                                 f"{shard['bytes']} (cut short or replaced)")
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: JSON nested too deep for Python
        reason = f"{type(exc).__name__}: {exc}" if isinstance(exc, RecursionError) else str(exc)
        raise ManifestError(f"{path}: {' '.join(reason.split())}") from None
    return summary


def _locations_problem(where: np.ndarray, shards: list[dict[str, Any]]) -> str | None:
    """What is wrong with an index's (shard, offset, nbytes) rows, or None: each line's data must lie inside its
    shard at a tar block boundary after its header, and the lines must follow each other through the shards in
    order without overlapping (write_shards writes them so), so that no line can point at another's member."""
    if not len(where):
        return None
    shard, offset, nbytes = where[:, 0], where[:, 1], where[:, 2]
    if shard.min() < 0 or shard.max() >= len(shards):
        return f"row {int(np.flatnonzero((shard < 0) | (shard >= len(shards)))[0])}: points at no shard"
    sizes = np.array([s["bytes"] for s in shards], dtype=np.int64)[shard]
    bad = (offset < 512) | (offset % 512 != 0) | (nbytes < 0) | (offset + nbytes > sizes)
    if bad.any():
        return f"row {int(np.flatnonzero(bad)[0])}: offset/nbytes outside its shard's members"
    # In order: shard never decreases; within a shard each line starts after the previous one's data and its
    # JSON member (at least a header block each).
    same = shard[1:] == shard[:-1]
    out_of_order = (shard[1:] < shard[:-1]) | (same & (offset[1:] < offset[:-1] + nbytes[:-1] + 2 * 512))
    if out_of_order.any():
        return f"row {int(np.flatnonzero(out_of_order)[0]) + 1}: its offset is not after the previous line's members"
    return None


def load_shards(spec: str, on_bad_row: str = "skip") -> tuple[LineTable, ManifestReport]:
    """The lines of the shard dirs `spec` names, as a LineTable whose images are read from the tars, with the
    report of what was skipped when they were written (summed over the dirs)."""
    tables, locations, manifests, parts, paths = [], [], [], [], []
    report = ManifestReport(manifest=spec)
    report.skipped.update(dict.fromkeys(IMAGE_PROBLEM_REASONS, 0))
    for part, directory in enumerate(shard_dirs(spec)):
        summary = _read_summary(directory)
        try:
            table = open_arrow_file(directory / INDEX_FILE).read_all()
            if not table.schema.remove_metadata().equals(INDEX_SCHEMA) or len(table) != summary["n_lines"]:
                raise ValueError("its columns or line count do not match shards.json")
            where = np.stack([table.column(c).to_numpy().astype(np.int64) for c in ("shard", "offset", "nbytes")], 1)
            problem = _locations_problem(where, summary["shards"]) or table_problem(table.select(TABLE_SCHEMA.names))
            if problem:
                raise ValueError(problem)
        except (OSError, ValueError, pa.ArrowException) as exc:
            raise ManifestError(f"{directory / INDEX_FILE}: {' '.join(str(exc).split())}") from None
        # Per line its key in the dir (its row): the member at its offset must carry it (ShardImages.read).
        where = np.concatenate([where, np.arange(len(where), dtype=np.int64)[:, None]], axis=1)
        where[:, 0] += len(paths)
        paths += [str(directory / shard["name"]) for shard in summary["shards"]]
        tables.append(table.select(TABLE_SCHEMA.names))
        locations.append(where)
        manifests.append(summary["manifest"])
        parts.append(np.full(len(table), part, dtype=np.int32))
        written = summary["report"]
        report.rows_total += written["rows_total"]
        report.rows_used += len(table)
        for reason, count in written["skipped"].items():
            report.skipped[reason] = report.skipped.get(reason, 0) + count
        for reason, where_bad in written["first_bad"].items():
            report.first_bad.setdefault(reason, where_bad)
    if on_bad_row == "error" and report.rows_skipped:
        raise ManifestError(f"{spec}: these shards were written skipping {report.rows_skipped} bad rows or images "
                            f"({report.summary()}); data.on_bad_row=error wants none")
    table = pa.concat_tables(tables)
    line_nos = table.column("line_no").to_numpy()
    sources = _ShardSources(manifests, np.concatenate(parts), line_nos) if len(manifests) > 1 else None
    lines = LineTable(table, manifests[0], sources, sizes_checked=True,
                      images=ShardImages(paths, np.concatenate(locations)))
    log.info("%s: %d lines in %d shards", spec, len(lines), len(paths))
    return lines, report


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
