"""lineclip.evaluate: both metric kinds (and per group) against a brute-force computation, the chance level, the
output name, and bad input giving one error line and no file."""

import itertools
import json
import math

import numpy as np
import pytest
from usage_support import compose_config, overfit_run, run_cli, run_in_process, snapshot

from lineclip.evaluate import chance_level
from lineclip.manifest import manifest_label


def _random_ranking_expectation(ids, ks, strict):
    """Exact expectation over every permutation of a small gallery."""
    n = len(ids)
    totals = dict.fromkeys([f"r{k}" for k in ks] + ["mrr", "mean_rank"], 0.0)
    perms = list(itertools.permutations(range(n)))
    for query in range(n):
        correct = {query} if strict else {j for j in range(n) if ids[j] == ids[query]}
        for perm in perms:
            rank = next(pos for pos, j in enumerate(perm, 1) if j in correct)
            for k in ks:
                totals[f"r{k}"] += rank <= k
            totals["mrr"] += 1 / rank
            totals["mean_rank"] += rank
    return {key: value / (n * len(perms)) for key, value in totals.items()}


@pytest.mark.parametrize("strict", [False, True])
def test_chance_level_is_the_random_ranking_expectation(strict):
    ids = np.array([0, 0, 1, 2, 2, 2])
    got = chance_level(ids, (1, 2, 5), strict)
    want = _random_ranking_expectation(ids, (1, 2, 5), strict)
    for key in want:
        assert got[key] == pytest.approx(want[key]), key
    if strict:
        assert got["r1"] == pytest.approx(1 / 6) and got["r5"] == pytest.approx(5 / 6)


def test_output_names_tell_openpecha_splits_apart():
    assert manifest_label("/data/op/eval/meta/lines.jsonl") == "eval_lines"
    assert manifest_label("/data/op/train/meta/lines.jsonl") == "train_lines"
    assert manifest_label("/data/my set (v2).jsonl") == "my-set-v2"
    assert manifest_label("/data/x/lines.jsonl.gz") == "lines"


# ------------------------------------------------------------------------------------- with a trained run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return overfit_run(tmp_path_factory)


def _brute_force(image, text, texts, strict):
    """Ranks by explicit comparison of every pair (float64), ties in the query's favour."""
    sims = image.astype(np.float64) @ text.astype(np.float64).T
    out = {}
    for name, s in (("i2t", sims), ("t2i", sims.T)):
        ranks = []
        for q in range(len(texts)):
            correct = [q] if strict else [j for j in range(len(texts)) if texts[j] == texts[q]]
            best = max(s[q, j] for j in correct)
            ranks.append(1 + sum(s[q, j] > best + 1e-6 for j in range(len(texts))))
        ranks = np.array(ranks)
        out.update({f"{name}_r{k}": float(np.mean(ranks <= k)) for k in (1, 5, 10)})
        out[f"{name}_mrr"] = float(np.mean(1 / ranks))
        out[f"{name}_median_rank"] = float(np.median(ranks))
    return out


