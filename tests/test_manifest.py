"""Tests for lineclip.manifest: key aliases, path resolution, text normalisation, bad-row accounting."""

from __future__ import annotations

import json
import logging
import os
import pickle
import unicodedata
from pathlib import Path

import pytest
from PIL import Image

from lineclip.lines import LineRecord
from lineclip.manifest import (
    BAD_ROW_REASONS,
    IMAGE_KEYS,
    TEXT_KEYS,
    ManifestError,
    ManifestReport,
    normalize_text,
    read_manifest,
    resolve_image_path,
)

# Real transcriptions (tibetan_lines_dev, Derge Kangyur), copied here so tests never read ../shared.
TIB_1 = "༄༄༎དང་སྦྱོར་བར་བྱ༎ལྷོ་ལས་དབུ་མ་བཟུང་ནས་སུ༎ཐིག་ལེ་ང་རོ་ལྡན་པར་བྱ༎"
TIB_2 = "རྩོད་པ་དང་། །དགེ་འདུན་དབྱེན་རྣམས་བསྡུས་པ་ཡིན། །རབ་ཏུ་འབྱུང་བའི་གཞིའི་སྤྱི་སྡོམ་ལ།"
TIB_3 = "བློན་པོ་རྣམས་ཀྱིས་སྨྲས་པ། ལྷ་གྲོང་ན་ལ་ད་ན་བྲམ་ཟེ་གནས་ལེན་གྱི་བུ་ཞེས་བགྱི་བ"


