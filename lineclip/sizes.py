"""Line image sizes, read once: a parallel header scan with a progress bar, and the line cache that keeps a
manifest's validated lines and their sizes so that the next run starts without parsing or scanning.

The line cache is an Arrow IPC file, `.<manifest name>.lineclip-<key>.arrow` beside the manifest (or, where that
dir is not writable, in `<run dir>/line_cache/`): the manifest's usable rows as a LineTable, the image size of
every line, and the manifest report (bad rows per reason). It is keyed by what the rows depend on: the
manifest's path, size, modification time and a hash of its first and last 64 KiB, the dirs relative image paths
resolve against (dataset dir, working dir), `data.max_text_bytes`, `data.max_image_pixels` and the cache format;
a cache whose key matches is still checked like a shard index (lineclip.lines.table_problem) and against its row
counts. It is memory-mapped, not
read: every process (ranks and their loader workers) shares one copy in the page cache, and only the lines a
batch needs are ever touched. A cache whose key does not match, or that does not parse, is rebuilt.
What it cannot see: images replaced or deleted after it was written, without the manifest changing. Such a
line still fails safely when loaded (counted as corrupt_image); `data.line_cache=false` reads everything anew.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from lineclip.files import usable_cpus
from lineclip.lines import (
    TABLE_SCHEMA,
    LineTable,
    StringColumn,
    open_arrow_file,
    open_cached_table,
    release_mapped_pages,
    return_free_heap,
    table_problem,
)
from lineclip.manifest import (
    BAD_ROW_REASONS,
    ManifestReport,
    image_search_dirs,
    log_report,
    optional_path,
    read_line_table,
)
from lineclip.preprocess import TooManyPixels, header_size, open_regular

logger = logging.getLogger(__name__)

# Size codes below 0 (both width and height): why a line's image cannot be used, found from its header.
SIZE_UNKNOWN, SIZE_UNREADABLE, SIZE_EMPTY, SIZE_TOO_LARGE = -1, -2, -3, -4
IMAGE_PROBLEMS = {SIZE_UNREADABLE: "unreadable_image", SIZE_EMPTY: "empty_image", SIZE_TOO_LARGE: "too_large_image"}
CACHE_VERSION = 3  # 2: the key holds a hash of the manifest's first and last bytes; 3: texts of only
# invisible characters are empty_text (manifest.is_blank)
_ENDS_BYTES = 1 << 16  # bytes hashed at each end of the manifest for the key: its first and last rows
# Smaller manifests are read and scanned in about a second: no cache file for them (the bundled demo set's dir is
# inside the package, and a test's tmp dir should not collect caches either).
CACHE_MIN_ROWS = 10_000
SIZE_PROBE = 64  # manifest sizes checked against headers before they are trusted
_SCAN_CHUNK = 512  # paths per task of the process pool: large enough that pickling is noise
_PROCESS_SCAN_MIN = 20_000  # below this, threads: a process pool's start-up would cost more than it saves
_MEMO_FILES = 1 << 16  # image sizes remembered across chunks of lines (a dict of paths: ~15 MB at most)


def header_row(path: str, max_pixels: int | None) -> tuple[int, int]:
    """(width, height) as the model sees the image, or a size code (SIZE_UNREADABLE, SIZE_EMPTY: a zero-byte file
    or a zero width/height, what a degenerate OCR crop leaves; SIZE_TOO_LARGE: past `max_pixels`)."""
    size = header_size(path, max_pixels)  # the header only; FIFOs and devices are refused without reading
    if isinstance(size, TooManyPixels):
        return SIZE_TOO_LARGE, SIZE_TOO_LARGE
    if isinstance(size, BaseException):
        empty = os.path.isfile(path) and os.path.getsize(path) == 0
        return (SIZE_EMPTY, SIZE_EMPTY) if empty else (SIZE_UNREADABLE, SIZE_UNREADABLE)
    if min(size) <= 0:
        return SIZE_EMPTY, SIZE_EMPTY
    return size


def _scan_chunk(paths: list[str], max_pixels: int | None) -> np.ndarray:
    return np.array([header_row(path, max_pixels) for path in paths], dtype=np.int32).reshape(-1, 2)


def scan_sizes(paths: Sequence[str], max_pixels: int | None, workers: int | None = None,
               progress: bool = True, desc: str = "image headers", pool: Executor | None = None) -> np.ndarray:
    """[N, 2] int32 (width, height) or size codes, one header read per path. Header parsing is Python (PIL), so
    large scans use processes (`workers`, default: the usable CPUs; `pool`: one already started, for a scan in
    several calls); small ones threads, which overlap the I/O of a network file system. A tqdm bar shows the rate."""
    n = len(paths)
    workers = usable_cpus() if workers is None else max(1, workers)
    out = np.empty((n, 2), dtype=np.int32)
    with tqdm(total=n, desc=desc, unit="img", disable=not progress or n < 2048, mininterval=1.0) as bar:
        if workers > 1 and (n >= _PROCESS_SCAN_MIN or (pool is not None and n >= 4 * _SCAN_CHUNK)):
            starts = range(0, n, _SCAN_CHUNK)
            with contextlib.ExitStack() as stack:
                if pool is None:
                    pool = stack.enter_context(_process_pool(workers))
                chunks = ([paths[i] for i in range(start, min(n, start + _SCAN_CHUNK))] for start in starts)
                for start, sizes in zip(starts, pool.map(_scan_chunk, chunks, [max_pixels] * len(starts),
                                                           chunksize=4), strict=True):
                    out[start : start + len(sizes)] = sizes
                    bar.update(len(sizes))
        elif workers > 1 and n > 256:
            with ThreadPoolExecutor(max_workers=min(8, workers)) as threads:
                for i, size in enumerate(threads.map(lambda path: header_row(path, max_pixels), paths)):
                    out[i] = size
                    bar.update(1)
        else:
            for i, path in enumerate(paths):
                out[i] = header_row(path, max_pixels)
            bar.update(n)
    return out


def _process_pool(workers: int) -> ProcessPoolExecutor:
    # fork where there is one: the children need no import and no copy of anything but their paths.
    methods = multiprocessing.get_all_start_methods()
    return ProcessPoolExecutor(max_workers=workers,
                               mp_context=multiprocessing.get_context("fork" if "fork" in methods else None))


def _scan_unknown(paths: StringColumn, unknown: np.ndarray, sizes: np.ndarray, max_pixels: int | None,
                  workers: int | None, progress: bool) -> None:
    """sizes[unknown] from the image headers, one Arrow chunk of paths at a time: each distinct file of a chunk
    read once, and a memo of the last _MEMO_FILES files' sizes carries files shared by many lines (a page image
    listed once per line; the scale benchmark's 160 demo files) across chunks. What is held is one chunk's
    distinct paths as Python strings, whatever the number of lines; a memory-mapped table's pages are released
    as they are passed."""
    memo: dict[str, tuple[int, int]] = {}
    workers = usable_cpus() if workers is None else max(1, workers)
    with contextlib.ExitStack() as stack, tqdm(total=unknown.size, desc="image headers", unit="line",
                                               disable=not progress or unknown.size < 2048, mininterval=1.0) as bar:
        pool: Executor | None = None
        for chunk, begin in zip(paths.chunks, paths.starts[:-1].tolist(), strict=True):
            rows = unknown[np.searchsorted(unknown, begin) : np.searchsorted(unknown, begin + len(chunk))]
            if not rows.size:
                continue
            encoded = pc.dictionary_encode(chunk.take(pa.array(rows - begin)))
            distinct = encoded.dictionary.to_pylist()
            new = [path for path in distinct if path not in memo]
            if new and len(memo) + len(new) > _MEMO_FILES:
                memo.clear()
                new = distinct
            if len(new) >= 4 * _SCAN_CHUNK and workers > 1 and unknown.size >= _PROCESS_SCAN_MIN and pool is None:
                pool = stack.enter_context(_process_pool(workers))  # one pool for every chunk
            if new:
                memo.update(zip(new, map(tuple, scan_sizes(new, max_pixels, workers, progress=False, pool=pool)),
                                strict=True))
            found = np.array([memo[path] for path in distinct], dtype=np.int32).reshape(-1, 2)
            sizes[rows] = found[encoded.indices.to_numpy(zero_copy_only=False)]
            bar.update(rows.size)
            if paths.mapped:
                for buffer in chunk.buffers():
                    if buffer is not None:
                        release_mapped_pages(buffer)


def complete_sizes(table: LineTable, max_pixels: int | None, workers: int | None = None,
                   progress: bool = True) -> LineTable:
    """The table with every unknown size read from its header. Sizes the manifest gave (`width`/`height`) are
    used when a probe of up to SIZE_PROBE of them, spread over the manifest, matches the headers exactly (some
    exports write the size of a resized copy there: then every header is read); a line whose file does not
    match its size is found when it is loaded and counted as corrupt_image, never fatal."""
    sizes = table.sizes.copy()
    paths = table.image_paths
    given = np.flatnonzero(sizes[:, 0] > 0)
    if given.size and not table.sizes_checked:
        probe = np.unique(given[np.linspace(0, given.size - 1, min(SIZE_PROBE, given.size)).astype(np.int64)])
        found = scan_sizes(_Picked(paths, probe), max_pixels, workers, progress=False)
        wrong = np.flatnonzero((found != sizes[probe]).any(axis=1))
        if wrong.size:
            i = int(probe[wrong[0]])
            logger.warning("%s: the manifest's width/height are not the image sizes (line %s: %dx%d, its header: "
                           "%dx%d); reading every image header instead", table.manifest or "lines", table.source(i),
                           *sizes[i], *found[wrong[0]])
            sizes[given] = SIZE_UNKNOWN
    given = sizes[:, 0] > 0
    if max_pixels:
        sizes[given & (sizes[:, 0].astype(np.int64) * sizes[:, 1] > max_pixels)] = SIZE_TOO_LARGE
    unknown = np.flatnonzero(sizes[:, 0] == SIZE_UNKNOWN)
    if unknown.size:
        # Each distinct file once (per chunk, and a memo across chunks): lines cut from one image file share its
        # header (a dataset that lists a page image once per line; and the scale benchmark's repeated demo files).
        _scan_unknown(paths, unknown, sizes, max_pixels, workers, progress)
    if table.sizes_checked and np.array_equal(sizes, table.sizes):
        return table  # nothing changed: keep the memory-mapped table as it is
    return table.with_sizes(sizes)


class _Picked(Sequence[str]):
    """paths[indices[i]] without building the whole list."""

    def __init__(self, paths: Sequence[str], indices: np.ndarray) -> None:
        self.paths, self.indices = paths, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> str:  # type: ignore[override]
        return self.paths[int(self.indices[i])]


def cache_key(manifest: Path, dataset_dir: str | None, max_text_bytes: int | None,
              max_pixels: int | None) -> dict[str, Any]:
    """What a cached table depends on; any change makes the cache stale."""
    stat = manifest.stat()
    return {"version": CACHE_VERSION, "manifest": str(manifest), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "ends_sha256": _ends_digest(manifest, stat.st_size),
            "resolve_dirs": image_search_dirs(manifest, optional_path(dataset_dir)), "max_text_bytes": max_text_bytes,
            "max_image_pixels": max_pixels}


def _ends_digest(manifest: Path, size: int) -> str:
    """A hash of the manifest's first and last 64 KiB (its first and last rows): a manifest edited there keeps
    neither its cache, even where the edit kept its size and mtime (`cp -p`, `rsync -t`, a clock reset). The rows
    in between are not read: that would cost the full read the cache exists to avoid (README, Security)."""
    digest = hashlib.sha256()
    with open_regular(manifest) as handle:
        digest.update(handle.read(_ENDS_BYTES))
        if size > _ENDS_BYTES:
            handle.seek(max(_ENDS_BYTES, size - _ENDS_BYTES))
            digest.update(handle.read(_ENDS_BYTES))
    return digest.hexdigest()


def cache_name(manifest: Path, key: dict[str, Any]) -> str:
    # Everything but size and mtime goes into the name, so a run with another dataset_dir keeps its own cache
    # instead of rebuilding the other's; an edited manifest replaces its file.
    stable = {k: v for k, v in key.items() if k not in ("size", "mtime_ns", "ends_sha256")}
    digest = hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest()[:12]
    return f".{manifest.name}.lineclip-{digest}.arrow"


def read_cache(path: Path, key: dict[str, Any]) -> tuple[LineTable, ManifestReport] | None:
    """The cached table and report when `path` holds a cache of exactly `key`, else None (missing, stale or not a
    cache: it is data like the manifest, checked rather than trusted)."""
    if not os.path.lexists(path):
        return None
    try:
        reader = open_arrow_file(path)  # a FIFO or device is refused, not waited on
        meta = json.loads((reader.schema.metadata or {}).get(b"lineclip", b"{}"))
        if not isinstance(meta, dict) or meta.get("key") != key:
            logger.info("line cache %s is stale (the manifest or the settings changed); rebuilding it", path)
            return None
        table = reader.read_all()
        if not table.schema.remove_metadata().equals(TABLE_SCHEMA):
            raise ValueError("unexpected columns")
        report = ManifestReport(**meta["report"])
        skipped = report.skipped
        if (set(skipped) != set(BAD_ROW_REASONS) or not all(type(v) is int and v >= 0 for v in skipped.values())
                or report.rows_used != len(table) or report.rows_total != report.rows_used + sum(skipped.values())):
            raise ValueError("its row counts do not match its table")
        line_nos = table.column("line_no").to_numpy()
        if len(line_nos) and (line_nos[0] < 1 or (np.diff(line_nos) <= 0).any()):
            raise ValueError("its line numbers are not the manifest's, in order")
        problem = table_problem(table, tuple(IMAGE_PROBLEMS), mapped=True)
        if problem:
            raise ValueError(problem)
    except (OSError, ValueError, TypeError, KeyError, RecursionError, pa.ArrowException) as exc:
        logger.warning("ignoring line cache %s (%s); rebuilding it", path, " ".join(f"{exc}".split())[:300])
        return None
    # sizes_checked: the cache holds the sizes its build read from the headers (or checked), final as they are
    return LineTable(table, key["manifest"], cache_path=str(path), sizes_checked=True), report


def write_cache(table: LineTable, report: ManifestReport, key: dict[str, Any], dirs: Sequence[Path]) -> Path | None:
    """Write the cache into the first dir that takes it (temporary name, then an atomic rename, so a reader never
    sees half a file); None when none does. Written a batch at a time; where the table's string columns are a
    memory-mapped file (a spilled parse), their pages are released once written, so writing 10M lines does not
    leave the whole file in this process's resident set."""
    name = cache_name(Path(key["manifest"]), key)
    schema = TABLE_SCHEMA.with_metadata({"lineclip": json.dumps({"key": key, "report": report.to_dict()})})
    mapped = [TABLE_SCHEMA.get_field_index(field) for field, column in table.columns.items() if column.mapped]
    for directory in dirs:
        tmp = None
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f"{name}.", suffix=".tmp", dir=directory)
            os.close(fd)
            with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
                for batch in table.table.replace_schema_metadata(None).to_batches(max_chunksize=1 << 16):
                    writer.write_batch(batch)
                    for i in mapped:  # only those: releasing heap memory (the new sizes) would lose it
                        for buffer in batch.column(i).buffers():
                            if buffer is not None:
                                release_mapped_pages(buffer)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # readable like the manifest (mkstemp's 0600 would hide it from others)
            os.replace(tmp, directory / name)
            return directory / name
        except OSError as exc:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            logger.info("cannot write the line cache into %s (%s)", directory, exc)
    return None


