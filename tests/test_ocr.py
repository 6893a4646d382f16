"""Readings measured as OCR is (lineclip.transcripts) and the `ocr` level (lineclip.ocr, evaluate's eval.levels).

The level tests run the real engine (Tesseract with its Tibetan model) on bundled demo lines; without it they skip,
and LINECLIP_REQUIRE_OCR=1 (set by .ci/run, which installs tesseract-ocr and tesseract-ocr-bod) makes a missing
engine a failure."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import unicodedata
from pathlib import Path

import numpy as np
import pytest

if os.environ.get("LINECLIP_REQUIRE_OCR") != "1":
    pytest.importorskip("rapidfuzz")  # the optional extra lineclip[ocr] (in dev)
from rapidfuzz import fuzz  # noqa: E402

from lineclip import galleries, transcripts  # noqa: E402
from lineclip.config import asset_dir  # noqa: E402


def _expected(scores, correct, member=None, ks=(1, 5, 10)):
    """Expected R@k / MRR when the gallery is sorted by score (best first) and equal scores come in random order,
    by counting: a wrong items ahead of the best correct score, then c correct and w wrong items tied at it. The
    first correct item of the tie is at position j with probability C(w, j-1)/C(c+w, j-1) * c/(c+w-j+1)."""
    n_q = len(scores)
    out = dict.fromkeys([f"r{k}" for k in ks] + ["mrr"], 0.0)
    for q in range(n_q):
        items = [j for j in range(len(scores[q])) if member is None or member[q][j]]
        good = [j for j in items if correct[q][j]]
        if not good:
            continue
        best = max(scores[q][j] for j in good)
        a = sum(1 for j in items if not correct[q][j] and scores[q][j] > best)
        c = sum(1 for j in good if scores[q][j] == best)
        w = sum(1 for j in items if not correct[q][j] and scores[q][j] == best)
        for k in ks:
            t = k - a
            out[f"r{k}"] += 0.0 if t <= 0 else 1.0 if t > w else 1 - math.comb(w, t) / math.comb(c + w, t)
        out["mrr"] += sum(
            math.comb(w, j - 1) / math.comb(c + w, j - 1) * c / (c + w - j + 1) / (a + j) for j in range(1, w + 2)
        )
    return {key: value / n_q for key, value in out.items()}


# ----------------------------------------------------------------------------------------- pure functions


def test_character_error_rate_is_edits_over_reference_length():
    # kitten -> sitting: 3 edits over 7; "" -> "abc": 3 deletions... of the reference: 3 over 3; equal: 0
    hypotheses, references = ["kitten", "", "ཀཁག"], ["sitting", "abc", "ཀཁག"]
    assert transcripts.edit_distances(hypotheses, references).tolist() == [3, 3, 0]
    assert transcripts.character_error_rate(hypotheses, references) == pytest.approx(6 / 13)
    # Tibetan stacks are several code points: a wrong subjoined letter is one substitution
    assert transcripts.character_error_rate(["བསྒྲུབ"], ["བསྒྲིབ"]) == pytest.approx(1 / 6)
    with pytest.raises(ValueError):
        transcripts.character_error_rate(["a"], [""])


def test_readings_are_normalised_without_whitespace():
    assert transcripts.normalize_reading(" ཀ་ཁ\n །\tག ") == "ཀ་ཁ།ག"
    assert transcripts.normalize_reading("e\u0301 ") == "\u00e9"  # NFC composes


def test_every_offered_scorer_is_symmetric():
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("ཀཁགང་།"), size=rng.integers(0, 25))) for _ in range(60)]
    for name in transcripts.SCORERS:
        forward = transcripts.similarity(words[:30], words[30:], name)
        backward = transcripts.similarity(words[30:], words[:30], name)
        assert np.array_equal(forward, backward.T), name


def test_decode_then_match_levels_equal_an_independent_computation():
    texts = ["ཀ་ཁ་ག་ང་", "ཅ་ཆ་ཇ་ཉ་", "ཏ་ཐ་ད་ན་", "ཀ་ཁ་ག་ང་", "པ་ཕ་བ་མ་", "ཙ་ཚ་ཛ་ཝ་"]
    # noisy, empty (ties with everything), a reading of a duplicate, one that matches the wrong line best
    readings = ["ཀ་ཁ་ག", "", "ཏ་ཐ ད་ན", "ཀ་ཁ་ག་ང", "ཅ་ཆ་ཇ", "ཙ་ཚ་"]
    phrases = ["ཁ་ག་", "ཐ་ད་", "ཛ་"]
    ids = np.array([0, 1, 2, 0, 3, 4])
    groups = np.array([0, 0, 0, 1, 1, -1])  # the last line has no page: neither query nor gallery
    scores = transcripts.match_scores(readings, texts, phrases)
    norm = [transcripts.normalize_reading(r) for r in readings]
    t2i = [[fuzz.partial_ratio(texts[i], norm[j]) for j in range(6)] for i in range(6)]
    i2t = [[fuzz.partial_ratio(norm[i], texts[j]) for j in range(6)] for i in range(6)]
    assert np.array_equal(scores.t2i, np.array(t2i, np.float32))
    assert np.array_equal(scores.i2t, np.array(i2t, np.float32))
    correct = [[ids[i] == ids[j] for j in range(6)] for i in range(6)]
    lengths = galleries.text_bytes(texts)

    got = galleries.line_levels(ids, lengths, None, scores=scores.line_scores("read"))
    assert got["read_t2i"] == pytest.approx(_expected(t2i, correct))
    assert got["read_i2t"] == pytest.approx(_expected(i2t, correct))
    # The empty reading is equally far from every text: chance for its line, not a hit.
    assert _expected([i2t[1]], [correct[1]])["r1"] == pytest.approx(1 / 6)

    keep = [i for i in range(6) if groups[i] >= 0]
    sub = lambda m: [[m[i][j] for j in keep] for i in keep]  # noqa: E731
    member = [[groups[i] == groups[j] for j in keep] for i in keep]
    got = galleries.line_levels(ids, lengths, None, groups, scores=scores.line_scores("read"))
    assert got["read_t2i"] == pytest.approx(_expected(sub(t2i), sub(correct), member))
    assert got["read_i2t"] == pytest.approx(_expected(sub(i2t), sub(correct), member))

    answers = [np.array([j for j in range(6) if p in texts[j]]) for p in phrases]
    phrase_scores = [[fuzz.partial_ratio(p, norm[j]) for j in range(6)] for p in phrases]
    got = galleries.phrase_levels(
        answers, np.array([0, 2, 5]), galleries.text_bytes(phrases), 6, None, scores=scores.phrase_scores("read")
    )
    want = _expected(phrase_scores, [[j in a for j in range(6)] for a in answers])
    assert got["read_t2i"] == pytest.approx(want)
    assert want["r1"] > 0.5  # the phrases are found: the test is not comparing zeros


def test_level_names():
    assert galleries.level_names(True) == ["chance", "collection", "length"]
    assert galleries.level_names(False) == [] and galleries.level_names("ocr") == ["ocr"]
    with pytest.raises(ValueError, match="ocrr"):
        galleries.level_names(["chance", "ocrr"])


# ------------------------------------------------------------------------------------------ the real engine


def tesseract_missing() -> str | None:
    """Why Tesseract with its Tibetan model cannot run here, or None (fails under LINECLIP_REQUIRE_OCR=1)."""
    from lineclip.ocr import OcrOptions, OcrUnavailable, Tesseract

    try:
        Tesseract(OcrOptions())
    except OcrUnavailable as exc:
        if os.environ.get("LINECLIP_REQUIRE_OCR") == "1":
            pytest.fail(f"{exc} but LINECLIP_REQUIRE_OCR=1")
        return str(exc)
    return None


def _require_tesseract():
    missing = tesseract_missing()
    if missing is not None:
        pytest.skip(missing)


def test_tesseract_reads_demo_lines_once_then_from_the_cache(tmp_path, monkeypatch):
    _require_tesseract()
    from lineclip.ocr import OcrOptions, Tesseract, read_lines

    lines = sorted((asset_dir("demo") / "eval" / "lines").glob("*.jpg"))[:3]
    shutil.copy(lines[0], tmp_path / "same_bytes.jpg")  # read once: the cache is keyed by content
    paths = [str(p) for p in lines] + [str(tmp_path / "same_bytes.jpg")]
    options = OcrOptions(workers=2, cache_dir=str(tmp_path / "cache"))
    first = read_lines(paths, options)
    assert (first.n_read, first.n_cached, first.n_failed) == (3, 0, 0)
    assert first.raw[3] == first.raw[0]
    # A real reading: Tesseract's bod model gets most of a demo line (CER well below 1 on --psm 13).
    rows = {
        json.loads(x)["line_path"]: json.loads(x)["text"]
        for x in (asset_dir("demo") / "eval" / "meta" / "lines.jsonl").read_text().splitlines()
    }
    references = [transcripts.normalize_reading(rows[f"eval/lines/{p.name}"]) for p in lines]
    assert transcripts.character_error_rate(first.mode(13)[:3], references) < 0.8
    assert first.joined()[0] == first.mode(13)[0] + first.mode(6)[0]

    def no_ocr(*args, **kwargs):
        raise AssertionError("OCR ran although every line is cached")

    monkeypatch.setattr(Tesseract, "read_file", no_ocr)
    second = read_lines(paths, options)
    assert (second.n_read, second.n_cached) == (0, 3) and second.raw == first.raw
    # another mode list is another engine key: read anew, not served from the first one's entries
    monkeypatch.undo()
    third = read_lines(paths[:1], OcrOptions(modes=[13], cache_dir=str(tmp_path / "cache")))
    assert third.n_read == 1 and third.engine != first.engine and third.raw[0]["13"] == first.raw[0]["13"]


def test_missing_engine_or_model_says_how_to_install(tmp_path):
    from lineclip.ocr import OcrOptions, OcrUnavailable, read_lines

    with pytest.raises(OcrUnavailable, match="apt-get install tesseract-ocr tesseract-ocr-bod"):
        read_lines([], OcrOptions(binary=str(tmp_path / "no-tesseract")))
    if shutil.which("tesseract"):
        with pytest.raises(OcrUnavailable, match="no `xx_nope` language model"):
            read_lines([], OcrOptions(lang="xx_nope"))


# --------------------------------------------------------------------------------------- evaluate's level


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from usage_support import overfit_run

    return overfit_run(tmp_path_factory)


def _cached_readings(cache: Path, paths: list[str], modes: list[int]) -> list[str]:
    """Each image's joined reading, read straight from its cache file."""
    out = []
    for path in paths:
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        outputs = json.loads((cache / digest[:2] / f"{digest}.json").read_text(encoding="utf-8"))["outputs"]
        out.append("".join("".join(outputs[str(m)].split()) for m in modes))
    return [unicodedata.normalize("NFC", r) for r in out]


