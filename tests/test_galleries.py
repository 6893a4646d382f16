"""Within-group galleries, phrase queries and the reference levels (chance, collection-only, length-only),
against hand computations and an exhaustive enumeration of random tie orders."""

import itertools

import numpy as np
import pytest
import torch

from lineclip.galleries import (
    ValidationPlan,
    field_values,
    group_codes,
    line_levels,
    phrase_levels,
    phrase_metrics,
    phrase_queries,
    predicted_lengths,
    within_group_metrics,
)
from lineclip.lines import LineRecord
from lineclip.metrics import expected_recall, tier_counts
from lineclip.phrases import contains_phrase

# t2i scores by hand: with image = I, text q scores image j with S[q, j] (and image q scores text j with S[j, q]).
# Pages: A = lines 0-2, B = 3-4, C = 5 (alone), line 6 has no page id. Every text is distinct.
S = torch.tensor([
    [0.90, 0.50, 0.10, 0.95, 0.00, 0.00, 0.99],  # own 0.90, best within A            -> rank 1
    [0.80, 0.30, 0.60, 0.00, 0.00, 0.00, 0.00],  # own 0.30 < 0.80, 0.60               -> rank 3
    [0.10, 0.70, 0.20, 0.00, 0.90, 0.00, 0.00],  # own 0.20 < 0.70 (0.90 is on page B) -> rank 2
    [0.00, 0.00, 0.00, 0.10, 0.50, 0.00, 0.00],  # own 0.10 < 0.50                     -> rank 2
    [0.00, 0.00, 0.00, 0.20, 0.40, 0.00, 0.00],  # own 0.40 > 0.20                     -> rank 1
    [0.00, 0.00, 0.00, 0.00, 0.00, 0.10, 0.90],  # alone on page C: counted, never a hit
    [0.00, 0.00, 0.00, 0.00, 0.00, 0.00, 0.50],  # no page id: not a query, not in any gallery
])
PAGES = ["A", "A", "A", "B", "B", "C", ""]


def _records(pages, texts=None, collections=None):
    texts = texts or [f"t{i}" for i in range(len(pages))]
    return [LineRecord(str(i), f"/x/{i}.png", texts[i], page_id=p,
                       extra={"collection": collections[i]} if collections and collections[i] else {})
            for i, p in enumerate(pages)]


def test_within_page_ranks_singletons_and_lines_without_a_page_id():
    groups = group_codes(field_values(_records(PAGES), "page_id"))
    assert groups.tolist() == [0, 0, 0, 1, 1, 2, -1]
    got = within_group_metrics(torch.eye(7), S, np.arange(7), groups, ks=(1, 2, 5))
    assert (got["n_queries"], got["n_groups"], got["n_alone"], got["n_without_value"]) == (6, 3, 1, 1)
    m = got["metrics"]
    # t2i ranks [1, 3, 2, 2, 1, miss]
    assert m["t2i_r1"] == pytest.approx(2 / 6) and m["t2i_r2"] == pytest.approx(4 / 6)
    assert m["t2i_r5"] == pytest.approx(5 / 6)
    assert m["t2i_mrr"] == pytest.approx((1 + 1 / 3 + 1 / 2 + 1 / 2 + 1) / 6)
    # i2t: image q against the texts of its page, column q of S: ranks [1, 3, 2, 2, 2, miss]
    assert m["i2t_r1"] == pytest.approx(1 / 6) and m["i2t_r2"] == pytest.approx(4 / 6)
    assert m["i2t_mrr"] == pytest.approx((1 + 1 / 3 + 1 / 2 + 1 / 2 + 1 / 2) / 6)


def test_within_page_chance_by_hand():
    groups = group_codes(["A", "A", "A", "B", "B", "C", None])
    lengths = np.array([5, 5, 5, 5, 5, 5, 5])  # all equal: the length ranker is random too
    levels = line_levels(np.arange(7), lengths, None, groups, ks=(1, 2, 5), predicted=lengths.astype(float))
    # page A: 1 of 3 -> R@1 1/3, R@2 2/3, MRR (1 + 1/2 + 1/3)/3; page B: 1 of 2 -> 1/2, 1, 3/4; C alone: 0
    want = {"r1": (3 * 1 / 3 + 2 * 1 / 2) / 6, "r2": (3 * 2 / 3 + 2 * 1) / 6, "r5": 5 / 6,
            "mrr": (3 * 11 / 18 + 2 * 3 / 4) / 6}
    assert levels["chance"] == pytest.approx(want)
    assert levels["length_t2i"] == pytest.approx(want) and levels["length_i2t"] == pytest.approx(want)
    assert levels["collection"] is None


