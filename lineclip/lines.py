"""A manifest's lines as the rest of lineclip sees them: `LineRecord` (one line image and its transcription, ids
and extra fields) and `LineTable`, the lines of a whole manifest as columns.

A LineTable holds its strings as Arrow columns (one bytes buffer plus offsets each) and sizes as int arrays,
memory-mapped when it comes from the line cache (lineclip.sizes), so a million lines cost a few bytes of Python
objects and DataLoader workers share the pages instead of copying them; ``table[i]`` builds one LineRecord on
demand. Reading manifests into tables is lineclip.manifest's job; shards build them from their index.
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import stat
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


class FrozenStrMap(Mapping[str, str]):
    """A small immutable, hashable, picklable ``str -> str`` mapping for ``LineRecord.extra``.

    ``types.MappingProxyType`` would be immutable too, but it cannot be pickled, and records travel to
    DataLoader workers by pickle under the ``spawn`` start method (macOS, Windows).
    """

    __slots__ = ("_data",)

    def __init__(self, items: Mapping[str, str] | None = None) -> None:
        self._data: dict[str, str] = dict(items or {})

    def __getitem__(self, key: str) -> str:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return hash(frozenset(self._data.items()))

    def __repr__(self) -> str:
        return f"FrozenStrMap({self._data!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (FrozenStrMap, (self._data,))


@dataclass(frozen=True)
class LineRecord:
    """One usable manifest row. ``image_path`` is absolute and normalised; ``text`` is normalised."""

    sample_id: str
    image_path: str
    text: str
    doc_id: str = ""
    page_id: str = ""
    line_id: str = ""
    source: str = ""
    extra: Mapping[str, str] = field(default_factory=FrozenStrMap)

    def __post_init__(self) -> None:
        # Callers may pass a plain dict; store a frozen copy so the record stays immutable and hashable.
        if not isinstance(self.extra, FrozenStrMap):
            object.__setattr__(self, "extra", FrozenStrMap(self.extra))


STRING_COLUMNS = ("sample_id", "image_path", "text", "doc_id", "page_id", "line_id", "extra")
TABLE_SCHEMA = pa.schema([*(pa.field(name, pa.string()) for name in STRING_COLUMNS),
                          pa.field("line_no", pa.int64()), pa.field("width", pa.int32()),
                          pa.field("height", pa.int32())])


def release_mapped_pages(buffer: pa.Buffer) -> None:
    """Drop the pages of a buffer of a read-only file mapping from this process's resident set (madvise
    MADV_DONTNEED): they stay in the page cache and fault back in if read again, so nothing is lost, but they no
    longer count in this process's RSS. Only for memory-mapped files: on heap memory it would discard data.
    A no-op where the call is not available."""
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if advice is None or not sys.platform.startswith("linux") or buffer.size == 0:
        return
    page = mmap.PAGESIZE
    start = buffer.address // page * page
    end = -(-(buffer.address + buffer.size) // page) * page
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), ctypes.c_int(advice))


def return_free_heap() -> None:
    """Give the free pages of Arrow's memory pool and of the C heap (glibc's malloc_trim) back to the system. After
    a phase that built and freed many per-line temporaries (a parse, the cache checks, the bucketing), both
    allocators keep the freed memory for reuse and it still counts in the resident set (at 10M lines, hundreds of
    MB), which the loader workers forked next would share too. malloc_trim is skipped where glibc is not the
    allocator."""
    pa.default_memory_pool().release_unused()
    if not sys.platform.startswith("linux"):
        return
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except AttributeError:  # musl and other C libraries have no malloc_trim
        return
    trim(ctypes.c_size_t(0))


class StringColumn(Sequence[str]):
    """One string column of a LineTable, indexable like a list; an item becomes a Python str only when asked."""

    def __init__(self, column: pa.ChunkedArray, mapped: bool = False) -> None:
        self.chunks = [chunk for chunk in column.chunks if len(chunk)] or [pa.array([], pa.string())]
        self.starts = np.cumsum([0] + [len(chunk) for chunk in self.chunks])
        self.mapped = mapped  # its buffers are a read-only memory-mapped file (the line cache)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: int) -> str:  # type: ignore[override]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        chunk = int(np.searchsorted(self.starts, index, side="right")) - 1
        return self.chunks[chunk][index - int(self.starts[chunk])].as_py()

    def cut_lengths(self, budget: int) -> np.ndarray:
        """Per item its UTF-8 length cut to at most `budget` bytes at a character boundary (what
        batch.cut_at_char_boundary gives), read from the offsets and at most 3 bytes per cut item."""
        out = []
        for chunk in self.chunks:
            chunk = pa.array(chunk, pa.string())  # a slice keeps its buffers; offsets are then relative
            offsets = np.frombuffer(chunk.buffers()[1], dtype=np.int32)[chunk.offset : chunk.offset + len(chunk) + 1]
            data = np.frombuffer(chunk.buffers()[2], dtype=np.uint8) if chunk.buffers()[2] is not None else \
                np.zeros(0, np.uint8)
            lengths = np.diff(offsets).astype(np.int64)
            cut = np.minimum(lengths, budget)
            over = np.flatnonzero(lengths > budget)
            # data[start + end] is the first byte dropped; while it is a continuation byte (10xxxxxx), back up.
            end = np.full(over.size, budget, dtype=np.int64)
            moving = np.ones(over.size, dtype=bool)
            for _ in range(3):  # valid UTF-8: at most 3 continuation bytes in a row
                moving &= end > 0
                at = offsets[over].astype(np.int64) + end
                moving &= (data[np.where(moving, at, 0)] & 0xC0) == 0x80
                end -= moving
            cut[over] = end
            out.append(cut)
            if self.mapped and chunk.buffers()[2] is not None:
                # The cut points touched nearly every page of the texts; the process needs none of them now.
                release_mapped_pages(chunk.buffers()[2])
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def byte_lengths(self) -> np.ndarray:
        """Per item its UTF-8 length, from the offsets alone (no string is built)."""
        return np.concatenate([pc.binary_length(chunk).to_numpy(zero_copy_only=False).astype(np.int64)
                               for chunk in self.chunks])

    def release_pages(self) -> None:
        """Where the column is a memory-mapped file, drop its pages from this process's resident set."""
        if self.mapped:
            _release_chunks(self.chunks)


