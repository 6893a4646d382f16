"""Reading line manifests (JSONL: one line image + transcription per row) into validated records.

Bad rows are never dropped silently: each is counted under one reason of ``BAD_ROW_REASONS``, and the
first occurrence of each reason is remembered as ``path:line_no`` so a user can open the file at the
offending row. One bad row (undecodable bytes, broken JSON, a missing image) never aborts the whole
manifest unless the caller asks for ``on_bad_row="error"``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from lineclip.errors import LineclipError
from lineclip.lines import (
    TABLE_SCHEMA,
    LineRecord,
    LineTable,
    release_mapped_pages,
)

logger = logging.getLogger(__name__)

IMAGE_KEYS = (
    "image",
    "image_path",
    "line_path",
    "line_image",
    "line_image_path",
    "image_rel_path",
    "line_image_rel_path",
    "src__image",
    "path",
)
TEXT_KEYS = (
    "text",
    "transcription",
    "label",
    "ocr_text",
    "line_text",
    "normalized_text",
    "content",
    "src__label",
    "src__text",
)
ID_KEYS = ("id", "sample_id")
BAD_ROW_REASONS = (
    "invalid_json",
    "not_an_object",
    "no_image_key",
    "image_not_found",
    "no_text_key",
    "empty_text",
    "duplicate_id",
    "invalid_utf8",
    "text_too_long",
    "invalid_unicode",
)
# A real line is ~450 bytes; a row far beyond that is a page or a file glued into one "line" by a broken
# OCR export, and would only be truncated to noise.
DEFAULT_MAX_TEXT_BYTES = 8192
ON_BAD_ROW_CHOICES = ("skip", "error")

# Keys that become LineRecord fields; every other scalar key of a row goes to LineRecord.extra.
_RESERVED_KEYS = frozenset(IMAGE_KEYS + TEXT_KEYS + ID_KEYS + ("doc_id", "page_id", "line_id"))


def normalize_text(text: str) -> str:
    """Canonical form of a transcription, shared by training data and retrieval queries.

    NFC first, so that a decomposed and a precomposed spelling of the same Tibetan stack (or the same
    vowel signs typed in a different order) compare and encode identically. Then every run of Unicode
    whitespace (``str.split()`` semantics: spaces, tabs, newlines, NBSP U+00A0, U+3000, ...) becomes
    one ASCII space, and the ends are stripped. Zero-width characters (U+200B, U+200C/D) and the
    Tibetan tsheg variants (U+0F0B, U+0F0C) are not whitespace and are kept.
    """
    return " ".join(unicodedata.normalize("NFC", text).split())


def is_blank(text: str) -> bool:
    """A text that shows nothing: empty, or only whitespace and format characters (Unicode category Cf: zero-width
    space U+200B, joiners U+200C/D, word joiner U+2060, BOM U+FEFF ...). Such a "transcription" is no line's text
    and such a query asks for nothing; both are empty texts. `normalize_text` keeps these characters inside real
    text (they can matter between letters), so this is a check, not a normalisation."""
    return all(ch.isspace() or unicodedata.category(ch) == "Cf" for ch in text)


@dataclass
class ManifestReport:
    """What reading one manifest kept and skipped. ``rows_total`` counts non-blank lines, so
    ``rows_total == rows_used + sum(skipped.values())``."""

    manifest: str
    rows_total: int = 0
    rows_used: int = 0
    skipped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BAD_ROW_REASONS, 0))
    first_bad: dict[str, str] = field(default_factory=dict)

    @property
    def rows_skipped(self) -> int:
        return sum(self.skipped.values())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self, label: str | None = None) -> str:
        """One line such as ``train lines.jsonl: 748 of 750 rows used; skipped: image_not_found=1, ...``."""
        name = label if label is not None else display_name(self.manifest)
        text = f"{name}: {self.rows_used} of {self.rows_total} rows used"
        bad = [f"{reason}={self.skipped[reason]}" for reason in BAD_ROW_REASONS if self.skipped.get(reason)]
        if bad:
            text += "; skipped: " + ", ".join(bad)
        return text


class ManifestError(LineclipError, ValueError):
    """A manifest that cannot be used; the message is one line naming the file (and line where it applies)."""


def _split_of(path: Path) -> str | None:
    # OpenPecha layouts name every manifest `<split>/meta/lines.jsonl`; the split is what tells them apart.
    return path.parent.parent.name if path.parent.name == "meta" and path.parent.parent.name else None


def display_name(manifest: str | Path) -> str:
    """How reports name a manifest: its file name, after its split for OpenPecha's `<split>/meta/lines.jsonl`."""
    path = Path(manifest)
    split = _split_of(path)
    return f"{split} {path.name}" if split else path.name