def test_length_and_collection_levels_on_a_tiny_gallery():
    # text lengths 3, 3, 6, 9 bytes; lengths predicted from the images 5, 3, 6, 9; collections X, Y, X, Y
    lengths, predicted = np.array([3, 3, 6, 9]), np.array([5.0, 3.0, 6.0, 9.0])
    levels = line_levels(np.arange(4), lengths, group_codes(["X", "Y", "X", "Y"]), ks=(1, 2, 3), predicted=predicted)
    # t2i, images by |predicted - query length|: text 0 (3) meets image 1 (distance 0) before its own image 0 (2):
    # rank 2; texts 1, 2, 3 find their own image alone at distance 0
    assert levels["length_t2i"] == pytest.approx({"r1": 0.75, "r2": 1.0, "r3": 1.0, "mrr": (0.5 + 3) / 4})
    # i2t, texts by |length - the image's predicted length|: image 0 (5) has text 2 (distance 1) first, then
    # texts 0 and 1 tied at 2: rank 2 or 3; image 1 (3) ties texts 0 and 1 at 0: rank 1 or 2; images 2, 3: rank 1
    assert levels["length_i2t"] == pytest.approx(
        {"r1": (0 + 0.5 + 1 + 1) / 4, "r2": (0.5 + 1 + 1 + 1) / 4, "r3": 1.0,
         "mrr": ((1 / 2 + 1 / 3) / 2 + (1 + 1 / 2) / 2 + 1 + 1) / 4})
    # collection: own collection (2 lines) first: R@1 1/2 = min(1, K / 2) as RESULTS.md's group_level
    assert levels["collection"] == pytest.approx({"r1": 0.5, "r2": 1.0, "r3": 1.0, "mrr": 0.75})
    assert levels["chance"] == pytest.approx({"r1": 0.25, "r2": 0.5, "r3": 0.75, "mrr": 25 / 48})
    assert "length_t2i" not in line_levels(np.arange(4), lengths, None)  # no image sizes, no length level


def test_predicted_lengths_is_the_least_squares_line_through_the_aspects():
    # aspects 1, 2, 3 with lengths 1, 5, 6: slope cov/var = (5/3)/(2/3) = 2.5, intercept 4 - 2.5 * 2 = -1
    got = predicted_lengths(np.array([1.0, 2.0, 3.0, np.nan]), np.array([1, 5, 6, 4]))
    np.testing.assert_allclose(got, [1.5, 4.0, 6.5, 4.0])  # an unreadable image gets the mean length
    np.testing.assert_allclose(predicted_lengths(np.array([2.0, 2.0]), np.array([3, 5])), [4.0, 4.0])


def test_a_phrase_in_two_lines_metrics_and_levels():
    texts = ["ཀ་ཁ་ག", "ང་ཀ་ཁ།", "ཅ་ཆ་ཇ་ཉ"]  # 15, 18 and 21 bytes
    lengths = np.array([len(t.encode()) for t in texts])
    answers = [np.array([0, 1])]  # "ཀ་ཁ" (9 bytes) drawn from line 0 is also in line 1
    assert [contains_phrase(t, "ཀ་ཁ") for t in texts] == [True, True, False]
    got = phrase_metrics(torch.tensor([[0.2, 0.5, 0.9]]), torch.eye(3), answers, ks=(1, 2))
    assert got["t2i_r1"] == 0.0 and got["t2i_r2"] == 1.0 and got["t2i_mrr"] == 0.5  # line 2 outscores line 1
    levels = phrase_levels(answers, np.array([0]), np.array([9]), 3, group_codes(["X", "X", "Y"]), ks=(1, 2),
                           predicted=lengths.astype(float))
    # chance: 2 correct of 3 -> R@1 2/3, MRR 2/3 + 1/3 * 1/2
    assert levels["chance"] == pytest.approx({"r1": 2 / 3, "r2": 1.0, "mrr": 5 / 6})
    # length: longest first, line 2 (21 bytes, wrong) then line 1 (18, correct): always rank 2
    assert levels["length_t2i"] == pytest.approx({"r1": 0.0, "r2": 1.0, "mrr": 0.5})
    # predicted shorter than the phrase (8 bytes): lines 0, 1 are last, tied: line 2 first, then rank 2 either way
    short = phrase_levels(answers, np.array([0]), np.array([9]), 3, None, ks=(1, 2), predicted=np.array([8, 8, 30.0]))
    assert short["length_t2i"] == pytest.approx({"r1": 0.0, "r2": 1.0, "mrr": 0.5}) and short["collection"] is None
    # collection X = lines 0, 1, both correct: rank 1
    assert levels["collection"] == pytest.approx({"r1": 1.0, "r2": 1.0, "mrr": 1.0})