@pytest.mark.slow
def test_evaluate_matches_brute_force_in_both_kinds_and_per_group(trained, tmp_path):
    from lineclip import load_encoder
    from lineclip.manifest import read_manifest

    run, data = trained
    proc = run_cli("evaluate", f"run_dir={run}", f"manifest={data['eval']}", "eval.group_key=collection",
                "eval.chunk_size=5", "batch_size=4", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = run / "eval_eval_lines.json"  # <split>_<stem> of <root>/eval/meta/lines.jsonl
    result = json.loads(output.read_text())
    assert not list(tmp_path.iterdir())  # nothing in the working dir: no outputs/, no .hydra/, no log
    assert "i2t dup-aware" in proc.stdout and "t2i strict" in proc.stdout and "collection=TCCG" in proc.stdout

    records, _ = read_manifest(data["eval"])
    texts = [r.text for r in records]
    encoder = load_encoder(run, device="cpu")
    image = encoder.encode_images([r.image_path for r in records])
    text = encoder.encode_texts(texts)
    assert result["n_lines"] == 12 and result["n_distinct_texts"] == 9 and result["lines_with_shared_text"] == 6
    for kind, strict in (("duplicate_aware", False), ("strict", True)):
        want = _brute_force(image, text, texts, strict)
        assert result["metrics"][kind] == pytest.approx(want), kind
    # A duplicated text retrieves its memorised twin's image first: a hit for the duplicate-aware kind only.
    assert result["metrics"]["duplicate_aware"]["t2i_r1"] > result["metrics"]["strict"]["t2i_r1"]

    groups = result["groups"]
    assert groups["key"] == "collection"
    for value, block in groups["values"].items():
        rows = [i for i, r in enumerate(records) if r.extra["collection"] == value]
        assert block["n_lines"] == len(rows)
        sub_texts = [texts[i] for i in rows]
        assert block["metrics"]["strict"] == pytest.approx(_brute_force(image[rows], text[rows], sub_texts, True))
        assert block["metrics"]["duplicate_aware"] == pytest.approx(
            _brute_force(image[rows], text[rows], sub_texts, False))
    assert result["chance"]["strict"]["r1"] == pytest.approx(1 / 12)
    assert result["chance"]["duplicate_aware"]["r1"] == pytest.approx(np.mean([texts.count(t) for t in texts]) / 12)
    assert result["bundle"]["prefix"] == "" and result["bundle"]["global_step"] == 60


@pytest.mark.slow
def test_bad_input_is_one_error_line_and_writes_nothing(trained, tmp_path):
    run, data = trained
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    before = snapshot(run)
    cases = [
        ([f"run_dir={tmp_path / 'nope'}", f"manifest={data['eval']}"], "does not exist"),
        ([f"run_dir={run}", f"manifest={empty}"], "has no usable rows"),
        ([f"run_dir={run}", f"manifest={data['eval']}", "eval.group_key=shelfmark"], "no row of the manifest has"),
    ]
    from lineclip.evaluate import evaluate

    for overrides, reason in cases:
        status, message = run_in_process(evaluate, "evaluate", overrides)
        assert status == 2 and reason in message, (overrides, message)
    assert snapshot(run) == before


@pytest.mark.slow
def test_a_checkpoint_is_evaluated_into_a_file_named_after_its_prefix(trained):
    from lineclip.evaluate import evaluate

    run, data = trained
    evaluate(compose_config("evaluate", [f"run_dir={run}/checkpoint_step_0000030_", f"manifest={data['train']}"]))
    output = run / "checkpoint_step_0000030_eval_train_lines.json"
    result = json.loads(output.read_text())
    output.unlink()  # the run dir is shared by other tests
    assert result["bundle"]["prefix"] == "checkpoint_step_0000030_" and result["bundle"]["global_step"] == 30
    assert result["n_lines"] == 8 and "groups" not in result


def _within_page_brute_force(image, text, texts, pages, ks=(1, 5, 10)):
    """Per page, explicit comparisons (float64); a line alone on its page is a miss, lines without a page
    are left out. Chance per query: 1 - C(G - m, k) / C(G, k) for m correct lines on a page of G."""
    sims = image.astype(np.float64) @ text.astype(np.float64).T
    queries = [q for q in range(len(texts)) if pages[q]]
    out = {}
    for name, s in (("i2t", sims), ("t2i", sims.T)):
        recips, hits = [], {k: [] for k in ks}
        for q in queries:
            page = [j for j in queries if pages[j] == pages[q]]
            correct = [j for j in page if texts[j] == texts[q]]
            best = max(s[q, j] for j in correct)
            rank = 1 + sum(s[q, j] > best + 1e-6 for j in page)
            hit = len(page) > 1
            recips.append(1 / rank if hit else 0.0)
            for k in ks:
                hits[k].append(hit and rank <= k)
        out.update({f"{name}_r{k}": float(np.mean(hits[k])) for k in ks})
        out[f"{name}_mrr"] = float(np.mean(recips))
    chance = {}
    for k in ks:
        values = []
        for q in queries:
            page = [j for j in queries if pages[j] == pages[q]]
            m = sum(texts[j] == texts[q] for j in page)
            g = len(page)
            values.append(0.0 if g == 1 else 1.0 if k >= g else 1 - math.comb(g - m, k) / math.comb(g, k))
        chance[f"r{k}"] = float(np.mean(values))
    return out, chance


@pytest.mark.slow
def test_within_page_galleries_and_phrase_queries_match_brute_force(trained, tmp_path):
    from lineclip import load_encoder
    from lineclip.manifest import read_manifest
    from lineclip.phrases import contains_phrase, sample_phrases

    run, data = trained
    output = tmp_path / "eval.json"
    proc = run_cli("evaluate", f"run_dir={run}", f"manifest={data['eval']}", "eval.gallery_by=page_id",
                   "eval.queries=phrase", "eval.phrase_seed=5", f"eval.output={output}", "eval.chunk_size=3",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "within page_id" in proc.stdout and "phrase queries" in proc.stdout and "length only" in proc.stdout
    result = json.loads(output.read_text())
    records, _ = read_manifest(data["eval"])
    texts, pages = [r.text for r in records], [r.page_id for r in records]
    encoder = load_encoder(run, device="cpu")
    image = encoder.encode_images([r.image_path for r in records])
    text = encoder.encode_texts(texts)

    block = result["galleries"]["page_id"]
    want, chance = _within_page_brute_force(image, text, texts, pages)
    assert {k: v for k, v in block["metrics"].items() if "median" not in k} == pytest.approx(want)
    assert {k: block["levels"]["chance"][k] for k in chance} == pytest.approx(chance)
    sizes = {p: pages.count(p) for p in pages}
    assert block["n_alone"] == sum(sizes[p] == 1 for p in pages) and block["n_queries"] == 12

    phrase = result["phrase"]
    drawn = sample_phrases(texts, 5)
    queries = [q for q, p in enumerate(drawn) if p is not None]
    assert phrase["n_queries"] == len(queries) and phrase["seed"] == 5
    emb = encoder.encode_texts([drawn[q] for q in queries]).astype(np.float64)
    sims = emb @ image.astype(np.float64).T
    ranks, chance_r1 = [], []
    for row, q in enumerate(queries):
        correct = [j for j in range(len(texts)) if contains_phrase(texts[j], drawn[q])]
        best = max(sims[row, j] for j in correct)
        ranks.append(1 + sum(sims[row, j] > best + 1e-6 for j in range(len(texts))))
        chance_r1.append(len(correct) / len(texts))
    ranks = np.array(ranks)
    for k in (1, 5, 10):
        assert phrase["metrics"][f"t2i_r{k}"] == pytest.approx(np.mean(ranks <= k))
    assert phrase["metrics"]["t2i_mrr"] == pytest.approx(np.mean(1 / ranks))
    assert phrase["levels"]["chance"]["r1"] == pytest.approx(np.mean(chance_r1))