def manifest_label(manifest: str | Path) -> str:
    """A file-name-safe name for a manifest: its stem, or `<split>_<stem>` for OpenPecha's
    `<root>/<split>/meta/lines.jsonl`, where every split's manifest is called `lines`."""
    path = Path(os.path.abspath(os.path.expanduser(str(manifest))))
    stem = path.name.split(".")[0] or path.stem
    split = _split_of(path)
    if split:
        stem = f"{split}_{stem}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.") or "manifest"


def image_search_dirs(manifest_path: Path, dataset_dir: Path | None) -> list[str]:
    """Where a relative image path is looked for, in order: the manifest's dir, its parent and grandparent, the
    dataset dir, the working dir (the line cache is keyed by these too)."""
    manifest_dir = Path(os.path.abspath(manifest_path)).parent
    dirs = [manifest_dir, manifest_dir.parent, manifest_dir.parent.parent]
    if dataset_dir is not None:
        dirs.append(Path(os.path.abspath(dataset_dir)))
    dirs.append(Path.cwd())
    unique: list[str] = []
    for directory in dirs:
        if str(directory) not in unique:
            unique.append(str(directory))
    return unique


def _resolve(value: str, candidate_dirs: list[str]) -> str | None:
    value = os.path.expanduser(value)
    if os.path.isabs(value):
        return os.path.normpath(value) if os.path.isfile(value) else None
    for directory in candidate_dirs:
        candidate = os.path.join(directory, value)
        if os.path.isfile(candidate):
            # normpath (not realpath) keeps the user's symlinked layout and costs no system calls.
            return os.path.normpath(candidate)
    return None


def resolve_image_path(value: str, manifest_path: Path, dataset_dir: Path | None) -> Path | None:
    """Absolute path of an existing image file, or None.

    An absolute ``value`` is used as is. A relative one is tried against the manifest's folder, its
    parent, its grandparent (OpenPecha: ``<root>/<split>/meta/lines.jsonl`` with paths relative to
    ``<root>/<split>`` or ``<root>``), ``dataset_dir``, then the current directory; the first existing
    file wins.
    """
    resolved = _resolve(value, image_search_dirs(Path(manifest_path), optional_path(dataset_dir)))
    return Path(resolved) if resolved is not None else None


def optional_path(value: str | Path | None) -> Path | None:
    """None for a missing or empty config value, else the Path."""
    return None if value is None or str(value) == "" else Path(value)