def test_phrase_queries_answers_are_every_containing_line():
    texts = ["ཀ་ཁ་ག", "ང་ཀ་ཁ།", "ཅ", "ཀ་ཁ་ག"]
    phrases, query_lines, answers = phrase_queries(texts, seed=0)
    assert query_lines.tolist() == [0, 1, 3]  # line 2 has one syllable: no query
    for phrase, line, ans in zip(phrases, query_lines, answers, strict=True):
        assert line in ans
        assert ans.tolist() == [j for j, t in enumerate(texts) if contains_phrase(t, phrase)]
    assert phrase_queries(texts, seed=0)[0] == phrases


def _enumerated(tier, correct, member, ks):
    """Exact expectation over every order of the gallery, stable-sorted by tier (ties in every order)."""
    n_q, n = correct.shape
    totals = dict.fromkeys([f"r{k}" for k in ks] + ["mrr"], 0.0)
    perms = list(itertools.permutations(range(n)))
    for q in range(n_q):
        items = [j for j in range(n) if member[q, j]]
        for perm in perms:
            ranked = sorted((j for j in perm if j in items), key=lambda j: tier[q, j])
            hits = [pos for pos, j in enumerate(ranked, 1) if correct[q, j]]
            if hits:
                for k in ks:
                    totals[f"r{k}"] += hits[0] <= k
                totals["mrr"] += 1 / hits[0]
    return {key: v / (n_q * len(perms)) for key, v in totals.items()}


def test_expected_recall_matches_enumerating_every_tie_order():
    rng = np.random.default_rng(0)
    tier = rng.integers(0, 3, (5, 6)).astype(float)
    correct = rng.random((5, 6)) < 0.35
    correct[4] = False  # a query without a correct item: a miss
    member = rng.random((5, 6)) < 0.8
    got = expected_recall(*tier_counts(tier, correct, member), ks=(1, 2, 4))
    assert got == pytest.approx(_enumerated(tier, correct & member, member, (1, 2, 4)))


def test_a_plan_restricted_to_the_embedded_lines_renumbers_phrase_answers():
    texts = ["ཀ་ཁ་ག", "ང་ཀ་ཁ།", "ཅ་ཆ", "ཀ་ཁ"]
    records = _records(["A", "A", "", "B"], texts=texts, collections=["X", "X", "Y", None])
    plan = ValidationPlan.build(records, ["page_id", "doc_id"], seed=0, levels=False)
    assert list(plan.groups) == ["page"] and plan.groups["page"].tolist() == [0, 0, -1, 1]  # no doc ids at all
    assert plan.collection.tolist() == [0, 0, 1, -1] and plan.aspects is None
    kept = plan.restrict(np.array([0, 2, 3]))  # line 1's image could not be read
    assert kept.ids.tolist() == plan.ids[[0, 2, 3]].tolist() and kept.groups["page"].tolist() == [0, -1, 1]
    kept_texts = [texts[0], texts[2], texts[3]]
    for phrase, answers in zip(kept.phrases, kept.answers, strict=True):
        assert answers.tolist() == [j for j, t in enumerate(kept_texts) if contains_phrase(t, phrase)]
    # every line but line 1 has a phrase query, drawn as on the whole manifest
    assert kept.query_lines.tolist() == [0, 1, 2]
    assert kept.phrases == [p for q, p in zip(plan.query_lines, plan.phrases, strict=True) if q != 1]
    assert plan.restrict(np.arange(4)) is plan