def make_png(path: Path, size: tuple[int, int] = (40, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, "white").save(path)
    return path


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def read_one(manifest: Path, **kwargs: object) -> LineRecord:
    records, report = read_manifest(manifest, **kwargs)
    assert report.rows_used == len(records) == 1
    return records[0]


# --- key aliases ---------------------------------------------------------------------------------


@pytest.mark.parametrize("key", IMAGE_KEYS)
def test_every_image_key_alias_is_read(tmp_path: Path, key: str) -> None:
    image = make_png(tmp_path / "img.png")
    record = read_one(write_jsonl(tmp_path / "m.jsonl", [{key: "img.png", "text": TIB_1}]))
    assert record.image_path == str(image)


@pytest.mark.parametrize("key", TEXT_KEYS)
def test_every_text_key_alias_is_read(tmp_path: Path, key: str) -> None:
    make_png(tmp_path / "img.png")
    record = read_one(write_jsonl(tmp_path / "m.jsonl", [{"image": "img.png", key: TIB_2}]))
    assert record.text == TIB_2


def test_first_non_empty_alias_wins_in_alias_order_not_row_order(tmp_path: Path) -> None:
    make_png(tmp_path / "a.png")
    make_png(tmp_path / "b.png")
    row = {
        "path": "b.png",  # last image alias, first in the row: must lose to line_path
        "image": "",
        "image_path": None,
        "line_path": "a.png",
        "src__label": TIB_3,
        "text": "   ",
        "transcription": 5,  # not a string: skipped
        "label": TIB_1,
    }
    record = read_one(write_jsonl(tmp_path / "m.jsonl", [row]))
    assert record.image_path == str(tmp_path / "a.png")
    assert record.text == TIB_1


def test_bdrc_style_keys_and_src_id_is_not_an_id(tmp_path: Path) -> None:
    make_png(tmp_path / "train" / "lines" / "11_TCCG_001.jpg.png")
    rows = [
        {"src__image": "train/lines/11_TCCG_001.jpg.png", "src__label": TIB_1, "src__id": "11_TCCG_001"},
        {"src__image": "train/lines/11_TCCG_001.jpg.png", "src__text": TIB_2, "src__id": "11_TCCG_002"},
    ]
    records, report = read_manifest(write_jsonl(tmp_path / "bdrc_style_keys.jsonl", rows))
    assert report.rows_used == 2
    assert [r.sample_id for r in records] == ["bdrc_style_keys:1", "bdrc_style_keys:2"]
    assert [r.text for r in records] == [TIB_1, TIB_2]
    assert records[0].extra["src__id"] == "11_TCCG_001"


def test_ids_and_extra_fields(tmp_path: Path) -> None:
    make_png(tmp_path / "img.png")
    rows = [
        {
            "id": 7,
            "image": "img.png",
            "text": TIB_1,
            "doc_id": "W1",
            "page_id": "TCCG:11",
            "line_id": 3,
            "collection": "TCCG",
            "orig_width": 1607,
            "flag": True,
            "nested": {"a": 1},
            "none": None,
        },
        {"sample_id": "s2", "image": "img.png", "text": TIB_2},
        {"id": "", "sample_id": 9, "image": "img.png", "text": TIB_3},
        {"image": "img.png", "text": TIB_3},
    ]
    records, _ = read_manifest(write_jsonl(tmp_path / "m.jsonl", rows))
    assert [r.sample_id for r in records] == ["7", "s2", "9", "m:4"]
    first = records[0]
    assert (first.doc_id, first.page_id, first.line_id) == ("W1", "TCCG:11", "3")
    assert dict(first.extra) == {"collection": "TCCG", "orig_width": "1607", "flag": "true"}
    assert records[1].line_id == "" and records[1].doc_id == ""
    assert first.source == f"{tmp_path / 'm.jsonl'}:1"


def test_record_is_frozen_hashable_and_picklable(tmp_path: Path) -> None:
    record = LineRecord("a", "/x.png", TIB_1, extra={"collection": "TCCG"})
    assert record.extra["collection"] == "TCCG"
    assert hash(record) == hash(LineRecord("a", "/x.png", TIB_1, extra={"collection": "TCCG"}))
    assert pickle.loads(pickle.dumps(record)) == record
    with pytest.raises(AttributeError):
        record.text = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        record.extra["collection"] = "y"  # type: ignore[index]


# --- path resolution -----------------------------------------------------------------------------


def test_openpecha_layout_paths_relative_to_root_and_split(tmp_path: Path) -> None:
    root = tmp_path / "tibetan_lines_dev"
    a = make_png(root / "train" / "lines" / "a.png")
    b = make_png(root / "train" / "lines" / "b.png")
    c = make_png(root / "train" / "meta" / "c.png")
    rows = [
        {"id": "a", "line_path": "train/lines/a.png", "text": TIB_1},  # relative to <root> (grandparent)
        {"id": "b", "line_path": "lines/b.png", "text": TIB_2},  # relative to <root>/<split> (parent)
        {"id": "c", "line_path": "c.png", "text": TIB_3},  # relative to the manifest's folder
    ]
    records, report = read_manifest(write_jsonl(root / "train" / "meta" / "lines.jsonl", rows))
    assert [r.image_path for r in records] == [str(a), str(b), str(c)]
    assert all(os.path.isabs(r.image_path) for r in records)
    assert report.summary() == "train lines.jsonl: 3 of 3 rows used"


def test_manifest_folder_wins_over_parent(tmp_path: Path) -> None:
    make_png(tmp_path / "x.png")
    near = make_png(tmp_path / "meta" / "x.png")
    manifest = tmp_path / "meta" / "m.jsonl"
    assert resolve_image_path("x.png", manifest, None) == near


def test_dataset_dir_then_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = write_jsonl(tmp_path / "a" / "b" / "c" / "m.jsonl", [])
    data = tmp_path / "data"
    elsewhere = tmp_path / "elsewhere"
    in_data = make_png(data / "x" / "img.png")
    in_cwd = make_png(elsewhere / "x" / "img.png")
    only_cwd = make_png(elsewhere / "y.png")
    monkeypatch.chdir(elsewhere)
    assert resolve_image_path("x/img.png", manifest, data) == in_data
    assert resolve_image_path("x/img.png", manifest, None) == in_cwd
    assert resolve_image_path("y.png", manifest, data) == only_cwd
    assert resolve_image_path("nope.png", manifest, data) is None


def test_dataset_dir_in_read_manifest(tmp_path: Path) -> None:
    image = make_png(tmp_path / "data" / "lines" / "img.png")
    row = {"image": "lines/img.png", "text": TIB_1}
    manifest = write_jsonl(tmp_path / "m1" / "m2" / "m3" / "m.jsonl", [row])
    with pytest.raises(ManifestError):
        read_manifest(manifest)
    assert read_one(manifest, dataset_dir=tmp_path / "data").image_path == str(image)
    assert read_one(manifest, dataset_dir=str(tmp_path / "data")).image_path == str(image)


def test_absolute_path(tmp_path: Path) -> None:
    image = make_png(tmp_path / "imgs" / "img.png")
    record = read_one(write_jsonl(tmp_path / "m" / "m.jsonl", [{"image": str(image), "text": TIB_1}]))
    assert record.image_path == str(image)
    assert resolve_image_path(str(tmp_path / "imgs" / "missing.png"), tmp_path / "m.jsonl", None) is None


# --- text normalisation --------------------------------------------------------------------------


def test_normalize_text_nfc() -> None:
    # U+0F73 (vowel sign ii) is composition-excluded, so NFC spells it as aa + i; and vowel signs typed
    # i-before-aa are reordered by canonical combining class. All three spellings must agree.
    decomposed = "\u0f40\u0f71\u0f72"
    precomposed = "\u0f40\u0f73"
    misordered = "\u0f40\u0f72\u0f71"
    expected = unicodedata.normalize("NFC", decomposed)
    assert normalize_text(decomposed) == normalize_text(precomposed) == normalize_text(misordered) == expected
    assert unicodedata.is_normalized("NFC", normalize_text(precomposed))
    # Latin sanity check: e + combining acute -> é.
    assert normalize_text("caf\u0065\u0301") == "caf\u00e9"


def test_normalize_text_whitespace() -> None:
    assert normalize_text(f"  {TIB_1}\t\t{TIB_2}\n{TIB_3}\r\n") == f"{TIB_1} {TIB_2} {TIB_3}"
    # NBSP and ideographic space count as whitespace (str.split semantics).
    assert normalize_text("ཀ་\u00a0\u3000ཁ་") == "ཀ་ ཁ་"
    # Tsheg variants and zero-width characters are content, not whitespace.
    assert normalize_text("ཀ\u0f0cཁ\u200bག") == "ཀ\u0f0cཁ\u200bག"
    assert normalize_text(" \t\n ") == ""
    assert normalize_text(normalize_text(f" {TIB_2}  ")) == TIB_2


def test_records_hold_normalised_text(tmp_path: Path) -> None:
    make_png(tmp_path / "img.png")
    raw = f"  {TIB_1}  \t{TIB_2}\n\u0f40\u0f72\u0f71 "
    record = read_one(write_jsonl(tmp_path / "m.jsonl", [{"image": "img.png", "text": raw}]))
    assert record.text == f"{TIB_1} {TIB_2} " + unicodedata.normalize("NFC", "\u0f40\u0f72\u0f71")


# --- bad rows ------------------------------------------------------------------------------------


def bad_rows_manifest(tmp_path: Path) -> Path:
    make_png(tmp_path / "ok.png")
    good = {"image": "ok.png", "text": TIB_1}
    lines: list[bytes] = [
        json.dumps({**good, "id": "g1"}).encode(),  # 1 good
        b'{"image": "ok.png", "text": ',  # 2 invalid_json
        b"",  # 3 blank: ignored, not bad
        json.dumps(["ok.png", TIB_1]).encode(),  # 4 not_an_object
        json.dumps({"text": TIB_2, "image": ""}).encode(),  # 5 no_image_key
        json.dumps({"image": "missing.png", "text": TIB_2}).encode(),  # 6 image_not_found
        json.dumps({**good, "id": "dup"}, ensure_ascii=False).encode(),  # 7 good
        json.dumps({"image": "ok.png", "id": "x"}).encode(),  # 8 no_text_key
        json.dumps({"image": "ok.png", "text": " \t "}).encode(),  # 9 empty_text
        json.dumps({**good, "id": "dup"}).encode(),  # 10 duplicate_id
        b'{"image": "ok.png", "text": "\xff\xfe\xbd"}',  # 11 invalid_utf8
        b"   ",  # 12 whitespace only: ignored
        json.dumps({"image": "ok.png", "text": TIB_3}, ensure_ascii=False).encode(),  # 13 good
        json.dumps({"image": "ok.png", "text": TIB_1 * 400}, ensure_ascii=False).encode(),  # 14 text_too_long
        b'{"image": "ok.png", "text": "\\ud800 lone surrogate"}',  # 15 invalid_unicode (valid UTF-8, bad JSON escape)
    ]
    path = tmp_path / "lines.jsonl"
    path.write_bytes(b"\r\n".join(lines) + b"\r\n")
    return path


EXPECTED_FIRST_BAD_LINE = {
    "invalid_json": 2,
    "not_an_object": 4,
    "no_image_key": 5,
    "image_not_found": 6,
    "no_text_key": 8,
    "empty_text": 9,
    "duplicate_id": 10,
    "invalid_utf8": 11,
    "text_too_long": 14,
    "invalid_unicode": 15,
}


def test_every_bad_row_kind_is_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    manifest = bad_rows_manifest(tmp_path)
    assert set(EXPECTED_FIRST_BAD_LINE) == set(BAD_ROW_REASONS)
    with caplog.at_level(logging.WARNING, logger="lineclip.manifest"):
        records, report = read_manifest(manifest)
    assert isinstance(report, ManifestReport)
    assert [r.sample_id for r in records] == ["g1", "dup", "lines:13"]
    assert [r.text for r in records] == [TIB_1, TIB_1, TIB_3]
    assert report.rows_used == 3
    assert report.rows_total == 13
    assert report.skipped == dict.fromkeys(BAD_ROW_REASONS, 1)
    assert report.first_bad == {reason: f"{manifest}:{n}" for reason, n in EXPECTED_FIRST_BAD_LINE.items()}
    assert report.summary() == (
        "lines.jsonl: 3 of 13 rows used; skipped: invalid_json=1, not_an_object=1, no_image_key=1, "
        "image_not_found=1, no_text_key=1, empty_text=1, duplicate_id=1, invalid_utf8=1, text_too_long=1, "
        "invalid_unicode=1"
    )
    assert report.summary(label="val").startswith("val: 3 of 13")
    as_dict = report.to_dict()
    assert json.loads(json.dumps(as_dict)) == as_dict
    assert as_dict["skipped"]["invalid_utf8"] == 1 and as_dict["manifest"] == str(manifest)
    warnings = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
    assert len(warnings) == 1 and "3 of 13 rows used" in warnings[0] and f"{manifest}:2" in warnings[0]


def test_clean_manifest_reports_zero_for_every_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_png(tmp_path / "img.png")
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"image": "img.png", "text": TIB_1}])
    with caplog.at_level(logging.INFO, logger="lineclip.manifest"):
        _, report = read_manifest(manifest)
    assert report.skipped == dict.fromkeys(BAD_ROW_REASONS, 0)
    assert report.first_bad == {}
    assert [rec.levelno for rec in caplog.records] == [logging.INFO]


