"""Lines as columns (LineTable), the image-size scan and the line cache: the same lines, sizes, buckets and
counts as reading records one by one, without a per-line Python object, and a cache that is used only when it
matches."""

import json
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from lineclip.batch import (
    LineCollator,
    LineDataset,
    ShownTexts,
    count_truncated,
    cut_at_char_boundary,
    group_keys,
    text_hash_ids,
    text_lengths,
)
from lineclip.config import asset_dir
from lineclip.lines import LineRecord, LineTable
from lineclip.manifest import read_line_table, read_manifest
from lineclip.metrics import text_ids
from lineclip.preprocess import LineGeometry, LineImageTransform, header_size
from lineclip.sizes import (
    SIZE_EMPTY,
    SIZE_TOO_LARGE,
    SIZE_UNREADABLE,
    cache_name,
    complete_sizes,
    load_line_table,
    main_first,
    scan_sizes,
)

DEMO = asset_dir("demo")
DEMO_TRAIN = DEMO / "train" / "meta" / "lines.jsonl"


def demo_rows() -> list[dict]:
    return [json.loads(line) for line in DEMO_TRAIN.read_text().splitlines()]


def write_manifest(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return path


def absolute_demo_rows(n: int, drop_sizes: bool = True) -> list[dict]:
    rows = []
    for i, row in enumerate(demo_rows()[:n]):
        row = {**row, "line_path": str(DEMO / row["line_path"])}
        if drop_sizes:  # without them, every size comes from a header
            row.pop("width"), row.pop("height")
        rows.append({**row, "id": f"r{i}"})
    return rows


def test_table_rows_are_the_records_read_one_by_one(tmp_path):
    table, report = read_line_table(DEMO_TRAIN)
    records, report2 = read_manifest(DEMO_TRAIN)
    assert report.to_dict() == report2.to_dict() and len(table) == len(records) == 160
    assert list(table) == records and table[-1] == records[-1]
    assert all(isinstance(r, LineRecord) for r in records)
    assert [table.texts[i] for i in range(len(table))] == [r.text for r in records]
    assert table.texts.byte_lengths().tolist() == [len(r.text.encode()) for r in records]
    # the round trip through records keeps every field, the source included
    again = LineTable.from_records(records)
    assert list(again) == records


def test_table_chunks_index_like_one_list(tmp_path, monkeypatch):
    import lineclip.manifest as manifest

    monkeypatch.setattr(manifest, "_CHUNK_ROWS", 7)  # 160 rows in 23 Arrow chunks
    table, _ = read_line_table(DEMO_TRAIN)
    assert len(table.texts.chunks) == 23
    assert list(table) == read_manifest(DEMO_TRAIN)[0]
    texts = [table.texts[i] for i in range(len(table))]
    for max_length in (2, 100, 300):
        assert text_lengths(table.texts, max_length).tolist() == text_lengths(texts, max_length).tolist()
    with pytest.raises(IndexError):
        table.texts[160]


def test_parallel_parse_gives_the_one_pass_table_and_report(tmp_path, monkeypatch):
    import lineclip.manifest as manifest_module

    rows = absolute_demo_rows(160)
    lines = [json.dumps({**rows[i % 160], "id": f"r{i}"}, ensure_ascii=False) for i in range(400)]
    lines[7] = "{broken"
    lines[50] = json.dumps({**rows[3], "id": "r3"})  # a duplicate of line 4, in another range
    lines[51] = "[1, 2]"
    lines[120] = json.dumps({"id": "x", "text": "ཀ"})
    lines[121] = ""
    lines[300] = json.dumps({**rows[0], "id": "r299"})  # duplicates the row after it (r299 is line 300)
    lines[301] = json.dumps({**rows[1], "id": "r299", "text": "\ud800"}, ensure_ascii=True).replace("\\\\", "\\")
    lines[399] = json.dumps({**rows[5], "line_path": "gone.jpg", "id": "last"})
    path = tmp_path / "m.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode() + b"\n\xff\xfe\n")
    serial_table, serial = read_line_table(path)
    monkeypatch.setattr(manifest_module, "PARALLEL_PARSE_MIN_BYTES", 0)
    parallel_table, parallel = read_line_table(path, workers=3)  # 12 ranges of ~34 lines
    assert parallel.to_dict() == serial.to_dict()
    assert list(parallel.first_bad) == list(serial.first_bad)  # the order one pass meets them in
    assert serial.skipped["duplicate_id"] == 2 and serial.skipped["invalid_utf8"] == 1
    assert serial.skipped["invalid_unicode"] == 1 and serial.skipped["image_not_found"] == 1
    assert list(parallel_table) == list(serial_table)


def test_vectorised_text_lengths_and_counts_match_per_text_reference():
    table, _ = read_line_table(DEMO_TRAIN)
    texts = [table.texts[i] for i in range(len(table))]
    for max_length in (1, 64, 100, 129, 512):
        reference = [cut_at_char_boundary(t.encode(), max_length - 1) + 1 for t in texts]
        assert text_lengths(table.texts, max_length).tolist() == reference == text_lengths(texts, max_length).tolist()
        assert count_truncated(table.texts, max_length) == sum(len(t.encode()) + 1 > max_length for t in texts)
    shown = ShownTexts(table.texts, 99)
    assert [shown[i] for i in range(3)] == [t.encode()[:99].decode(errors="ignore") for t in texts[:3]]


def test_group_keys_of_a_table_equal_those_of_records():
    table, _ = read_line_table(DEMO_TRAIN)
    records = list(table)
    for field in ("page_id", "doc_id", "collection", "line_id", "nope"):
        expected: dict[str, int] = {}
        values = [(f"{r.doc_id}\x00{r.page_id}" if r.page_id else "") if field == "page_id"
                  else getattr(r, field) if field in ("doc_id", "line_id") else r.extra.get(field, "")
                  for r in records]
        reference = [expected.setdefault(v, len(expected)) if v else -1 for v in values]
        assert group_keys(table, field).tolist() == reference == group_keys(records, field).tolist()
    assert group_keys(table, "collection").max() == 1  # the demo's two collections


def test_parallel_scan_equals_serial_and_codes_bad_files(tmp_path):
    good = sorted(str(p) for p in (DEMO / "train" / "lines").iterdir())[:5]
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    paths = good + [str(tmp_path / "empty.jpg"), str(tmp_path / "junk.jpg"), str(tmp_path / "gone.jpg")]
    serial = scan_sizes(paths, None, workers=1, progress=False)
    assert serial[:5].tolist() == [list(header_size(p)) for p in good]
    assert serial[5:].tolist() == [[SIZE_EMPTY] * 2, [SIZE_UNREADABLE] * 2, [SIZE_UNREADABLE] * 2]
    many = paths * 2600  # past the process-pool threshold (20,000)
    parallel = scan_sizes(many, None, workers=2, progress=False)
    assert np.array_equal(parallel, np.tile(serial, (2600, 1)))
    limited = scan_sizes(good[:1], 100, workers=1, progress=False)
    assert limited.tolist() == [[SIZE_TOO_LARGE] * 2]


def test_manifest_sizes_are_used_when_they_match_and_ignored_when_not(tmp_path, caplog, monkeypatch):
    import lineclip.sizes as sizes

    monkeypatch.setattr(sizes, "SIZE_PROBE", 2)  # lines 0 and 19 are probed
    rows = absolute_demo_rows(20)
    true_sizes = [header_size(r["line_path"]) for r in rows]
    for row, (w, h) in zip(rows, true_sizes, strict=True):
        row["width"], row["height"] = w, h
    right = write_manifest(tmp_path / "right.jsonl", rows)
    table, _ = read_line_table(right)
    assert table.sizes.tolist() == [list(s) for s in true_sizes]  # taken from the manifest, no header read
    assert complete_sizes(table, None, progress=False).sizes.tolist() == [list(s) for s in true_sizes]
    # one file whose manifest size is wrong, not probed: it is found when loaded and counted as corrupt
    transform = LineImageTransform("bdrc", LineGeometry())
    rows[3]["width"] = true_sizes[3][0] // 5  # a narrower bucket than the file gives
    dataset = LineDataset(read_line_table(write_manifest(tmp_path / "one_wrong.jsonl", rows))[0], transform)
    assert dataset[3] == {"index": 3, "corrupt": "corrupt_image"} and "pixel_values" in dataset[2]
    # an export that wrote the size of a resized copy (tests/usage_support crops the files and keeps the demo's
    # width/height): the probe finds it and every header is read
    halved = [{**row, "width": w // 2, "height": h // 2} for row, (w, h) in zip(rows, true_sizes, strict=True)]
    table = complete_sizes(read_line_table(write_manifest(tmp_path / "resized.jsonl", halved))[0], None,
                           progress=False)
    assert table.sizes.tolist() == [list(s) for s in true_sizes]
    assert "not the image sizes" in caplog.text


def test_dataset_from_table_equals_dataset_from_records(tmp_path):
    table, _ = read_line_table(DEMO_TRAIN)
    transform = LineImageTransform("bdrc", LineGeometry())
    from_table = LineDataset(table, transform, crop_to_text_bytes=100)
    from_records = LineDataset(list(table), transform, crop_to_text_bytes=100)
    assert np.array_equal(from_table.buckets, from_records.buckets)
    assert np.array_equal(from_table.visible_share, from_records.visible_share)
    assert (from_table.visible_share < 1).any()
    # the bucket computed per distinct size is the transform's own, line by line
    for i in range(0, 160, 17):
        w, h = from_table._visible(i, header_size(table.image_paths[i]))
        assert from_table.buckets[i] == transform.bucket_of(w, h)
    item = from_table[5]
    assert item["text"] == table[5].text and item["pixel_values"].shape[-1] == from_table.buckets[5]


def test_dataset_without_a_crop_keeps_no_shares_and_buckets_like_the_transform(tmp_path):
    table, _ = read_line_table(DEMO_TRAIN)
    transform = LineImageTransform("bdrc", LineGeometry())
    dataset = LineDataset(table, transform)
    assert dataset.visible_share is None  # no crop: every share would be 1.0
    assert dataset.buckets.dtype == np.int16  # canvas widths fit: 2 bytes a line
    for i in range(0, 160, 13):
        assert dataset.buckets[i] == transform.bucket_of(*header_size(table.image_paths[i]))


def _rss_file_kb() -> int:
    return next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith("RssFile:"))


def test_checking_a_mapped_table_names_the_row_and_releases_its_pages(tmp_path):
    from lineclip.lines import TABLE_SCHEMA, open_arrow_file, table_problem

    n = 3000
    table = LineTable.from_records([LineRecord(f"id{i}", f"/x/{i}.png", "ཀ" * 2000 + f" {i}") for i in range(n)])
    table = table.with_sizes(np.full((n, 2), 7, np.int32)).table
    path = tmp_path / "lines.arrow"

    def write(t: pa.Table) -> pa.Table:
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, TABLE_SCHEMA) as writer:
            for batch in t.to_batches(max_chunksize=1000):  # three record batches: rows are numbered across them
                writer.write_batch(batch)
        return open_arrow_file(path).read_all()

    mapped = write(table)
    texts = mapped.column("text").to_pylist()  # every page of the ~18 MB of texts is now resident
    touched = _rss_file_kb()
    assert table_problem(mapped, mapped=True) is None is table_problem(table)
    assert _rss_file_kb() < touched - 12_000  # released once checked
    assert mapped.column("text").to_pylist() == texts  # and read back unchanged
    # a bad row in the third batch is named by its row in the table, as the unmapped check names it
    blank = table.set_column(TABLE_SCHEMA.get_field_index("text"), "text",
                             pa.array([t if i != 2345 else " " for i, t in enumerate(texts)]))
    assert table_problem(write(blank), mapped=True) == table_problem(blank) == "row 2345: empty text"
    sizes = table.set_column(TABLE_SCHEMA.get_field_index("width"), "width",
                             pa.array(np.where(np.arange(n) == 1500, 0, 7).astype(np.int32)))
    assert table_problem(write(sizes), mapped=True) == "row 1500: width/height 0/7 is neither a size nor a known code"


def test_a_mapped_line_table_releases_the_pages_it_read_and_reads_them_back(tmp_path):
    from lineclip.lines import TABLE_SCHEMA, open_cached_table

    n = 3000
    table = LineTable.from_records([LineRecord(f"id{i}", f"/x/{i}.png", "ཀ" * 2000 + f" {i}") for i in range(n)])
    sizes = np.stack([np.arange(n), np.arange(n) + 1], 1).astype(np.int32) + 1
    path = tmp_path / "lines.arrow"
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, TABLE_SCHEMA) as writer:
        writer.write_table(table.with_sizes(sizes).table)
    mapped = open_cached_table(str(path), "lines.jsonl")
    texts = [mapped.texts[i] for i in range(n)]  # every page of the ~18 MB of texts is now resident
    touched = _rss_file_kb()
    mapped.release_pages()
    assert _rss_file_kb() < touched - 12_000
    assert [mapped.texts[i] for i in range(n)] == texts and np.array_equal(mapped.sizes, sizes)
    # a table whose sizes were replaced in memory keeps them (heap memory is never released)
    resized = mapped.with_sizes(sizes + 5)
    resized.release_pages()
    assert np.array_equal(resized.table.column("width").to_numpy(), sizes[:, 0] + 5)
    assert [resized.texts[i] for i in range(0, n, 7)] == texts[::7]


