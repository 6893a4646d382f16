import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lineclip.loss import contrastive_loss, mean_pairwise_cosine, sigmoid_loss


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
# --- positives as a matrix (phrases) and the sigmoid loss ------------------------------------------------

# A hand-built batch: line 0 and line 2 both contain the phrase that is line 1's text, line 3 is unrelated.
# positives[i, j]: text j occurs in line i's transcription.
PHRASE_POSITIVES = torch.tensor([
    [1, 1, 0, 0],
    [0, 1, 0, 0],
    [0, 1, 1, 0],
    [0, 0, 0, 1],
], dtype=torch.bool)


def _hand_infonce(logits, pos):
    """-log(sum of exp over positives / sum of exp over all), row by row, both directions, in plain floats."""
    n = len(pos)

    def direction(lg, p):
        total = 0.0
        for i in range(n):
            num = sum(math.exp(lg[i][j]) for j in range(n) if p[i][j])
            total += -math.log(num / sum(math.exp(v) for v in lg[i]))
        return total / n

    lg = logits.double().tolist()
    lg_t = [list(col) for col in zip(*lg, strict=True)]
    p = pos.tolist()
    p_t = [list(col) for col in zip(*p, strict=True)]
    return 0.5 * (direction(lg, p) + direction(lg_t, p_t))


def test_a_phrase_in_two_lines_is_a_positive_of_both():
    image, text = _batch(n=4, seed=3)
    scale = torch.tensor(10.0)
    out = contrastive_loss(image, text, PHRASE_POSITIVES, scale)
    expected = _hand_infonce(scale * image @ text.T, PHRASE_POSITIVES)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    # the phrase text (1) is not a negative of line 2: making it one changes the loss
    strict = contrastive_loss(image, text, torch.eye(4, dtype=torch.bool), scale)
    assert strict.loss.item() == pytest.approx(_hand_infonce(scale * image @ text.T, torch.eye(4, dtype=torch.bool)),
                                               rel=1e-5)
    assert strict.loss.item() != pytest.approx(out.loss.item(), rel=1e-3)


def test_matrix_accuracy_is_directional():
    # image 2's best text is the phrase (text 1), which occurs in line 2: an i2t hit. Text 2's best image
    # is image 1, whose line does not contain text 2: a t2i miss.
    image = torch.eye(4)
    text = torch.tensor([[1.0, 0, 0, 0], [0, 0.6, 0.8, 0], [0, 1.0, 0, 0], [0, 0, 0, 1.0]])
    # sims: image 1 -> texts 1 (0.6), 2 (1.0); image 2 -> text 1 (0.8)
    out = contrastive_loss(image, text, PHRASE_POSITIVES, torch.tensor(10.0))
    # i2t: image0 best text0 (1) hit; image1 best text2 (1.0), line 1 does not contain text 2: miss;
    # image2 best text1 (0.8), a positive: hit; image3 hit -> 3/4
    assert out.i2t_accuracy.item() == pytest.approx(3 / 4)
    # t2i: text0 -> image0 hit; text1 -> image2 (0.8 > 0.6), line 2 contains text 1: hit;
    # text2 -> image1 (1.0), line 1 does not contain text 2: miss; text3 hit -> 3/4
    assert out.t2i_accuracy.item() == pytest.approx(3 / 4)


def test_ids_and_the_equivalent_matrix_give_the_same_loss():
    image, text = _batch(seed=4)
    ids = torch.tensor([0, 1, 0, 2, 1, 3])
    scale = torch.tensor(12.0)
    a = contrastive_loss(image, text, ids, scale)
    b = contrastive_loss(image, text, ids[:, None] == ids[None, :], scale)
    torch.testing.assert_close(a.loss, b.loss)


def test_matrix_of_the_wrong_size_is_refused():
    image, text = _batch(n=4)
    with pytest.raises(ValueError, match="positives"):
        contrastive_loss(image, text, torch.eye(3, dtype=torch.bool), torch.tensor(10.0))


def test_sigmoid_loss_is_the_hand_computed_pairwise_sum():
    image, text = _batch(n=4, seed=5)
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    out = sigmoid_loss(image, text, PHRASE_POSITIVES, scale, bias)
    sims = (image @ text.T).double().tolist()
    total = 0.0
    for i in range(4):
        for j in range(4):
            z = 10.0 * sims[i][j] - 10.0
            label = 1.0 if PHRASE_POSITIVES[i, j] else -1.0
            total += math.log(1.0 + math.exp(-label * z))  # -log sigmoid(label * z)
    assert out.loss.item() == pytest.approx(total / 4, rel=1e-5)
    # with ids (the diagonal only), as open_clip's SigLipLoss: labels 2 * eye - 1
    ids_out = sigmoid_loss(image, text, torch.arange(4), scale, bias)
    eye = sum(math.log(1.0 + math.exp(-(1 if i == j else -1) * (10.0 * sims[i][j] - 10.0)))
              for i in range(4) for j in range(4)) / 4
    assert ids_out.loss.item() == pytest.approx(eye, rel=1e-5)


def test_sigmoid_loss_at_init_and_its_gradients():
    # at SigLIP's init (scale 10, bias -10) a matched pair at cosine 1 sits at logit 0 (log 2 each) and an
    # orthogonal unmatched pair at -10 (log(1 + e^-10) each)
    out = sigmoid_loss(torch.eye(3), torch.eye(3), torch.arange(3), torch.tensor(10.0), torch.tensor(-10.0))
    negative_cost = math.log(1 + math.exp(-10.0))
    assert out.loss.item() == pytest.approx((3 * math.log(1 + math.exp(0.0)) + 6 * negative_cost) / 3, rel=1e-6)
    image, text = _batch(seed=6)
    image.requires_grad_(True)
    text.requires_grad_(True)
    log_scale = torch.tensor(math.log(10.0), requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    sigmoid_loss(image, text, torch.arange(6), log_scale.exp(), bias).loss.backward()
    assert image.grad.abs().sum() > 0 and text.grad.abs().sum() > 0
    # d/d bias of sum(-log sigmoid(l z)) / B = sum(-l * sigmoid(-l z)) / B, by hand
    with torch.no_grad():
        z = (10.0 * image @ text.T - 10.0).double()
        labels = 2 * torch.eye(6, dtype=torch.float64) - 1
        expected = (-labels * torch.sigmoid(-labels * z)).sum().item() / 6
    assert bias.grad.item() == pytest.approx(expected, rel=1e-5)