def test_error_mode_names_file_and_line_of_first_bad_row(tmp_path: Path) -> None:
    manifest = bad_rows_manifest(tmp_path)
    with pytest.raises(ManifestError) as excinfo:
        read_manifest(manifest, on_bad_row="error")
    message = str(excinfo.value)
    assert message.startswith(f"{manifest}:2: invalid_json (")
    assert "\n" not in message


def test_error_mode_image_not_found_detail(tmp_path: Path) -> None:
    make_png(tmp_path / "ok.png")
    manifest = write_jsonl(
        tmp_path / "m.jsonl",
        [{"image": "ok.png", "text": TIB_1}, {"image": "lines/missing.png", "text": TIB_2}],
    )
    with pytest.raises(ManifestError, match=r"m\.jsonl:2: image_not_found \(image='lines/missing\.png'"):
        read_manifest(manifest, on_bad_row="error")


def test_duplicate_of_a_bad_row_is_not_a_duplicate(tmp_path: Path) -> None:
    make_png(tmp_path / "ok.png")
    rows = [{"id": "a", "image": "gone.png", "text": TIB_1}, {"id": "a", "image": "ok.png", "text": TIB_2}]
    records, report = read_manifest(write_jsonl(tmp_path / "m.jsonl", rows))
    assert [r.text for r in records] == [TIB_2]
    assert report.skipped["image_not_found"] == 1 and report.skipped["duplicate_id"] == 0