def test_a_line_cache_read_back_keeps_its_sizes_as_final(tmp_path, monkeypatch):
    import lineclip.sizes as sizes

    manifest = big_manifest(tmp_path, 150)
    load_line_table(manifest, scan_workers=1, progress=False, cache_min_rows=100)
    cached, _ = load_line_table(manifest, scan_workers=1, progress=False, cache_min_rows=100)
    # no header is probed again and the dataset holds the cached table itself (one sizes array, not two)
    monkeypatch.setattr(sizes, "scan_sizes", lambda *a, **k: pytest.fail("probed again"))
    assert cached.sizes_checked and LineDataset(cached, LineImageTransform("bdrc", LineGeometry())).records is cached


def test_collator_text_ids_match_identical_transcriptions():
    texts = ["ཀ་ཁ", "ག་ང", "ཀ་ཁ", "ཅ"]
    ids = text_hash_ids(texts)
    assert ids.dtype == torch.long and (ids >= 0).all()
    reference = torch.as_tensor(text_ids(texts))
    assert torch.equal(ids[:, None] == ids[None, :], reference[:, None] == reference[None, :])
    items = [{"pixel_values": torch.zeros(3, 4, 4), "text": t, "index": i} for i, t in enumerate(texts)]
    batch = LineCollator(32)(items)
    assert torch.equal(batch["text_ids"], ids)
    assert LineCollator(32)([{"index": 0, "corrupt": "corrupt_image"}])["text_ids"].shape == (0,)