@pytest.mark.slow
def test_evaluate_ocr_level_equals_an_independent_computation(trained, tmp_path, monkeypatch, capsys):
    _require_tesseract()
    from usage_support import compose_config

    from lineclip.evaluate import evaluate
    from lineclip.manifest import read_manifest
    from lineclip.phrases import contains_phrase, sample_phrases

    run, data = trained
    overrides = [
        f"run_dir={run}",
        f"manifest={data['eval']}",
        "eval.gallery_by=page_id",
        "eval.queries=[line,phrase]",
        "eval.levels=[chance,ocr]",
        f"eval.ocr.cache_dir={tmp_path / 'cache'}",
        "eval.ocr.workers=2",
        f"eval.output={tmp_path / 'eval.json'}",
    ]
    result = evaluate(compose_config("evaluate", overrides))
    table = capsys.readouterr().out
    assert result["ocr"]["n_read"] + result["ocr"]["n_cached"] == 12 and result["ocr"]["n_failed"] == 0
    assert "t2i ocr" in table and "i2t ocr" in table and "ocr level: tesseract" in table
    assert set(result["levels"]) == {"chance", "ocr_t2i", "ocr_i2t"}  # length and collection not asked for

    records, _ = read_manifest(data["eval"])
    texts = [unicodedata.normalize("NFC", "".join(r.text.split())) for r in records]
    readings = _cached_readings(Path(result["ocr"]["cache_dir"]), [r.image_path for r in records], [13, 6])
    n = len(records)
    t2i = [[fuzz.partial_ratio(texts[i], readings[j]) for j in range(n)] for i in range(n)]
    i2t = [[fuzz.partial_ratio(readings[i], texts[j]) for j in range(n)] for i in range(n)]
    correct = [[records[i].text == records[j].text for j in range(n)] for i in range(n)]
    assert result["levels"]["ocr_t2i"] == pytest.approx(_expected(t2i, correct))
    assert result["levels"]["ocr_i2t"] == pytest.approx(_expected(i2t, correct))
    assert result["levels"]["ocr_t2i"]["r10"] > result["levels"]["chance"]["r10"]

    pages = [r.page_id for r in records]
    alone = [pages.count(p) == 1 for p in pages]
    member = [[pages[i] == pages[j] for j in range(n)] for i in range(n)]
    within = [[correct[i][j] and not alone[i] for j in range(n)] for i in range(n)]
    block = result["galleries"]["page_id"]["levels"]
    assert block["ocr_t2i"] == pytest.approx(_expected(t2i, within, member))
    assert block["ocr_i2t"] == pytest.approx(_expected(i2t, within, member))

    drawn = sample_phrases([r.text for r in records], 0, 2, 8)
    queries = [(p, i) for i, p in enumerate(drawn) if p is not None]
    phrase_scores = [[fuzz.partial_ratio("".join(p.split()), readings[j]) for j in range(n)] for p, _ in queries]
    answers = [[contains_phrase(records[j].text, p) for j in range(n)] for p, _ in queries]  # whole syllables
    assert result["phrase"]["levels"]["ocr_t2i"] == pytest.approx(_expected(phrase_scores, answers))
    cer = sum(
        _levenshtein(h, r)
        for h, r in zip(
            _cached_readings(Path(result["ocr"]["cache_dir"]), [r.image_path for r in records], [13]),
            texts,
            strict=True,
        )
    ) / sum(len(t) for t in texts)
    assert result["ocr"]["cer"]["13"] == pytest.approx(cer)

    # Again: every reading comes from the cache, no tesseract process reads a line, the numbers are the same.
    real_run = subprocess.run

    def no_line_reads(args, *a, **kw):
        assert "--psm" not in args, "OCR ran although every line is cached"
        return real_run(args, *a, **kw)

    monkeypatch.setattr(subprocess, "run", no_line_reads)
    again = evaluate(compose_config("evaluate", overrides))
    assert (
        again["ocr"]["n_read"] == 0 and again["ocr"]["n_cached"] == result["ocr"]["n_read"] + result["ocr"]["n_cached"]
    )
    assert again["levels"] == result["levels"] and again["phrase"]["levels"] == result["phrase"]["levels"]


def _levenshtein(a: str, b: str) -> int:
    """Textbook dynamic programme (an independent check of rapidfuzz's distance)."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


@pytest.mark.slow
def test_evaluate_without_the_engine_reports_the_other_levels(trained, tmp_path, caplog):
    from usage_support import compose_config

    from lineclip.evaluate import evaluate

    run, data = trained
    result = evaluate(
        compose_config(
            "evaluate",
            [
                f"run_dir={run}",
                f"manifest={data['eval']}",
                "eval.levels=[chance,collection,length,ocr]",
                f"eval.ocr.binary={tmp_path / 'no-tesseract'}",
                f"eval.output={tmp_path / 'eval.json'}",
            ],
        )
    )
    assert "tesseract-ocr-bod" in result["ocr"]["unavailable"]
    assert set(result["levels"]) == {"chance", "collection", "length_t2i", "length_i2t"}
    warnings = [r.getMessage() for r in caplog.records if "ocr level skipped" in r.getMessage()]
    assert len(warnings) == 1 and "apt-get install tesseract-ocr tesseract-ocr-bod" in warnings[0]
