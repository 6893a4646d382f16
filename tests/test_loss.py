import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lineclip.loss import contrastive_loss, mean_pairwise_cosine


def _batch(n=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    text = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    return image, text


def test_distinct_texts_is_clip_cross_entropy():
    image, text = _batch()
    scale = torch.tensor(1 / 0.07)
    out = contrastive_loss(image, text, torch.arange(6), scale)
    logits = scale * image @ text.T
    labels = torch.arange(6)
    expected = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    torch.testing.assert_close(out.loss, expected)
    assert out.i2t_accuracy.item() == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    assert out.t2i_accuracy.item() == pytest.approx((logits.T.argmax(1) == labels).float().mean().item())


def test_duplicate_texts_are_positives_not_negatives():
    image, text = _batch(seed=1)
    ids = [0, 1, 0, 2, 1, 3]  # rows 0/2 and 1/4 carry the same transcription
    scale = 10.0
    out = contrastive_loss(image, text, torch.tensor(ids), torch.tensor(scale))
    logits = (scale * image @ text.T).double().numpy()

    def direction(lg):
        total = 0.0
        for i in range(len(ids)):
            pos = sum(math.exp(lg[i, j]) for j in range(len(ids)) if ids[j] == ids[i])
            total += -math.log(pos / sum(math.exp(v) for v in lg[i]))
        return total / len(ids)

    expected = 0.5 * (direction(logits) + direction(logits.T))
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)


def test_accuracy_counts_a_duplicate_as_a_hit():
    # image 0 matches text 1 best, and texts 0 and 1 are the same transcription: a hit, not a miss
    image = torch.eye(3)
    text = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    out = contrastive_loss(image, text, torch.tensor([5, 5, 7]), torch.tensor(10.0))
    assert out.i2t_accuracy.item() == 1.0
    strict = contrastive_loss(image, text, torch.tensor([5, 6, 7]), torch.tensor(10.0))
    assert strict.i2t_accuracy.item() == pytest.approx(1 / 3)


def test_loss_gradient_reaches_both_sides_and_scale():
    image, text = _batch()
    image.requires_grad_(True)
    text.requires_grad_(True)
    log_scale = torch.tensor(np.log(1 / 0.07), requires_grad=True)
    contrastive_loss(image, text, torch.arange(6), log_scale.exp()).loss.backward()
    assert image.grad.abs().sum() > 0 and text.grad.abs().sum() > 0 and log_scale.grad.abs() > 0


def test_mean_pairwise_cosine_against_the_full_matrix():
    image, _ = _batch(n=7, d=5, seed=3)
    full = image @ image.T
    expected = (full.sum() - full.diagonal().sum()) / (7 * 6)
    assert mean_pairwise_cosine(image).item() == pytest.approx(expected.item(), abs=1e-6)
    same = F.normalize(torch.ones(4, 5), dim=-1)
    assert mean_pairwise_cosine(same).item() == pytest.approx(1.0, abs=1e-6)
    assert math.isnan(mean_pairwise_cosine(same[:1]).item())


def test_a_collapsed_batch_has_loss_ln_b_and_no_gradient():
    # every embedding the same point: the loss is exactly ln B whatever the scale, and nothing moves it
    image = F.normalize(torch.ones(8, 4), dim=-1).requires_grad_(True)
    text = F.normalize(torch.ones(8, 4), dim=-1).requires_grad_(True)
    out = contrastive_loss(image, text, torch.arange(8), torch.tensor(14.3))
    assert out.loss.item() == pytest.approx(math.log(8), abs=1e-5)
    out.loss.backward()
    assert image.grad.abs().max().item() < 1e-6 and text.grad.abs().max().item() < 1e-6