def big_manifest(tmp_path: Path, n: int = 10_000, **extra) -> Path:
    rows = absolute_demo_rows(160)
    return write_manifest(tmp_path / "data" / "lines.jsonl",
                          [{**rows[i % 160], "id": f"r{i}", "text": f"{rows[i % 160]['text']} {i}", **extra}
                           for i in range(n)])


def test_line_cache_is_written_then_used_then_rebuilt_when_the_manifest_changes(tmp_path, monkeypatch):
    import lineclip.sizes as sizes

    manifest = big_manifest(tmp_path, 200)
    first, report = load_line_table(manifest, scan_workers=1, progress=False, cache_min_rows=100)
    cached = [p for p in manifest.parent.iterdir() if p.name.endswith(".arrow")]
    assert len(cached) == 1 and cached[0].name.startswith(".lines.jsonl.lineclip-")
    assert first.cache_path == str(cached[0])
    # the second load reads neither the manifest nor a header
    monkeypatch.setattr(sizes, "read_line_table", lambda *a, **k: pytest.fail("parsed again"))
    monkeypatch.setattr(sizes, "scan_sizes", lambda *a, **k: pytest.fail("scanned again"))
    second, report2 = load_line_table(manifest, scan_workers=1, progress=False, cache_min_rows=100)
    assert list(second) == list(first) and np.array_equal(second.sizes, first.sizes)
    assert report2.to_dict() == report.to_dict()
    # the cut lengths of a mapped table release the text pages they touched; the texts read back unchanged
    texts = [second.texts[i] for i in range(len(second))]
    assert second.texts.mapped and not read_line_table(manifest)[0].texts.mapped
    assert text_lengths(second.texts, 100).tolist() == text_lengths(texts, 100).tolist()
    assert [second.texts[i] for i in range(len(second))] == texts
    # a spawn-started worker gets the table by pickle: re-mapped from the cache file, the same lines
    assert list(pickle.loads(pickle.dumps(second))) == list(first)
    monkeypatch.undo()
    # an edited manifest (one more row) makes the cache stale: rebuilt, same file name, new content
    with manifest.open("a") as handle:
        handle.write("{broken\n")
    third, report3 = load_line_table(manifest, scan_workers=1, progress=False, cache_min_rows=100)
    assert len(third) == 200 and report3.skipped["invalid_json"] == 1 and report3.rows_total == 201
    assert [p.name for p in manifest.parent.iterdir() if p.name.endswith(".arrow")] == [cached[0].name]
    # in error mode, a cache that counted bad rows is not enough: the row is named
    from lineclip.manifest import ManifestError

    with pytest.raises(ManifestError, match=r"lines.jsonl:201: invalid_json"):
        load_line_table(manifest, on_bad_row="error", progress=False, cache_min_rows=100)