def _release_chunks(chunks: Iterable[pa.Array]) -> None:
    for chunk in chunks:
        for buffer in chunk.buffers():
            if buffer is not None:
                release_mapped_pages(buffer)


class LineTable(Sequence[LineRecord]):
    """The usable rows of a manifest as columns (an Arrow table, memory-mapped when it comes from the line
    cache), with per line the image size from its header or the manifest (`width`/`height`; -1: not known
    yet). ``table[i]`` builds the LineRecord of line i on demand; nothing per line lives as a Python object.

    Sizes below 0 mark images that cannot be used (lineclip.sizes): -1 not read yet, -2 unreadable header,
    -3 empty file, -4 more pixels than the limit.
    """

    def __init__(self, table: pa.Table, manifest: str = "", sources: Sequence[str] | None = None,
                 cache_path: str | None = None, sizes_checked: bool = False, images: Any = None) -> None:
        self.table = table.select(list(TABLE_SCHEMA.names))
        self.manifest = manifest
        self.sources = sources  # per line, when the lines come from records rather than one manifest
        self.cache_path = cache_path  # the memory-mapped file the table lives in, if any
        # True when every size is final (read from headers, or manifest sizes checked against them): the line
        # cache and shards; complete_sizes then only applies the pixel limit.
        self.sizes_checked = sizes_checked
        # Where the image bytes are when not at image_path: lineclip.shards.ShardImages for lines read from shards.
        self.images = images
        self.columns = {name: StringColumn(self.table.column(name), mapped=cache_path is not None)
                        for name in STRING_COLUMNS}
        # Line numbers stay in the table (memory-mapped from a cache), read one at a time by source(): an array of
        # them would be 8 bytes a line of private memory (80 MB at 10M lines) for error messages.
        self.line_nos = self.table.column("line_no")
        # Sizes are read all the time (buckets, pixel limits): one int32 array, filled a chunk at a time (a whole
        # column's to_numpy would first concatenate the chunks into a copy of its own).
        self.sizes = np.empty((len(self.table), 2), np.int32)
        for col, name in enumerate(("width", "height")):
            start = 0
            for chunk in self.table.column(name).chunks:
                self.sizes[start : start + len(chunk), col] = chunk.to_numpy(zero_copy_only=False)
                start += len(chunk)

    @classmethod
    def from_records(cls, records: Sequence[LineRecord]) -> LineTable:
        columns = {name: [getattr(r, name) for r in records] for name in STRING_COLUMNS if name != "extra"}
        columns["extra"] = [json.dumps(dict(r.extra), ensure_ascii=False) if r.extra else "" for r in records]
        table = pa.table({**columns, "line_no": pa.array(np.full(len(records), -1, np.int64)),
                          "width": pa.array(np.full(len(records), -1, np.int32)),
                          "height": pa.array(np.full(len(records), -1, np.int32))}, schema=TABLE_SCHEMA)
        return cls(table, sources=[r.source for r in records])

    @classmethod
    def empty(cls) -> LineTable:
        return cls(TABLE_SCHEMA.empty_table())

    @property
    def texts(self) -> StringColumn:
        return self.columns["text"]

    @property
    def image_paths(self) -> StringColumn:
        return self.columns["image_path"]

    def source(self, index: int) -> str:
        if self.sources is not None:
            return self.sources[index]
        return f"{self.manifest}:{self.line_nos[index].as_py()}"

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> LineRecord:  # type: ignore[override]
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"LineTable indices are ints, got {type(index).__name__}")
        index = int(index)
        if index < 0:
            index += len(self)
        get = {name: column[index] for name, column in self.columns.items()}
        extra = get.pop("extra")
        return LineRecord(**get, source=self.source(index),
                          extra=FrozenStrMap(json.loads(extra)) if extra else FrozenStrMap())

    def __iter__(self) -> Iterator[LineRecord]:
        for index in range(len(self)):
            yield self[index]

    def release_pages(self) -> None:
        """Drop the pages of the line cache file this process has read from its resident set (they stay in the page
        cache and are read back when needed). The start-up's passes over whole columns (text lengths, sizes) touch
        hundreds of MB of them at 10M lines, which would otherwise count in this process until it ends and in
        every loader worker forked from it. Only the mapped columns: a column replaced in memory (with_sizes) is
        never released."""
        for column in self.columns.values():
            column.release_pages()
        if self.cache_path is not None:  # every column is the file's (with_sizes returns a table without cache_path)
            for name in ("line_no", "width", "height"):
                _release_chunks(self.table.column(name).chunks)

    def with_sizes(self, sizes: np.ndarray) -> LineTable:
        """The same lines with these (width, height) rows (what the header scan found)."""
        sizes = np.asarray(sizes, dtype=np.int32)
        table = self.table.set_column(TABLE_SCHEMA.get_field_index("width"), "width", pa.array(sizes[:, 0]))
        table = table.set_column(TABLE_SCHEMA.get_field_index("height"), "height", pa.array(sizes[:, 1]))
        out = LineTable(table, self.manifest, self.sources, sizes_checked=True, images=self.images)
        for name, column in out.columns.items():
            column.mapped = self.columns[name].mapped  # the same buffers, so the same (mapped or not) memory
        return out

    def __reduce__(self) -> tuple[Any, ...]:
        # Loader workers started by spawn get the table by pickle: a cached table is re-mapped from its file
        # rather than copied into every worker.
        if self.cache_path is not None and self.sources is None and self.images is None:
            return (open_cached_table, (self.cache_path, self.manifest))
        return (LineTable, (self.table, self.manifest, self.sources, None, self.sizes_checked, self.images))


