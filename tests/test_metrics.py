import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lineclip.metrics import first_correct_ranks, ranks_metrics, retrieval_metrics, retrieval_ranks


def _reference_ranks(queries, gallery, qids, gids, strict):
    sims = queries.numpy() @ gallery.numpy().T
    ranks = []
    for i, row in enumerate(sims):
        order = np.argsort(-row)  # random floats: no ties
        correct = [j for j in order if (j == i if strict else gids[j] == qids[i])]
        ranks.append(int(np.where(order == correct[0])[0][0]) + 1)
    return np.array(ranks)


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_ranks_match_a_full_sort(strict, chunk):
    g = torch.Generator().manual_seed(3)
    n = 53
    image = F.normalize(torch.randn(n, 16, generator=g), dim=-1)
    text = F.normalize(image + 0.8 * torch.randn(n, 16, generator=g), dim=-1)
    ids = torch.randint(0, 30, (n,), generator=g)  # plenty of duplicate transcriptions
    ranks = first_correct_ranks(text, image, ids, ids, strict=strict, chunk_size=chunk)
    np.testing.assert_array_equal(ranks.numpy(), _reference_ranks(text, image, ids.numpy(), ids.numpy(), strict))


def test_retrieval_ranks_both_directions_match_a_full_sort():
    g = torch.Generator().manual_seed(5)
    n = 41
    image = F.normalize(torch.randn(n, 8, generator=g), dim=-1)
    text = F.normalize(image + torch.randn(n, 8, generator=g), dim=-1)
    ids = torch.randint(0, 25, (n,), generator=g)
    ranks = retrieval_ranks(image, text, ids, chunk_size=6)
    assert set(ranks) == {"i2t", "t2i"} and ranks["t2i"].dtype == torch.long
    np.testing.assert_array_equal(ranks["t2i"].numpy(), _reference_ranks(text, image, ids.numpy(), ids.numpy(), False))
    np.testing.assert_array_equal(ranks["i2t"].numpy(), _reference_ranks(image, text, ids.numpy(), ids.numpy(), False))
    # the metrics are exactly these ranks summarised
    metrics = ranks_metrics(ranks)
    assert metrics == retrieval_metrics(image, text, ids)
    assert metrics["t2i_r5"] == pytest.approx(float((ranks["t2i"] <= 5).double().mean()))


def test_duplicates_are_not_misses():
    # Lines 0 and 1 share a transcription; their text embeddings are identical, so text 1 retrieves image 0
    # first. Duplicate-aware that is a hit; strict it is a miss at rank 2.
    image = torch.eye(4)
    text = torch.eye(4)
    text[1] = text[0]
    ids = torch.tensor([0, 0, 1, 2])
    aware = retrieval_metrics(image, text, ids)
    strict = retrieval_metrics(image, text, ids, strict=True)
    assert aware["t2i_r1"] == 1.0 and aware["i2t_r1"] == 1.0
    # strict: text 1's own image scores 0 against image 0's 1, so it ranks 2nd
    assert strict["t2i_r1"] == pytest.approx(0.75)
    assert strict["t2i_median_rank"] == 1.0 and strict["t2i_mrr"] == pytest.approx((3 + 0.5) / 4)


def test_recall_mrr_and_median_from_ranks():
    g = torch.Generator().manual_seed(5)
    n = 40
    image = F.normalize(torch.randn(n, 8, generator=g), dim=-1)
    text = F.normalize(image + torch.randn(n, 8, generator=g), dim=-1)
    ids = torch.arange(n)
    m = retrieval_metrics(image, text, ids, chunk_size=9)
    ref = _reference_ranks(text, image, ids.numpy(), ids.numpy(), strict=True)
    for k in (1, 5, 10):
        assert m[f"t2i_r{k}"] == pytest.approx(np.mean(ref <= k))
    assert m["t2i_mrr"] == pytest.approx(np.mean(1 / ref))
    assert m["t2i_median_rank"] == pytest.approx(np.median(ref))


@pytest.mark.parametrize("n_ids", [1, 2, 5, 200])  # 1-2 ids: the dense mask path; 200: gathered index pairs
@pytest.mark.parametrize("chunk", [1, 16, 64])
def test_duplicate_heavy_and_unique_ids_take_the_same_ranks(n_ids, chunk):
    g = torch.Generator().manual_seed(n_ids)
    n = 64
    image = F.normalize(torch.randn(n, 8, generator=g), dim=-1)
    text = F.normalize(image + torch.randn(n, 8, generator=g), dim=-1)
    ids = torch.randint(0, n_ids, (n,), generator=g)
    ranks = first_correct_ranks(text, image, ids, ids, chunk_size=chunk)
    np.testing.assert_array_equal(ranks.numpy(), _reference_ranks(text, image, ids.numpy(), ids.numpy(), False))


def test_query_without_a_correct_item_ranks_past_the_gallery():
    g = torch.Generator().manual_seed(0)
    queries = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    gallery = F.normalize(torch.randn(7, 8, generator=g), dim=-1)
    ranks = first_correct_ranks(queries, gallery, torch.tensor([0, 1, 99, 2, 98]), torch.arange(7), chunk_size=2)
    assert ranks[2] == ranks[4] == 8
    assert ((ranks[[0, 1, 3]] >= 1) & (ranks[[0, 1, 3]] <= 7)).all()


def test_ranks_are_an_ordinary_tensor_and_inputs_may_require_grad():
    image = torch.eye(3, requires_grad=True)
    ranks = first_correct_ranks(image, image.detach(), torch.arange(3), torch.arange(3))
    ranks[0] = 5  # not an inference tensor: in-place edits by the caller must work
    assert ranks.tolist() == [5, 1, 1] and not ranks.requires_grad