def test_line_cache_depends_on_settings_and_survives_garbage(tmp_path):
    manifest = big_manifest(tmp_path, 150)
    load_line_table(manifest, max_pixels=40_000_000, progress=False, cache_min_rows=100)
    tiny_limit, _ = load_line_table(manifest, max_pixels=100, progress=False, cache_min_rows=100)
    assert (tiny_limit.sizes == SIZE_TOO_LARGE).all()  # another key: its own cache, not the first one's sizes
    caches = sorted(p for p in manifest.parent.iterdir() if p.name.endswith(".arrow"))
    assert len(caches) == 2
    for cache in caches:
        cache.write_bytes(b"garbage")
    again, _ = load_line_table(manifest, max_pixels=40_000_000, progress=False, cache_min_rows=100)
    assert len(again) == 150 and (again.sizes > 0).all()
    # small manifests get no cache file at all (the default threshold)
    small = write_manifest(tmp_path / "small" / "lines.jsonl", absolute_demo_rows(10))
    load_line_table(small, progress=False)
    assert [p.name for p in small.parent.iterdir()] == ["lines.jsonl"]


def test_line_cache_falls_back_to_the_run_dir_when_writing_beside_the_manifest_fails(tmp_path, monkeypatch):
    # A read-only manifest dir, simulated where the cache is written (root, as in CI, ignores chmod).
    import lineclip.sizes as sizes

    manifest = big_manifest(tmp_path, 120)
    real_mkstemp = sizes.tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if Path(dir) == manifest.parent:
            raise PermissionError(13, "Permission denied", str(dir))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(sizes.tempfile, "mkstemp", mkstemp)
    table, _ = load_line_table(manifest, fallback_dir=tmp_path / "run", progress=False, cache_min_rows=100)
    assert Path(table.cache_path).parent == tmp_path / "run" / "line_cache"
    key = json.loads(pa.ipc.open_file(table.cache_path).schema.metadata[b"lineclip"])["key"]
    assert Path(table.cache_path).name == cache_name(manifest, key) and key["manifest"] == str(manifest)
    monkeypatch.undo()
    again, _ = load_line_table(manifest, fallback_dir=tmp_path / "run", progress=False, cache_min_rows=100)
    assert again.cache_path == table.cache_path  # found there next time


