"""Synthetic line generator: determinism, the manifest contract, the look's basics, the RAQM guard, the CLI."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.features
import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from PIL import Image

from lineclip.config import asset_dir, compose
from lineclip.manifest import normalize_text, read_manifest
from lineclip.synth import (
    SynthConfig,
    SynthError,
    compose_text,
    find_fonts,
    generate,
    line_seed,
    load_corpus,
    resolve_config,
)

ROOT = Path(__file__).resolve().parent.parent


def _run(out: Path, **overrides: object) -> Path:
    generate(SynthConfig(out_dir=str(out), progress=False, **overrides))  # type: ignore[arg-type]
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _rows(manifest: Path) -> list[dict]:
    return [json.loads(line) for line in manifest.read_text("utf-8").splitlines()]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _run(tmp_path_factory.mktemp("synth") / "ds", n_lines=16, eval_fraction=0.25, seed=3, workers=1)


def test_same_seed_is_byte_identical_for_any_worker_count(dataset: Path, tmp_path: Path) -> None:
    again = _run(tmp_path / "again", n_lines=16, eval_fraction=0.25, seed=3, workers=2, chunk_size=5)
    first, second = _files(dataset), _files(again)
    assert len(first) == 16 + 2 and first.keys() == second.keys()
    assert all(first[name] == second[name] for name in first)
    other = _files(_run(tmp_path / "other", n_lines=4, eval_fraction=0.0, seed=4, workers=1))
    assert other["train/lines/synth_0000000.png"] != first["train/lines/synth_0000000.png"]


def test_manifests_read_back_without_a_skipped_row(dataset: Path) -> None:
    pages = {}
    for split, count in (("train", 12), ("eval", 4)):
        manifest = dataset / split / "meta" / "lines.jsonl"
        records, report = read_manifest(manifest, on_bad_row="error")
        assert report.rows_used == count and report.rows_skipped == 0
        rows = _rows(manifest)
        assert [r["id"] for r in rows] == [rec.sample_id for rec in records]
        for row, record in zip(rows, records, strict=True):
            assert row["text"] == normalize_text(row["text"]) == record.text and row["text"]
            assert row["line_path"] == f"{split}/lines/{row['id']}.png"
            assert Path(record.image_path) == (dataset / row["line_path"]).resolve()
            assert record.doc_id and record.page_id and record.line_id
            assert row["font"] in {"NotoSerifTibetan-Regular.ttf", "DDC_Uchen.ttf"}
        pages[split] = {record.page_id for record in records}
    assert not pages["train"] & pages["eval"]  # eval lines come from pages that train never uses


def test_images_have_the_documented_size_and_mode(dataset: Path) -> None:
    cfg = SynthConfig(out_dir="unused")
    for split in ("train", "eval"):
        for row in _rows(dataset / split / "meta" / "lines.jsonl"):
            image = Image.open(dataset / row["line_path"])
            assert image.format == "PNG" and image.size == (row["width"], row["height"])
            assert image.mode == ("L" if row["style"] == "binarized" else "RGB")
            assert cfg.height[0] <= image.height <= cfg.height[1]
            assert image.width >= 2 * image.height  # a line, not a word


def test_every_line_has_ink_in_its_central_band(dataset: Path) -> None:
    for row in _rows(dataset / "train" / "meta" / "lines.jsonl"):
        grey = np.asarray(Image.open(dataset / row["line_path"]).convert("L"), dtype=np.float32)
        height = grey.shape[0]
        band = grey[int(height * 0.3):int(height * 0.7)]
        paper = float(np.median(grey))
        dark = (band < 0.6 * paper).mean()
        assert 0.02 < dark < 0.8, f"{row['id']}: {dark:.3f} of the central band is ink"


def test_clean_render_and_grayscale(tmp_path: Path) -> None:
    out = _run(tmp_path / "clean", n_lines=4, eval_fraction=0.0, degradation=0.0, grayscale=True, p_binarized=0.0)
    assert not (out / "eval").exists()
    for row in _rows(out / "train" / "meta" / "lines.jsonl"):
        image = Image.open(out / row["line_path"])
        assert image.mode == "L" and row["style"] == "paper"
        assert (np.asarray(image) < 100).any()


def test_text_is_a_syllable_run_of_its_corpus_line() -> None:
    corpus = load_corpus(asset_dir("corpus") / "derge_kangyur_lines.jsonl.gz")
    cfg = SynthConfig(out_dir="unused", p_yig_mgo=0.0, p_double_shad=0.0, p_cut=1.0)
    for index in range(200):
        line = corpus[index * 7]
        text, double = compose_text(line_seed(0, index), line, 60, cfg)
        assert not double and text == normalize_text(text)
        start = line.text.find(text)
        assert start >= 0, (text, line.text)
        assert start == 0 or line.text[start - 1] in "་ "  # starts at a syllable boundary
        assert len(text) <= max(60, len(line.text.split("་")[0]) + 1) + 2


def test_line_start_marks_and_double_shads(tmp_path: Path) -> None:
    out = _run(tmp_path / "marks", n_lines=6, eval_fraction=0.0, p_yig_mgo=1.0, p_double_shad=1.0)
    for row in _rows(out / "train" / "meta" / "lines.jsonl"):
        assert row["text"].startswith("༄") and "། །" not in row["text"]


def test_no_raqm_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(PIL.features, "check", lambda feature: False)
    with pytest.raises(SynthError, match=r"RAQM.*features.check\('raqm'\) is False"):
        _run(tmp_path / "none", n_lines=2)
    assert not (tmp_path / "none").exists()


def test_bad_options_and_existing_output(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(SynthError, match="eval_fraction"):
        _run(tmp_path / "x", n_lines=2, eval_fraction=1.0)
    with pytest.raises(SynthError, match="p_jpeg"):
        _run(tmp_path / "x", n_lines=2, p_jpeg=2.0)
    with pytest.raises(SynthError, match="font"):
        _run(tmp_path / "x", n_lines=2, font=str(tmp_path))
    with pytest.raises(SynthError, match="overwrite=true"):
        _run(dataset, n_lines=2)
    out = _run(tmp_path / "ow", n_lines=6, eval_fraction=0.5)
    _run(out, n_lines=3, eval_fraction=0.0, overwrite=True)
    assert len(list((out / "train" / "lines").iterdir())) == 3 and len(_rows(out / "train/meta/lines.jsonl")) == 3
    assert not (out / "eval" / "lines").exists() and not (out / "eval" / "meta" / "lines.jsonl").exists()


def test_bundled_assets_and_config() -> None:
    corpus = load_corpus(asset_dir("corpus") / "derge_kangyur_lines.jsonl.gz")
    assert len(corpus) > 4000 and all(line.text for line in corpus)
    assert [p.name for p in find_fonts(asset_dir("fonts"))] == ["DDC_Uchen.ttf", "NotoSerifTibetan-Regular.ttf"]
    for name in ("OFL-1.1_DDC_Uchen.txt", "OFL-1.1_NotoSerifTibetan.txt", "README.md"):
        assert (asset_dir("fonts") / name).is_file()
    cfg = compose("synth", ["out_dir=/tmp/x", "n_lines=5", "font=/tmp"])
    with pytest.raises(ConfigCompositionException):
        compose("synth", ["n_line=5"])
    resolved = resolve_config(cfg)
    assert resolved.n_lines == 5 and resolved.font == "/tmp" and Path(resolved.corpus).is_file()
    assert OmegaConf.to_container(cfg)["height"] == [60, 112]


def test_cli(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    run = subprocess.run([sys.executable, "-m", "lineclip.synth", f"out_dir={out}", "n_lines=12", "workers=2"],
                         cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "lines/s" in run.stdout
    assert len(_rows(out / "train/meta/lines.jsonl")) + len(_rows(out / "eval/meta/lines.jsonl")) == 12
    assert (out / ".hydra" / "config.yaml").is_file()
    bad = subprocess.run([sys.executable, "-m", "lineclip.synth", f"out_dir={out}", "n_lines=12"],
                         cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "overwrite=true" in bad.stdout + bad.stderr
    assert "Traceback" not in bad.stdout + bad.stderr


def test_progress_shows_lines_done_and_the_rate(tmp_path: Path, capsys: pytest.CaptureFixture,
                                               caplog: pytest.LogCaptureFixture) -> None:
    # Under pytest stderr is no terminal: no bar (its redraws would fill a log), a log line every 10% instead.
    with caplog.at_level(logging.INFO):
        generate(SynthConfig(out_dir=str(tmp_path / "bar"), n_lines=4, chunk_size=2, workers=1, eval_fraction=0.0,
                             progress=True))  # type: ignore[arg-type]
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("synth: ")]
    assert said and "synth: 4/4 lines (100%)" in said[-1] and "lines/s" in said[-1], said
    assert "synth" not in capsys.readouterr().err
    caplog.clear()
    with caplog.at_level(logging.INFO):
        _run(tmp_path / "quiet", n_lines=2, workers=1, eval_fraction=0.0)  # progress=False: no progress at all
    assert not [r for r in caplog.records if r.getMessage().startswith("synth: ")]