def _writable_dir(dirs: Sequence[Path]) -> Path | None:
    """The first of `dirs` that takes a file (where the parse is spilled and the cache then written)."""
    for directory in dirs:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".lineclip-probe.", suffix=".tmp", dir=directory)
            os.close(fd)
            os.unlink(probe)
            return directory
        except OSError:
            continue
    return None


def load_line_table(manifest: str | Path, dataset_dir: str | None = None, on_bad_row: str = "skip",
                    max_text_bytes: int | None = None, max_pixels: int | None = None,
                    fallback_dir: str | Path | None = None, use_cache: bool = True, cache_dir: str | None = None,
                    scan_workers: int | None = None, progress: bool = True,
                    cache_min_rows: int = CACHE_MIN_ROWS,
                    timings: dict[str, float] | None = None) -> tuple[LineTable, ManifestReport]:
    """A manifest's lines with every image size known: from the line cache when it matches, else parsed and
    scanned, then cached (beside the manifest, else in `cache_dir`, else `fallback_dir`, e.g. the run dir).
    In `on_bad_row="error"` mode a cache that counted bad rows is not enough: the manifest is read again so that
    the error names the row. A parse that will be cached is streamed into a temporary file in the cache's dir
    (lineclip.manifest.read_line_table's `spill_dir`), so its memory does not grow with the number of rows.
    `timings`: seconds per phase ("cache read"; or "parse", "header scan", "cache write") are added to it."""
    clock = _Clock(timings)
    path = Path(os.path.abspath(os.path.expanduser(str(manifest))))
    dirs = [Path(cache_dir)] if cache_dir else [path.parent]
    if fallback_dir is not None:
        dirs.append(Path(fallback_dir) / "line_cache")
    key = cache_key(path, dataset_dir, max_text_bytes, max_pixels) if use_cache and path.is_file() else None
    if key is not None:
        for directory in dirs:
            cached = read_cache(directory / cache_name(path, key), key)
            if cached is not None and not (on_bad_row == "error" and cached[1].rows_skipped):
                logger.info("lines and image sizes of %s from the line cache %s", path.name,
                            directory / cache_name(path, key))
                log_report(cached[1])
                clock.lap("cache read")
                return cached
    clock.last = time.perf_counter()  # a miss: the check is part of no phase
    workers = usable_cpus() if scan_workers is None else scan_workers
    spill_dir = _writable_dir(dirs) if key is not None else None
    table, report = read_line_table(path, dataset_dir, on_bad_row, max_text_bytes, workers, spill_dir=spill_dir,
                                    spill_min_rows=cache_min_rows)
    clock.lap("parse")
    table = complete_sizes(table, max_pixels, scan_workers, progress)
    clock.lap("header scan")
    if key is None or report.rows_total < cache_min_rows:
        return table, report
    order = [spill_dir, *(d for d in dirs if d != spill_dir)] if spill_dir is not None else dirs
    written = write_cache(table, report, key, order)
    clock.lap("cache write")
    if written is None:
        logger.warning("no writable dir for the line cache of %s: the next run reads and scans it again", path.name)
        return table, report
    logger.info("line cache written: %s", written)
    del table
    return_free_heap()  # the parsed copy (the mapped file replaces it), the parse's Python objects and arrays
    return open_cached_table(str(written), str(path)), report


class _Clock:
    """Seconds between laps, added up per phase into `timings` (when given)."""

    def __init__(self, timings: dict[str, float] | None) -> None:
        self.timings, self.last = timings, time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        if self.timings is not None:
            self.timings[phase] = self.timings.get(phase, 0.0) + now - self.last
        self.last = now


def main_first(is_main: bool, wait_for_everyone: Callable[[], None], load: Callable[[], Any]) -> Any:
    """`load()` on the main process first, then on the others (which then find its cache). An error on the main
    process still reaches the barrier, so the others are not left waiting: they load, and fail, themselves."""
    if not is_main:
        wait_for_everyone()
        return load()
    try:
        result = load()
    except BaseException:
        wait_for_everyone()
        raise
    wait_for_everyone()
    return result