def test_main_first_loads_on_the_main_process_before_the_others_and_never_strands_them():
    calls = []
    assert main_first(True, lambda: calls.append("barrier"), lambda: calls.append("load") or 1) == 1
    assert calls == ["load", "barrier"]
    calls.clear()
    main_first(False, lambda: calls.append("barrier"), lambda: calls.append("load"))
    assert calls == ["barrier", "load"]
    calls.clear()

    def fail():
        raise ValueError("bad manifest")

    with pytest.raises(ValueError):
        main_first(True, lambda: calls.append("barrier"), fail)
    assert calls == ["barrier"]  # the others were released, and fail on their own


def bad_rows_manifest(path: Path, n: int = 400) -> Path:
    """n rows of the demo lines with bad rows of every kind, duplicates of earlier rows among them (near and far)."""
    rows = absolute_demo_rows(160)
    lines = [json.dumps({**rows[i % 160], "id": f"r{i}"}, ensure_ascii=False) for i in range(n)]
    lines[7] = "{broken"
    lines[50] = json.dumps({**rows[3], "id": "r3"})  # a duplicate of line 4, chunks away
    lines[51] = "[1, 2]"
    lines[120] = json.dumps({"id": "x", "text": "ཀ"})
    lines[121] = ""
    lines[200] = json.dumps({**rows[9], "id": "r201"})  # claims the id of the row after it: that one is the dup
    lines[300] = json.dumps({**rows[0], "id": "r299"})  # duplicates the row after it (r299 is line 300)
    lines[301] = json.dumps({**rows[1], "id": "r299", "text": "\ud800"}, ensure_ascii=True).replace("\\\\", "\\")
    lines[350] = json.dumps({**rows[4], "id": "r4"})  # a duplicate of a row that is itself used
    lines[n - 1] = json.dumps({**rows[5], "line_path": "gone.jpg", "id": "last"})
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode() + b"\n\xff\xfe\n")
    return path