class _BadRow(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _first_string(row: Mapping[str, Any], keys: tuple[str, ...]) -> tuple[str | None, str | None]:
    """(key, value) of the first alias holding a non-blank string (`is_blank`), else (None, None)."""
    for key in keys:
        value = row.get(key)
        if isinstance(value, str) and not is_blank(value):
            return key, value
    return None, None


def _id_string(value: Any) -> str:
    # bool is an int subclass, but `true` as an id is almost certainly a data error; treat it as absent.
    if value is None or isinstance(value, bool):
        return ""
    if isinstance(value, (str, int, float)):
        return str(value).strip()
    return ""


def _extra_value(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)  # what json.dumps writes for an int, without its per-call overhead
    if isinstance(value, float):
        return json.dumps(value)  # "1.5", "NaN": stable, JSON-like spelling
    return None  # lists, objects and null are not groupable scalars


_INT32_MAX = 2**31 - 1  # the table's width/height columns are int32


def _pixel_count(value: Any) -> int:
    """A manifest's `width`/`height` when it is a positive integer the table can hold, else -1 (unknown: read the
    header). A value past int32 (`"width": 99999999999`) is no image's size: the header decides, as for a missing
    one, instead of Arrow refusing the whole batch."""
    ok = isinstance(value, int) and not isinstance(value, bool) and 0 < value <= _INT32_MAX
    return value if ok else -1


# json.dumps(extra, ensure_ascii=False), without building an encoder per call (dumps does, for any non-default option)
_EXTRA_ENCODER = json.JSONEncoder(ensure_ascii=False)
_RESOLVED_MEMO = 1 << 16  # image values whose resolved path a parse remembers (then it starts over)

# One usable row as the table stores it: sample_id, image_path, text, doc_id, page_id, line_id, extra (JSON
# object text, "" for none), width, height (-1: not in the manifest).
_Row = tuple[str, str, str, str, str, str, str, int, int]


def _parse_row(
    raw: bytes,
    line_no: int,
    stem: str,
    candidate_dirs: list[str],
    max_text_bytes: int | None = DEFAULT_MAX_TEXT_BYTES,
    resolved: dict[str, str | None] | None = None,
) -> _Row:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _BadRow("invalid_utf8", f"byte {exc.start}: {exc.reason}") from None
    if line_no == 1:
        line = line.lstrip("\ufeff")  # a UTF-8 BOM written by some editors would break json.loads
    try:
        row = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise _BadRow("invalid_json", str(exc)) from None
    if not isinstance(row, dict):
        raise _BadRow("not_an_object", f"got a JSON {type(row).__name__}")
    # Valid UTF-8 can still escape a lone surrogate ("\\ud800"): JSON accepts it, UTF-8 cannot encode it, and
    # every later step (byte encoding, paths, parquet) would fail on it. Only a row with a backslash escape can
    # hold one, so the others skip the check.
    if "\\u" in line:
        for key, value in row.items():
            for part in (key, value) if isinstance(value, str) else (key,):
                try:
                    part.encode("utf-8")
                except UnicodeEncodeError as exc:
                    raise _BadRow("invalid_unicode", f"{key.encode('utf-8', 'backslashreplace').decode()!r} holds "
                                  f"{part[exc.start]!r} at character {exc.start}, which UTF-8 cannot encode") from None

    image_key, image_value = _first_string(row, IMAGE_KEYS)
    if image_key is None or image_value is None:
        present = [key for key in IMAGE_KEYS if key in row]
        if present:
            raise _BadRow("no_image_key", f"no non-empty string under {', '.join(present)}")
        raise _BadRow("no_image_key", "none of " + "/".join(IMAGE_KEYS))

    text_key, text_value = _first_string(row, TEXT_KEYS)
    if text_key is None or text_value is None:
        present = [key for key in TEXT_KEYS if key in row]
        if present:
            raise _BadRow("empty_text", f"no non-empty string under {', '.join(present)}")
        raise _BadRow("no_text_key", "none of " + "/".join(TEXT_KEYS))
    text = normalize_text(text_value)
    if is_blank(text):  # unreachable for a non-blank string today; kept so the non-empty invariant never rots
        raise _BadRow("empty_text", f"{text_key!r} is empty after normalisation")
    if max_text_bytes and len(text) * 4 > max_text_bytes and len(text.encode("utf-8")) > max_text_bytes:
        raise _BadRow("text_too_long", f"{len(text.encode('utf-8'))} bytes > data.max_text_bytes={max_text_bytes}")

    if resolved is None:
        image_path = _resolve(image_value, candidate_dirs)
    else:  # a page image listed once per line: one lookup (a stat per search dir) per distinct value
        image_path = resolved.get(image_value, "")
        if image_path == "":
            if len(resolved) >= _RESOLVED_MEMO:
                resolved.clear()
            image_path = resolved[image_value] = _resolve(image_value, candidate_dirs)
    if image_path is None:
        raise _BadRow("image_not_found", f"{image_key}={image_value!r}; tried {', '.join(candidate_dirs)}")

    sample_id = ""
    for key in ID_KEYS:
        sample_id = _id_string(row.get(key))
        if sample_id:
            break
    if not sample_id:
        sample_id = f"{stem}:{line_no}"

    extra: dict[str, str] = {}
    for key, value in row.items():
        if key in _RESERVED_KEYS:
            continue
        converted = _extra_value(value)
        if converted is not None:
            extra[key] = converted

    return (sample_id, image_path, text, _id_string(row.get("doc_id")), _id_string(row.get("page_id")),
            _id_string(row.get("line_id")), _EXTRA_ENCODER.encode(extra) if extra else "",
            _pixel_count(row.get("width")), _pixel_count(row.get("height")))


# The columns of a LineTable, in order. Strings are Arrow strings (one bytes buffer + offsets per chunk), so a
# million lines are a few buffers, not millions of Python objects that every loader worker's refcounting would
# copy page by page.
_CHUNK_ROWS = 65_536  # rows parsed into Python objects before they become one Arrow batch
_READ_BLOCK = 16 << 20  # bytes read at a time where a byte range of the manifest is scanned


def _rows_to_batch(rows: list[_Row], line_nos: list[int]) -> pa.RecordBatch:
    columns = list(zip(*rows, strict=True)) if rows else [()] * 9
    arrays = [pa.array(columns[i], pa.string()) for i in range(7)]
    arrays += [pa.array(line_nos, pa.int64()), pa.array(columns[7], pa.int32()), pa.array(columns[8], pa.int32())]
    return pa.RecordBatch.from_arrays(arrays, schema=TABLE_SCHEMA)


def _id_digests(ids: list[str]) -> np.ndarray:
    """[k, 2] uint64: a 128-bit BLAKE2b digest per id (deterministic in every process, unlike hash())."""
    joined = b"".join(hashlib.blake2b(i.encode("utf-8"), digest_size=16).digest() for i in ids)
    return np.frombuffer(joined, dtype="<u8").reshape(-1, 2)


class SeenIds:
    """The ids of the usable rows so far, for the duplicate_id check, in 16 bytes a row instead of a Python dict of
    strings (~100 bytes a row: 1 GB at 10M rows). Ids are compared by their 128-bit digest: two different ids
    collide with a probability of ~n^2 / 2^129 (1e-25 at 10M rows). The digests are kept in sorted runs whose
    sizes halve from one to the next (each added chunk is merged into the runs no larger than it), so a lookup is
    a binary search in ~log2(rows / chunk) runs and each digest is re-sorted ~log2 times in all."""

    def __init__(self) -> None:
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []  # (first halves sorted, second halves in that order)

    def __len__(self) -> int:
        return sum(len(first) for first, _ in self.runs)

    def contains(self, digests: np.ndarray) -> np.ndarray:
        """Per digest row, whether it was added before."""
        found = np.zeros(len(digests), dtype=bool)
        for first, second in self.runs:
            lo = np.searchsorted(first, digests[:, 0], side="left")
            hi = np.searchsorted(first, digests[:, 0], side="right")
            for i in np.flatnonzero(hi > lo):  # the first halves match: only a true duplicate in practice
                found[i] |= bool((second[lo[i] : hi[i]] == digests[i, 1]).any())
        return found

    def add(self, digests: np.ndarray) -> None:
        """Add digests that are not in the set yet (and distinct among themselves)."""
        if not len(digests):
            return
        order = np.argsort(digests[:, 0], kind="stable")
        first, second = digests[order, 0], digests[order, 1]
        while self.runs and len(self.runs[-1][0]) <= len(first):
            run_first, run_second = self.runs.pop()
            first, second = np.concatenate([run_first, first]), np.concatenate([run_second, second])
            order = np.argsort(first, kind="stable")  # two sorted runs: timsort merges them in linear time
            first, second = first[order], second[order]
        self.runs.append((first, second))


@dataclass
class _Parsed:
    """What parsing a run of manifest lines found: bad rows per reason, the line of each reason's first bad row, the
    row counts, and where the usable rows went: `batches` (kept in memory) or the Arrow file `spill` (a pool
    process's part), with `digests`, the ids of its usable rows in order (for the duplicates across parts)."""

    batches: list[pa.RecordBatch] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BAD_ROW_REASONS, 0))
    first_bad: dict[str, int] = field(default_factory=dict)
    rows_total: int = 0
    rows_used: int = 0
    spill: str | None = None
    digests: np.ndarray | None = None

    def count_bad(self, reason: str, line_no: int, n: int = 1) -> None:
        self.skipped[reason] += n
        self.first_bad[reason] = min(self.first_bad.get(reason, line_no), line_no)


