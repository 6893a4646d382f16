import math

import pytest
import torch

from lineclip.batch import LineCollator
from lineclip.reading import (
    OTHER_CLASS,
    SPACE_CLASS,
    VOCAB_SIZE,
    ReadingHead,
    char_class,
    reading_loss,
    reading_targets,
)


def test_classes_of_tibetan_space_and_other():
    assert char_class("ཀ") == 0x0F40 - 0x0F00 + 1
    assert char_class("་") == 0x0F0B - 0x0F00 + 1
    assert char_class(" ") == SPACE_CLASS
    assert char_class("a") == OTHER_CLASS == char_class("é")
    flat, lengths = reading_targets(["ཀ་", "ཁ a"])
    assert lengths.tolist() == [2, 3]
    assert flat.tolist() == [0x41, 0x0C, 0x42, SPACE_CLASS, OTHER_CLASS]


def test_head_reads_columns_in_order():
    head = ReadingHead(hidden_size=6, frames_per_column=2)
    tokens = torch.randn(3, 2 * 5, 6)  # 2 rows x 5 columns, row-major
    out = head(tokens, rows=2)
    assert out.shape == (3, 5 * 2, VOCAB_SIZE)
    column_means = tokens.reshape(3, 2, 5, 6).mean(1)
    normed = (column_means - column_means.mean(-1, keepdim=True)) / torch.sqrt(
        column_means.var(-1, unbiased=False, keepdim=True) + head.norm.eps)
    expected = head.proj(normed).reshape(3, 10, VOCAB_SIZE)
    torch.testing.assert_close(out, expected)


def test_ctc_of_a_certain_reading_is_zero_and_of_a_uniform_one_is_known():
    targets, lengths = torch.tensor([5, 7]), torch.tensor([2])
    # frames: 5, blank, 7 with near-certainty -> loss ~0
    logits = torch.full((1, 3, VOCAB_SIZE), -30.0)
    for t, c in enumerate([5, 0, 7]):
        logits[0, t, c] = 30.0
    assert reading_loss(logits, targets, lengths).item() == pytest.approx(0.0, abs=1e-4)
    # uniform frames: P(path) = V^-T each; the number of CTC paths of "5 7" over 3 frames is 5
    # (57-, 5-7, -57, 557, 577), so the loss per target char is -ln(5 / V^3) / 2
    uniform = torch.zeros(1, 3, VOCAB_SIZE)
    expected = -(math.log(5) - 3 * math.log(VOCAB_SIZE)) / 2
    assert reading_loss(uniform, targets, lengths).item() == pytest.approx(expected, rel=1e-5)


def test_a_line_longer_than_its_frames_does_not_make_the_loss_infinite():
    logits = torch.zeros(2, 2, VOCAB_SIZE, requires_grad=True)
    targets, lengths = torch.tensor([1, 2, 3, 4, 5]), torch.tensor([1, 4])
    loss = reading_loss(logits, targets, lengths)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_collator_adds_reading_targets_only_when_asked():
    items = [{"pixel_values": torch.zeros(3, 8, 16), "text": t, "index": i} for i, t in enumerate(["ཀ་ཁ", "ག"])]
    plain = LineCollator(max_length=16)(items)
    assert "reading_targets" not in plain
    batch = LineCollator(max_length=16, reading=True)(items)
    flat, lengths = reading_targets(["ཀ་ཁ", "ག"])
    assert batch["reading_lengths"].tolist() == lengths.tolist() == [3, 1]
    assert torch.equal(batch["reading_targets"], flat)