def test_streamed_parse_gives_the_one_shot_table_and_report(tmp_path, monkeypatch):
    import lineclip.manifest as manifest_module

    path = bad_rows_manifest(tmp_path / "m.jsonl")
    table, report = read_line_table(path)  # one chunk of 65,536 rows: the one-shot parse
    assert len(table.texts.chunks) == 1 and not table.texts.mapped
    assert report.skipped["duplicate_id"] == 4 and report.rows_total == 400 and report.rows_used == 390
    spill = tmp_path / "spill"
    spill.mkdir()
    runs = {"chunks of 7": read_line_table(path, chunk_rows=7),
            "chunks of 7, spilled": read_line_table(path, chunk_rows=7, spill_dir=spill),
            "chunks of 1, spilled after 50": read_line_table(path, chunk_rows=1, spill_dir=spill, spill_min_rows=50)}
    monkeypatch.setattr(manifest_module, "PARALLEL_PARSE_MIN_BYTES", 0)
    runs["pool, chunks of 5"] = read_line_table(path, workers=3, chunk_rows=5)  # 12 ranges of ~34 lines
    runs["pool, chunks of 5, spilled"] = read_line_table(path, workers=3, chunk_rows=5, spill_dir=spill)
    for name, (streamed, streamed_report) in runs.items():
        assert streamed_report.to_dict() == report.to_dict(), name
        assert list(streamed_report.first_bad) == list(report.first_bad), name  # the order one pass meets them in
        assert list(streamed) == list(table), name
        assert np.array_equal(streamed.sizes, table.sizes) and streamed.line_nos.equals(table.line_nos)
        assert streamed.texts.mapped == ("spilled" in name), name
        chunk = {"chunks of 7": 7, "chunks of 1": 1, "pool": 5}[name.split(",")[0]]
        assert max(len(rows) for rows in streamed.texts.chunks) <= chunk, name
    assert list(spill.iterdir()) == []  # the spill and the pool's parts are deleted (the mappings keep them)
    # the sizes read chunk by chunk from a spilled table (and with a memo cut short) are the headers'
    monkeypatch.setattr(sizes_module(), "_MEMO_FILES", 5)
    spilled = runs["chunks of 7, spilled"][0]
    expected = scan_sizes([spilled.image_paths[i] for i in range(len(spilled))], None, workers=1, progress=False)
    assert complete_sizes(spilled, None, workers=1, progress=False).sizes.tolist() == expected.tolist()