def _first_use_of(sample_id: str, before: int, manifest: Path, candidate_dirs: list[str],
                  max_text_bytes: int | None) -> int:
    """The line of the first usable row with this id before line `before` (for the error message of a duplicate
    found across chunks; error mode only, where every earlier row was usable: one more read, once)."""
    with manifest.open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            if line_no >= before:
                break
            if raw.strip():
                with contextlib.suppress(_BadRow):
                    if _parse_row(raw, line_no, manifest.stem, candidate_dirs, max_text_bytes)[0] == sample_id:
                        return line_no
    return before


def _parse_lines(lines: Iterable[bytes], first_line_no: int, manifest: Path, candidate_dirs: list[str],
                 max_text_bytes: int | None, on_bad_row: str, emit: Callable[[pa.RecordBatch], None],
                 seen: SeenIds | None = None, chunk_rows: int | None = None) -> _Parsed:
    """Parse lines into Arrow batches of at most `chunk_rows` usable rows, each handed to `emit` as soon as it is
    full: what is held is one chunk of rows, plus the ids seen so far as digests (`seen`). Duplicates within a
    chunk are found by id, those of an earlier chunk by digest when the chunk is full; the result (counts, first
    bad row per reason, usable rows) is that of one pass that remembers every id."""
    chunk_rows = chunk_rows or _CHUNK_ROWS
    seen = SeenIds() if seen is None else seen
    parsed = _Parsed()
    rows: list[_Row] = []
    line_nos: list[int] = []
    chunk_ids: dict[str, int] = {}  # id -> line number, this chunk's usable rows
    resolved: dict[str, str | None] = {}
    stem = manifest.stem

    def earlier_duplicates() -> tuple[np.ndarray, np.ndarray]:
        digests = _id_digests([row[0] for row in rows])
        dup = seen.contains(digests)
        if dup.any() and on_bad_row == "error":
            i = int(np.flatnonzero(dup)[0])
            first = _first_use_of(rows[i][0], line_nos[i], manifest, candidate_dirs, max_text_bytes)
            raise ManifestError(f"{manifest}:{line_nos[i]}: duplicate_id (id {rows[i][0]!r} already used at "
                                f"{manifest}:{first})")
        return digests, dup

    def flush() -> None:
        nonlocal rows, line_nos, chunk_ids
        digests, dup = earlier_duplicates()
        if dup.any():
            for i in np.flatnonzero(dup):
                parsed.count_bad("duplicate_id", line_nos[i])
            rows = [row for row, d in zip(rows, dup, strict=True) if not d]
            line_nos = [n for n, d in zip(line_nos, dup, strict=True) if not d]
            parsed.rows_used -= int(dup.sum())
        seen.add(digests[~dup])
        if rows:
            emit(_rows_to_batch(rows, line_nos))
        rows, line_nos, chunk_ids = [], [], {}

    for line_no, raw in enumerate(lines, start=first_line_no):
        if not raw.strip():
            continue
        parsed.rows_total += 1
        try:
            row = _parse_row(raw, line_no, stem, candidate_dirs, max_text_bytes, resolved)
            # Ids are claimed by usable rows only, so a bad first occurrence does not shadow a good one.
            first = chunk_ids.get(row[0])
            if first is not None:
                raise _BadRow("duplicate_id", f"id {row[0]!r} already used at {manifest}:{first}")
        except _BadRow as bad:
            if on_bad_row == "error":
                if rows:
                    earlier_duplicates()  # a duplicate of an earlier chunk in this one came first
                raise ManifestError(f"{manifest}:{line_no}: {bad.reason} ({bad.detail})") from None
            parsed.count_bad(bad.reason, line_no)
            continue
        chunk_ids[row[0]] = line_no
        rows.append(row)
        line_nos.append(line_no)
        parsed.rows_used += 1
        if len(rows) == chunk_rows:
            flush()
    if rows:
        flush()
    return parsed