# `extra` as LineTable writes it: "" or json.dumps of a flat object of strings (", " and ": " separators).
_JSON_STRING = r'"(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*"'
_EXTRA_PATTERN = (r"^(?:\{(?:" + _JSON_STRING + ": " + _JSON_STRING + "(?:, " + _JSON_STRING + ": " + _JSON_STRING
                  + r")*)?\})?$")


def table_problem(table: pa.Table, size_codes: Sequence[int] = (), mapped: bool = False) -> str | None:
    """What makes a LineTable read from a file (a line cache, a shard index) unusable, or None: the checks the
    manifest parser applies to every row (a non-empty text, unique ids, an `extra` that is a JSON object of
    strings), no nulls, and per line a size (width, height > 0) or, when `size_codes` allows, one of those codes
    in both columns. Vectorised (Arrow compute): a 10M-line table is checked in seconds, not minutes.
    `mapped`: the table is a read-only memory-mapped file (open_arrow_file); the rows are checked a record batch
    at a time and each batch's pages released once checked, so checking a 10M-line file does not leave all its
    gigabytes in the resident set (only for such a table: on heap memory the release would discard data)."""
    for name in table.column_names:
        if table.column(name).null_count:
            return f"column {name} has nulls"
    if not len(table):
        return None
    ids = table.column("sample_id")
    if pc.count_distinct(ids).as_py() != len(ids):
        counts = pc.value_counts(ids)
        twice = counts.filter(pc.greater(counts.field("counts"), 1))
        return f"duplicated sample_id {twice.field('values')[0].as_py()!r}"
    first_row = 0
    for batch in table.to_batches():
        problem = _batch_problem(batch, size_codes)
        if problem is not None:
            row, what = problem
            return f"row {first_row + row}: {what}"
        first_row += batch.num_rows
        if mapped:
            _release_chunks(batch.columns)
    return None


