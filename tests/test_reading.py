import math
from fractions import Fraction

import pytest
import torch

from lineclip.batch import LineCollator, byte_encode
from lineclip.reading import (
    OTHER_CLASS,
    SPACE_CLASS,
    VOCAB_SIZE,
    BagHead,
    ReadingHead,
    bag_loss,
    bag_targets,
    byte_texts,
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



def _pyramid_reference(text: str, levels: list[int]) -> torch.Tensor:
    """PHOC's regions by their definition, in exact fractions: character i of n spans [i/n, (i+1)/n) and belongs to
    the region [r/L, (r+1)/L) of level L that holds its centre."""
    rows = []
    n = len(text)
    for level in levels:
        region = torch.zeros(level, VOCAB_SIZE)
        for i, char in enumerate(text):
            centre = Fraction(2 * i + 1, 2 * n)
            r = next(r for r in range(level) if Fraction(r, level) <= centre < Fraction(r + 1, level))
            region[r, char_class(char)] = 1.0
        rows.append(region.flatten())
    return torch.cat(rows)


def test_bag_pyramid_puts_each_character_in_the_region_of_its_centre():
    texts = ["ཀ་ཁ", "ག", "ཀཁགངཅ་ཆ", "ཀཀཀཀཁ"]
    targets, lengths = reading_targets(texts)
    bags = bag_targets(targets, lengths, levels=[1, 2, 3])
    assert bags.shape == (4, 6 * VOCAB_SIZE)
    for text, bag in zip(texts, bags, strict=True):
        torch.testing.assert_close(bag, _pyramid_reference(text, [1, 2, 3]))
    # level 1 alone is the plain bag: 1 for each class in the line
    plain = bag_targets(targets, lengths)
    assert plain.shape == (4, VOCAB_SIZE)
    assert plain[0].nonzero().flatten().tolist() == sorted({char_class(c) for c in "ཀ་ཁ"})
    # "ཀཀཀཀཁ" at level 2: ཀ in both halves, ཁ only in the second
    second = bags[3, VOCAB_SIZE:3 * VOCAB_SIZE].reshape(2, VOCAB_SIZE)
    assert second[:, char_class("ཁ")].tolist() == [0.0, 1.0] and second[:, char_class("ཀ")].tolist() == [1.0, 1.0]


def test_bag_loss_is_lowest_at_the_pyramid():
    targets, lengths = reading_targets(["ཀཁག", "ང"])
    bags = bag_targets(targets, lengths, levels=[1, 2])
    right = bag_loss((bags * 2 - 1) * 20, targets, lengths, levels=[1, 2])
    wrong = bag_loss((bags.flip(0) * 2 - 1) * 20, targets, lengths, levels=[1, 2])
    assert right.item() < 1e-6 < wrong.item()
    assert BagHead(8, parts=3)(torch.zeros(2, 8)).shape == (2, 3 * VOCAB_SIZE)


def test_byte_texts_spell_what_the_text_tower_saw():
    texts = ["ཀ་ཁ", "a ག", ""]
    ids, mask, _ = byte_encode(texts, max_length=16)
    assert byte_texts(ids, mask) == texts
    # a cut inside a 3-byte character drops that character, not the line
    cut_ids, cut_mask, _ = byte_encode(["ཀཁ"], max_length=5)
    assert byte_texts(cut_ids, cut_mask) == ["ཀ"]