def _range_lines(manifest: Path, start: int, end: int) -> Iterator[bytes]:
    """The lines in the bytes [start, end) of the manifest (whole lines), read one at a time."""
    with manifest.open("rb") as handle:
        handle.seek(start)
        position = start
        while position < end:
            line = handle.readline()
            if not line:
                break
            position += len(line)
            yield line


def _parse_range(manifest: Path, start: int, end: int, first_line_no: int, candidate_dirs: list[str],
                 max_text_bytes: int | None, spill_dir: str | None, chunk_rows: int | None) -> _Parsed:
    """`_parse_lines` over the bytes [start, end) of the manifest, in a pool process: its batches into a temporary
    Arrow file in `spill_dir` (the parent process reads and deletes it), else returned."""
    digests: list[np.ndarray] = []
    if spill_dir is None:
        batches: list[pa.RecordBatch] = []
        parsed = _parse_lines(_range_lines(manifest, start, end), first_line_no, manifest, candidate_dirs,
                              max_text_bytes, "skip", batches.append, chunk_rows=chunk_rows)
        parsed.batches = batches
    else:
        fd, spill = tempfile.mkstemp(prefix=f".{manifest.name}.lineclip-part.", suffix=".arrow", dir=spill_dir)
        os.close(fd)
        try:
            with pa.OSFile(spill, "wb") as sink, pa.ipc.new_file(sink, TABLE_SCHEMA) as writer:
                parsed = _parse_lines(_range_lines(manifest, start, end), first_line_no, manifest, candidate_dirs,
                                      max_text_bytes, "skip", writer.write_batch, chunk_rows=chunk_rows)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(spill)
            raise
        parsed.spill = spill

    def ids_of(batches: Iterable[pa.RecordBatch]) -> None:
        for batch in batches:
            digests.append(_id_digests(batch.column(0).to_pylist()))

    if parsed.spill is None:
        ids_of(parsed.batches)
    else:
        with pa.memory_map(parsed.spill) as source:
            reader = pa.ipc.open_file(source)
            ids_of(reader.get_batch(i) for i in range(reader.num_record_batches))
    parsed.digests = np.concatenate(digests) if digests else np.zeros((0, 2), np.uint64)
    return parsed


