"""The demo dataset bundled in lineclip/assets/demo is complete and consistent."""

from __future__ import annotations

import json
from importlib import resources
from importlib.resources.abc import Traversable

import pytest
from PIL import Image

DEMO = resources.files("lineclip") / "assets" / "demo"
KEYS = {"id", "line_path", "text", "collection", "page_id", "line_id", "orig_width", "orig_height"}
EXPECTED_COUNTS = {"train": 160, "eval": 40}


def _rows(split: str) -> list[dict]:
    manifest = DEMO / split / "meta" / "lines.jsonl"
    assert manifest.is_file(), f"missing {split}/meta/lines.jsonl in the package"
    text = manifest.read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _file(relative: str) -> Traversable:
    node = DEMO
    for part in relative.split("/"):
        node = node / part
    return node


@pytest.mark.parametrize("split", sorted(EXPECTED_COUNTS))
def test_manifest_rows_and_images(split: str) -> None:
    rows = _rows(split)
    assert len(rows) == EXPECTED_COUNTS[split]
    images = [p for p in (DEMO / split / "lines").iterdir() if p.name.endswith(".jpg")]
    assert len(images) == len(rows)  # no stray or missing files
    assert len({r["id"] for r in rows}) == len(rows)
    for row in rows:
        assert KEYS | {"width", "height"} <= row.keys(), row["id"]
        assert isinstance(row["text"], str) and row["text"].strip(), row["id"]
        assert row["line_path"].startswith(f"{split}/lines/"), row["line_path"]
        image_file = _file(row["line_path"])
        assert image_file.is_file(), row["line_path"]
        with image_file.open("rb") as f, Image.open(f) as im:
            im.load()
            assert im.format == "JPEG"
            assert im.size == (row["width"], row["height"]), row["id"]
        assert 1 <= row["height"] <= 56
        # Downscaling kept the aspect of the original line (to rounding).
        aspect = row["orig_width"] / row["orig_height"]
        assert abs(row["width"] - row["height"] * aspect) <= 1.0, row["id"]


def test_train_eval_disjoint() -> None:
    train, eval_ = _rows("train"), _rows("eval")
    assert not {r["id"] for r in train} & {r["id"] for r in eval_}
    assert not {r["page_id"] for r in train} & {r["page_id"] for r in eval_}
    # Both collections of the source are represented in both splits.
    assert {r["collection"] for r in train} == {r["collection"] for r in eval_} == {"TCCG", "proj19"}


def test_attribution_ships_with_the_data() -> None:
    notice = (resources.files("lineclip") / "assets" / "NOTICE").read_text(encoding="utf-8")
    readme = (DEMO / "README.md").read_text(encoding="utf-8")
    for text in (notice, readme):
        assert "mura4k/tibetan-ocr-finetuning" in text
        assert "b5e1d5b3988f3746e4887e5ec1de0efd3706d0f0" in text
        assert "Apache" in text