def sizes_module():
    import lineclip.sizes

    return lineclip.sizes


@pytest.mark.parametrize("chunk_rows", [None, 3])
def test_streamed_parse_in_error_mode_stops_at_the_same_row_with_the_same_message(tmp_path, chunk_rows):
    from lineclip.manifest import ManifestError

    rows = absolute_demo_rows(30)
    lines = [json.dumps(row, ensure_ascii=False) for row in rows]
    lines[19] = json.dumps({**rows[19], "id": "r2"})  # line 20 repeats line 3's id, chunks later
    lines[20] = "{broken"  # in the same chunk as line 20, after it
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ManifestError) as error:
        read_line_table(path, on_bad_row="error", chunk_rows=chunk_rows)
    assert str(error.value) == f"{path}:20: duplicate_id (id 'r2' already used at {path}:3)"
    lines[19] = json.dumps(rows[19])
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ManifestError, match=r"m.jsonl:21: invalid_json"):
        read_line_table(path, on_bad_row="error", chunk_rows=chunk_rows)


def test_seen_ids_find_exactly_the_ids_added_before():
    from lineclip.manifest import SeenIds, _id_digests

    rng = np.random.default_rng(0)
    seen, reference = SeenIds(), set()
    for size in rng.integers(1, 300, 40):
        ids = [f"id{v}" for v in rng.integers(0, 8000, size)]
        digests = _id_digests(ids)
        assert seen.contains(digests).tolist() == [i in reference for i in ids]
        new = {i: d for i, d in zip(ids, digests, strict=True) if i not in reference}
        seen.add(np.array(list(new.values()), dtype=np.uint64).reshape(-1, 2))
        reference |= set(new)
    assert len(seen) == len(reference) and len(seen.runs) <= int(np.log2(len(reference))) + 1
    sorted_runs = all((np.diff(first.astype(np.float64)) >= 0).all() for first, _ in seen.runs)
    assert sorted_runs and all(len(a[0]) > len(b[0]) for a, b in zip(seen.runs, seen.runs[1:], strict=False))


def test_streamed_parse_holds_one_chunk_whatever_the_number_of_rows(tmp_path, monkeypatch):
    """Memory, not time: the rows held in memory at once (the spill's own counter), and the Python heap's peak while
    parsing (tracemalloc), for N and 4N rows: the same chunk, and a peak that grows by little more than the
    16 bytes a row of the ids' digests (a one-shot parse's Python heap would grow with every row's ids)."""
    import tracemalloc

    import lineclip.manifest as manifest_module

    spills = []

    class Counted(manifest_module._Spill):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            spills.append(self)

    monkeypatch.setattr(manifest_module, "_Spill", Counted)
    peaks = {}
    for n in (1_000, 4_000):
        manifest = big_manifest(tmp_path / str(n), n)
        spill = tmp_path / f"spill{n}"
        spill.mkdir()
        tracemalloc.start()
        table, report = read_line_table(manifest, chunk_rows=50, spill_dir=spill)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert len(table) == report.rows_used == n and table.texts.mapped
        assert spills[-1].peak_rows <= 50  # one chunk in memory, then written on
        assert table[n - 1].text.endswith(f" {n - 1}")
    assert peaks[4_000] < peaks[1_000] * 1.25 + 16 * 3_000 * 2, peaks