def _line_ranges(manifest: Path, parts: int) -> list[tuple[int, int, int]]:
    """(start, end, first line number) of `parts` runs of whole lines of the file."""
    size = manifest.stat().st_size
    bounds = [0]
    with manifest.open("rb") as handle:
        for k in range(1, parts):
            handle.seek(max(bounds[-1], size * k // parts))
            handle.readline()  # to the end of the line this byte is in
            bounds.append(min(size, handle.tell()))
        bounds.append(size)
        ranges, line_no = [], 1
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            if end > start:
                ranges.append((start, end, line_no))
                handle.seek(start)
                for offset in range(start, end, _READ_BLOCK):  # in blocks: a range can be gigabytes
                    line_no += handle.read(min(_READ_BLOCK, end - offset)).count(b"\n")
    return ranges


def _release(batch: pa.RecordBatch) -> None:
    """Drop a batch of a read-only memory-mapped file from this process's resident set (lineclip.lines)."""
    for column in batch.columns:
        for buffer in column.buffers():
            if buffer is not None:
                release_mapped_pages(buffer)


def _parse_parallel(manifest: Path, candidate_dirs: list[str], max_text_bytes: int | None, workers: int,
                    emit: Callable[[pa.RecordBatch], None], spill_dir: str | None,
                    chunk_rows: int | None) -> _Parsed:
    """The manifest parsed in line ranges by a process pool, merged into what one pass would give: the ranges in
    file order, and ids used by an earlier range counted as duplicates, where one pass would have found them. With
    `spill_dir`, each range's rows go to a temporary file there, read back batch by batch (and deleted) as they are
    merged, so neither the pool processes nor this one hold more than a chunk of rows and the ids' digests."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ranges = _line_ranges(manifest, workers * 4)
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    merged = _Parsed()
    seen = SeenIds()
    parts: list[_Parsed] = []
    try:
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            n = len(ranges)
            for part in pool.map(_parse_range, [manifest] * n, *zip(*ranges, strict=True), [candidate_dirs] * n,
                                 [max_text_bytes] * n, [spill_dir] * n, [chunk_rows] * n):
                parts.append(part)
                merged.rows_total += part.rows_total
                merged.rows_used += part.rows_used
                for reason, count in part.skipped.items():
                    merged.skipped[reason] += count
                for reason, line in part.first_bad.items():
                    merged.first_bad[reason] = min(merged.first_bad.get(reason, line), line)
                assert part.digests is not None
                dup = seen.contains(part.digests)
                seen.add(part.digests[~dup])
                part.digests = None
                _merge_part(part, dup, merged, emit)
    finally:
        for part in parts:
            if part.spill is not None:
                with contextlib.suppress(OSError):
                    os.unlink(part.spill)
    return merged


def _merge_part(part: _Parsed, dup: np.ndarray, merged: _Parsed, emit: Callable[[pa.RecordBatch], None]) -> None:
    """Hand a part's rows to `emit`, without those whose id an earlier part used (counted as duplicates)."""
    if dup.any():
        merged.rows_used -= int(dup.sum())
    source = pa.memory_map(part.spill) if part.spill is not None else None
    try:
        if source is not None:
            reader = pa.ipc.open_file(source)
            batches: Iterable[pa.RecordBatch] = (reader.get_batch(i) for i in range(reader.num_record_batches))
        else:
            batches = part.batches
        offset = 0
        for read in batches:
            drop = dup[offset : offset + len(read)]
            offset += len(read)
            batch = read
            if drop.any():
                lines = read.column(7).to_numpy()[drop]
                merged.count_bad("duplicate_id", int(lines.min()), int(drop.sum()))
                batch = read.filter(pa.array(~drop))  # a copy in memory: never released below
            if len(batch):
                emit(batch)
            if source is not None:
                _release(read)  # emit wrote it on (spill_dir: to a file): the mapped pages are not needed again
        part.batches = []
    finally:
        if source is not None:
            source.close()
            with contextlib.suppress(OSError):
                os.unlink(part.spill)
            part.spill = None


# Manifests this large are parsed by a process pool (when workers > 1 and bad rows are skipped, not errors).
PARALLEL_PARSE_MIN_BYTES = 64 << 20


class _Spill:
    """Where the parsed batches go: kept in memory until more than `min_rows` rows have come, then (with a
    `directory`) written on, with those kept so far, to a temporary Arrow file there."""

    def __init__(self, manifest: Path, directory: str | None, min_rows: int) -> None:
        self.manifest, self.directory, self.min_rows = manifest, directory, min_rows
        self.batches: list[pa.RecordBatch] = []
        self.rows = 0
        self.path: str | None = None
        self.sink: Any = None
        self.writer: Any = None
        self.peak_rows = 0  # the most rows held in memory at once (tests check the bound)

    def __call__(self, batch: pa.RecordBatch) -> None:
        if self.writer is not None:
            self.writer.write_batch(batch)
            self.peak_rows = max(self.peak_rows, len(batch))
            return
        self.batches.append(batch)
        self.rows += len(batch)
        self.peak_rows = max(self.peak_rows, self.rows)
        if self.directory is not None and self.rows > self.min_rows:
            fd, self.path = tempfile.mkstemp(prefix=f".{self.manifest.name}.lineclip-spill.", suffix=".tmp",
                                             dir=self.directory)
            os.close(fd)
            self.sink = pa.OSFile(self.path, "wb")
            self.writer = pa.ipc.new_file(self.sink, TABLE_SCHEMA)
            for kept in self.batches:
                self.writer.write_batch(kept)
            self.batches = []

    def table(self) -> tuple[pa.Table, bool]:
        """The rows as one table, and whether it is memory-mapped from the file (deleted already: the mapping
        keeps it readable as long as the table lives, and nothing is left behind if the process dies)."""
        if self.writer is None:
            return pa.Table.from_batches(self.batches, TABLE_SCHEMA), False
        self.writer.close()
        self.sink.close()
        self.writer = None
        assert self.path is not None
        try:
            with pa.memory_map(self.path) as source:
                table = pa.ipc.open_file(source).read_all()
        finally:
            os.unlink(self.path)
        return table, True

    def discard(self) -> None:
        if self.writer is not None:
            with contextlib.suppress(OSError, pa.ArrowException):
                self.writer.close()
                self.sink.close()
        if self.path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)


def read_line_table(
    path: str | Path,
    dataset_dir: str | Path | None = None,
    on_bad_row: str = "skip",
    max_text_bytes: int | None = DEFAULT_MAX_TEXT_BYTES,
    workers: int = 1,
    spill_dir: str | Path | None = None,
    spill_min_rows: int = 0,
    chunk_rows: int | None = None,
) -> tuple[LineTable, ManifestReport]:
    """Read a JSONL line manifest into a LineTable plus a report of what was skipped and why.

    ``on_bad_row="skip"`` counts each bad row under its reason and goes on; ``"error"`` raises
    ManifestError at the first bad row with ``path:line_no: reason (detail)``. A missing file, or a
    manifest with no usable row, raises ManifestError in either mode. Image sizes are those of the manifest's
    `width`/`height` where it has them, else -1 (lineclip.sizes reads the headers). With `workers` > 1, a
    manifest of PARALLEL_PARSE_MIN_BYTES or more is parsed by that many processes (skip mode: the same table
    and report as one pass; error mode always reads in one pass, to stop at the first bad row).

    The rows are parsed `chunk_rows` at a time (default 65,536). With `spill_dir`, once more than `spill_min_rows`
    rows are usable they are streamed into a temporary Arrow file there (deleted at once; the table returned is
    memory-mapped from it), so a parse holds one chunk of rows per process plus 16 bytes an id (the duplicate
    check), whatever the number of rows; without, the table is in memory (~0.7 KB a line of the demo's kind).
    """
    if on_bad_row not in ON_BAD_ROW_CHOICES:
        raise ValueError(f"on_bad_row must be one of {ON_BAD_ROW_CHOICES}, got {on_bad_row!r}")
    manifest = Path(os.path.abspath(os.path.expanduser(str(path))))
    if not manifest.is_file():
        what = "is not a file" if manifest.exists() else "does not exist"
        raise ManifestError(f"manifest {manifest} {what}")

    candidate_dirs = image_search_dirs(manifest, optional_path(dataset_dir))
    spill = _Spill(manifest, None if spill_dir is None else str(spill_dir), spill_min_rows)
    try:
        if workers > 1 and on_bad_row == "skip" and manifest.stat().st_size >= PARALLEL_PARSE_MIN_BYTES:
            parsed = _parse_parallel(manifest, candidate_dirs, max_text_bytes, workers, spill, spill.directory,
                                     chunk_rows)
        else:
            # Binary mode, one line at a time: a non-UTF-8 line must cost that row only, not the whole file.
            with manifest.open("rb") as handle:
                parsed = _parse_lines(handle, 1, manifest, candidate_dirs, max_text_bytes, on_bad_row, spill,
                                      chunk_rows=chunk_rows)
        table, mapped = spill.table()
    except BaseException:
        spill.discard()
        raise
    report = ManifestReport(manifest=str(manifest), rows_total=parsed.rows_total, rows_used=parsed.rows_used,
                            skipped=parsed.skipped,
                            first_bad={reason: f"{manifest}:{line}" for reason, line in
                                       sorted(parsed.first_bad.items(), key=lambda item: item[1])})
    if not report.rows_used:
        where = "; ".join(f"first {reason} at {loc}" for reason, loc in report.first_bad.items())
        raise ManifestError(
            f"manifest {manifest} has no usable rows: {report.summary()}" + (f" ({where})" if where else "")
        )
    log_report(report)
    lines = LineTable(table, str(manifest))
    if mapped:
        for column in lines.columns.values():
            column.mapped = True  # its pages may be released once read (lineclip.lines.release_mapped_pages)
    return lines, report


def log_report(report: ManifestReport) -> None:
    if report.rows_skipped:
        where = ", ".join(f"{reason} at {loc}" for reason, loc in report.first_bad.items())
        logger.warning("%s (first: %s)", report.summary(), where)
    else:
        logger.info("%s", report.summary())


def read_manifest(
    path: str | Path,
    dataset_dir: str | Path | None = None,
    on_bad_row: str = "skip",
    max_text_bytes: int | None = DEFAULT_MAX_TEXT_BYTES,
) -> tuple[list[LineRecord], ManifestReport]:
    """`read_line_table` with the lines as a list of LineRecords: for evaluation-sized manifests and callers that
    want plain records. Training reads tables (lineclip.sizes.load_lines), which stay columnar."""
    table, report = read_line_table(path, dataset_dir, on_bad_row, max_text_bytes)
    return list(table), report
