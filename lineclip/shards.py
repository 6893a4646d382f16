"""A shard dir, as `lineclip.shard` writes it, and reading it: the lines as a LineTable whose images are read
from the tars by offset. Beside the manifest reader (lineclip.manifest, lineclip.sizes), in the domain layer: training
(lineclip.data) reads shards as it reads manifests, without reaching up into the command that writes them.

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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from lineclip.lines import TABLE_SCHEMA, LineTable, open_arrow_file, table_problem
from lineclip.manifest import ManifestError, ManifestReport
from lineclip.preprocess import decode_image, open_regular
from lineclip.sizes import IMAGE_PROBLEMS

log = logging.getLogger("lineclip.shard")  # the logger it had when the reader lived in lineclip.shard

SHARDS_FILE = "shards.json"
INDEX_FILE = "index.arrow"
SHARD_FORMAT = "lineclip-shards"
SHARD_VERSION = 1
IMAGE_PROBLEM_REASONS = tuple(IMAGE_PROBLEMS.values())
INDEX_SCHEMA = pa.schema([*TABLE_SCHEMA, pa.field("shard", pa.int32()), pa.field("offset", pa.int64()),
                          pa.field("nbytes", pa.int64())])


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


def read_summary(directory: Path, check_files: bool = True) -> dict[str, Any]:
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
        summary = read_summary(directory)
        try:
            table = open_arrow_file(directory / INDEX_FILE).read_all()
            if not table.schema.remove_metadata().equals(INDEX_SCHEMA) or len(table) != summary["n_lines"]:
                raise ValueError("its columns or line count do not match shards.json")
            where = np.stack([table.column(c).to_numpy().astype(np.int64) for c in ("shard", "offset", "nbytes")], 1)
            problem = _locations_problem(where, summary["shards"]) or table_problem(
                table.select(TABLE_SCHEMA.names), mapped=True)
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