def _batch_problem(batch: pa.RecordBatch, size_codes: Sequence[int]) -> tuple[int, str] | None:
    """table_problem's per-row checks on one record batch: (row in the batch, what is wrong) or None."""
    blank = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(batch.column("text"))), 0)
    if pc.any(blank).as_py():
        return pc.index(blank, True).as_py(), "empty text"
    good = pc.match_substring_regex(batch.column("extra"), _EXTRA_PATTERN)
    if not pc.all(good).as_py():
        return pc.index(good, False).as_py(), "extra is not a JSON object of strings"
    width, height = batch.column("width").to_numpy(), batch.column("height").to_numpy()
    ok = (width > 0) & (height > 0)
    for code in size_codes:
        ok |= (width == code) & (height == code)
    if not ok.all():
        row = int(np.flatnonzero(~ok)[0])
        return row, f"width/height {int(width[row])}/{int(height[row])} is neither a size nor a known code"
    return None


def open_arrow_file(path: str | os.PathLike) -> pa.ipc.RecordBatchFileReader:
    """An Arrow IPC file (a line cache, a shard index), memory-mapped read-only (shared with every process that
    maps it). Only a regular file is mapped: the open does not wait on a FIFO (O_NONBLOCK) and fstat refuses it
    and devices (pa.memory_map would block on a FIFO forever). OSError or ArrowInvalid for anything else."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file (a FIFO or a device?); refusing to read it", str(path))
        if info.st_size == 0:
            raise OSError(errno.EINVAL, "an empty file", str(path))
        mapped = mmap.mmap(fd, info.st_size, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)  # the mapping keeps the file's pages; the descriptor is not needed
    return pa.ipc.open_file(pa.BufferReader(pa.py_buffer(mapped)))


def open_cached_table(path: str, manifest: str) -> LineTable:
    table = open_arrow_file(path).read_all()
    return LineTable(table, manifest, cache_path=path, sizes_checked=True)