def test_utf8_bom_on_first_line(tmp_path: Path) -> None:
    make_png(tmp_path / "img.png")
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(b"\xef\xbb\xbf" + json.dumps({"image": "img.png", "text": TIB_1}).encode() + b"\n")
    assert read_one(manifest).text == TIB_1


def test_empty_and_all_bad_manifests_raise(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ManifestError, match="empty.jsonl"):
        read_manifest(empty)
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n\n")
    with pytest.raises(ManifestError, match="0 of 0 rows used"):
        read_manifest(blank)
    all_bad = write_jsonl(
        tmp_path / "bad.jsonl", [{"image": "a.png", "text": TIB_1}, {"image": "b.png", "text": TIB_2}, [1]]
    )
    with pytest.raises(ManifestError) as excinfo:
        read_manifest(all_bad)
    message = str(excinfo.value)
    assert "0 of 3 rows used" in message
    assert "image_not_found=2" in message and "not_an_object=1" in message
    assert f"{all_bad}:1" in message


def test_missing_manifest_and_bad_option(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest(tmp_path / "nope.jsonl")
    with pytest.raises(ManifestError, match="not a file"):
        read_manifest(tmp_path)
    make_png(tmp_path / "img.png")
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"image": "img.png", "text": TIB_1}])
    with pytest.raises(ValueError, match="on_bad_row"):
        read_manifest(manifest, on_bad_row="ignore")
    assert issubclass(ManifestError, ValueError)
