"""The reading head measured as OCR is (issue 20, part 1): greedy CTC decoding, val_cer and decode-then-match in
validation, the head saved beside the bundle (never in it), and evaluate's rows from it."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from lineclip.reading import (
    BLANK,
    OTHER_CHAR,
    OTHER_CLASS,
    SPACE_CLASS,
    VOCAB_SIZE,
    ReadingHead,
    char_class,
    class_char,
    greedy_decode,
    load_reading_head,
    readable_text,
    save_reading_head,
)

if os.environ.get("LINECLIP_REQUIRE_OCR") != "1":
    pytest.importorskip("rapidfuzz")  # the optional extra lineclip[ocr] (in dev)


def test_class_char_inverts_char_class():
    for index in range(1, 257):
        assert char_class(class_char(index)) == index
    assert class_char(BLANK) == "" and class_char(SPACE_CLASS) == " " and class_char(OTHER_CLASS) == OTHER_CHAR
    assert readable_text("ཀ་ 7a") == "ཀ་ " + OTHER_CHAR * 2
    with pytest.raises(ValueError):
        class_char(VOCAB_SIZE)


def test_greedy_decode_collapses_repeats_and_drops_blanks():
    ka, kha = char_class("ཀ"), char_class("ཁ")
    # frame by frame: ka ka blank ka kha kha blank blank space ka  ->  ka, ka (a blank between), kha, space, ka
    best = [ka, ka, BLANK, ka, kha, kha, BLANK, BLANK, SPACE_CLASS, ka]
    logits = torch.full((2, len(best), VOCAB_SIZE), -5.0)
    for t, c in enumerate(best):
        logits[0, t, c] = 3.0
    logits[1, :, BLANK] = 1.0  # all blank: nothing read
    logits[1, 4, OTHER_CLASS] = 2.0
    assert greedy_decode(logits) == ["ཀཀཁ ཀ", OTHER_CHAR]


def test_reading_head_file_round_trip_and_refusals(tmp_path):
    head = ReadingHead(hidden_size=8, frames_per_column=3)
    torch.nn.init.normal_(head.proj.weight)
    save_reading_head(head, tmp_path, "abc")
    config = json.loads((tmp_path / "reading_head.json").read_text())
    assert config["frames_per_column"] == 3 and config["hidden_size"] == 8 and config["bundle_fingerprint"] == "abc"
    loaded, why = load_reading_head(tmp_path, "abc")
    tokens = torch.randn(2, 4 * 5, 8)
    torch.testing.assert_close(loaded(tokens, rows=4), head(tokens, rows=4))
    assert load_reading_head(tmp_path, "other model")[0] is None  # trained with another bundle: refused
    (tmp_path / "reading_head.safetensors").write_bytes(b"not safetensors")
    refused, why = load_reading_head(tmp_path, "abc")
    assert refused is None and "reading_head.safetensors" in why


def test_reading_metrics_decode_then_match_against_an_independent_computation():
    from rapidfuzz import fuzz
    from test_ocr import _expected

    from lineclip.galleries import ValidationPlan
    from lineclip.lines import LineRecord
    from lineclip.metrics import text_ids
    from lineclip.transcripts import reading_metrics

    texts = ["ཀ་ཁ་ག་ང་ཅ་", "ཆ་ཇ་ཉ་ཏ་ཐ་", "ད་ན་པ་ཕ་བ་", "མ་ཙ་ཚ་ཛ་ཝ་"]
    readings = ["ཀཁ་ག་ང", "", "ད་ནཔ་ཕ", "ཆ་ཇ་"]  # line 3's reading looks like line 1's text
    records = [LineRecord(str(i), "x.jpg", t, page_id=f"p{i // 2}") for i, t in enumerate(texts)]
    plan = ValidationPlan.build(records, ("page_id",), True, 0, 2, 3, levels=False)
    ids = text_ids(texts)
    got = reading_metrics(readings, texts, ids, plan)
    # Edits by hand (each text is 10 code points): ཀ་ཁ་ག་ང་ཅ་ -> ཀཁ་ག་ང: drop the first tsheg and the final ་ཅ་ (4);
    # nothing read (10); ད་ན་པ་ཕ་བ་ -> ད་ནཔ་ཕ: 1 + 3 (4); མ་ཙ་ཚ་ཛ་ཝ་ -> ཆ་ཇ་: 2 substitutions, 6 deletions (8).
    edits = [4, 10, 4, 8]
    assert got["cer"] == pytest.approx(sum(edits) / 40)
    scores = [[fuzz.ratio(t, r) for r in readings] for t in texts]  # edit similarity for lines
    correct = [[i == j for j in range(4)] for i in range(4)]
    assert {k: got[f"read_t2i_{k}"] for k in ("r1", "r5", "r10", "mrr")} == pytest.approx(_expected(scores, correct))
    i2t = [[fuzz.ratio(r, t) for t in texts] for r in readings]
    assert {k: got[f"read_i2t_{k}"] for k in ("r1", "r5", "r10", "mrr")} == pytest.approx(_expected(i2t, correct))
    member = [[i // 2 == j // 2 for j in range(4)] for i in range(4)]
    assert got["page_read_t2i_r1"] == pytest.approx(_expected(scores, correct, member)["r1"])
    phrase_scores = [[fuzz.partial_ratio(p, r) for r in readings] for p in plan.phrases]
    answers = [[j in a for j in range(4)] for a in plan.answers]
    assert got["phrase_read_t2i_r1"] == pytest.approx(_expected(phrase_scores, answers)["r1"])
    assert got["read_t2i_r1"] < 1.0 < 4 * got["read_t2i_r1"]  # neither all hits nor all misses


@pytest.mark.slow
def test_a_run_with_the_reading_loss_logs_val_cer_and_keeps_its_head_beside_the_bundle(tmp_path, capsys):
    from test_ocr import tesseract_missing
    from usage_support import compose_config, make_dataset, train_run

    from lineclip.bundle import BUNDLE_ENTRIES, BundleRef, model_fingerprint
    from lineclip.evaluate import evaluate

    data = make_dataset(tmp_path / "data")
    run = tmp_path / "run"
    # The same run checks the ocr level in validation (trainer.val_levels) when Tesseract is here.
    with_ocr = tesseract_missing() is None
    ocr = [f"trainer.val_ocr.cache_dir={tmp_path / 'ocr'}", "trainer.val_ocr.workers=2"]
    train_run(
        run,
        data["root"],
        data["train"],
        "loss.reading_weight=1.0",
        "loss.reading_frames_per_column=4",
        "trainer.max_steps=4",
        "trainer.eval_every_steps=2",
        "trainer.checkpoint_every_steps=100",
        f"data.val_manifest={data['eval']}",
        *(["trainer.val_levels=[chance,ocr]", *ocr] if with_ocr else []),
    )
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    validations = [r for r in rows if "val_cer" in r]
    assert [r["step"] for r in validations] == [2, 4]
    for row in validations:
        assert 0.0 <= row["val_cer"] and 0.0 <= row["val_read_t2i_r1"] <= 1.0
        assert {"val_read_i2t_r10", "val_page_read_t2i_mrr", "val_phrase_read_t2i_r10"} <= set(row)
    assert "val_cer" in json.loads((run / "training_config.json").read_text())["val_metrics"]
    # beside the bundle, never in it: the bundle's entries are unchanged and hold no reading weights
    head = json.loads((run / "reading_head.json").read_text())
    assert head["bundle_fingerprint"] == model_fingerprint(BundleRef(run, ""))
    assert (run / "reading_head.safetensors").is_file()
    backbone = run / BUNDLE_ENTRIES[0]
    assert not any("reading" in p.name for p in backbone.rglob("*"))
    for entry in BUNDLE_ENTRIES:
        if (run / entry).is_file() and entry.endswith(".pt"):
            state = torch.load(run / entry, weights_only=True)["state_dict"]
            assert not any("reading" in k for k in state)

    result = evaluate(
        compose_config(
            "evaluate",
            [
                f"run_dir={run}",
                f"manifest={data['eval']}",
                "eval.levels=false",
                "eval.gallery_by=page_id",
                "eval.queries=[line,phrase]",
                f"eval.output={tmp_path / 'eval.json'}",
            ],
        )
    )
    table = capsys.readouterr().out
    assert "reading head (greedy CTC): CER" in table and "t2i read+match" in table and "i2t read+match" in table
    assert {"read_t2i", "read_i2t"} == set(result["decode_then_match"])
    assert "read_t2i" in result["galleries"]["page_id"]["decode_then_match"]
    assert "read_t2i" in result["phrase"]["decode_then_match"]
    # evaluate on the val manifest measures what the last validation measured (same lines, same head)
    assert result["reading"]["cer"] == pytest.approx(validations[-1]["val_cer"], abs=1e-6)
    assert result["decode_then_match"]["read_t2i"]["r1"] == pytest.approx(validations[-1]["val_read_t2i_r1"], abs=1e-6)
    assert np.isfinite(result["reading"]["cer"])

    if not with_ocr:
        return
    # The ocr level of validation: computed once, logged with every validation and kept in the data report, and
    # equal to evaluate's on the same lines (from the same cache: no OCR the second time).
    report = json.loads((run / "data_report.json").read_text())
    assert report["val_ocr"]["n_read"] + report["val_ocr"]["n_cached"] > 0 and report["val_ocr"]["n_failed"] == 0
    levels = report["val_levels"]
    assert {
        "val_chance_r1",
        "val_t2i_ocr_level_r1",
        "val_i2t_ocr_level_r10",
        "val_page_t2i_ocr_level_mrr",
        "val_phrase_t2i_ocr_level_r1",
    } <= set(levels)
    assert not any("length" in k or "collection" in k for k in levels)  # not asked for
    for row in validations:
        assert row["val_t2i_ocr_level_r1"] == levels["val_t2i_ocr_level_r1"]
    ocr_eval = evaluate(
        compose_config(
            "evaluate",
            [
                f"run_dir={run}",
                f"manifest={data['eval']}",
                "eval.levels=[ocr]",
                "eval.gallery_by=page_id",
                "eval.queries=[line,phrase]",
                "eval.ocr.workers=2",
                f"eval.ocr.cache_dir={tmp_path / 'ocr'}",
                f"eval.output={tmp_path / 'eval_ocr.json'}",
            ],
        )
    )
    assert ocr_eval["ocr"]["n_read"] == 0
    for key, block in (
        ("", ocr_eval["levels"]),
        ("page_", ocr_eval["galleries"]["page_id"]["levels"]),
        ("phrase_", ocr_eval["phrase"]["levels"]),
    ):
        for k, v in block["ocr_t2i"].items():
            assert levels[f"val_{key}t2i_ocr_level_{k}"] == pytest.approx(v), (key, k)
