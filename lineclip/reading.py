"""An auxiliary reading loss for the image tower: CTC over the patch columns of a line, as OCR models read.

Why: a from-scratch image tower trained by the contrastive loss alone gets one bit of signal per line (which
text is mine?), and while its features cannot tell lines apart, the cheapest way to lower that loss is to
make every embedding the same (the loss then sits at exactly ln B and its gradient vanishes). A reading
loss gives every line dozens of targets (its characters, in order) from the first step, so the patch
features learn glyphs whatever the contrastive loss is doing; the CLS token that the embedding is made of
then has something to pool. The head is training-only: bundles and the Workbench never see it.

Targets are Unicode code points, not ByT5 bytes: a Tibetan character is 3 bytes, and a 32 px line of 110 px
has 14 patch columns, so bytes would need more frames than the line has. The Tibetan block (U+0F00-U+0FFF)
gets one class per code point, the space one, anything else one shared class; 0 is CTC's blank.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

BLANK = 0
TIBETAN_FIRST = 0x0F00
SPACE_CLASS = 257
OTHER_CLASS = 258
VOCAB_SIZE = 259
BAG_PRIOR_LOGIT = -3.0


def char_class(char: str) -> int:
    code = ord(char)
    if TIBETAN_FIRST <= code < TIBETAN_FIRST + 256:
        return code - TIBETAN_FIRST + 1
    return SPACE_CLASS if char == " " else OTHER_CLASS


def reading_targets(texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """CTC targets of a batch: all texts' classes concatenated ([sum of lengths]) and each text's length."""
    classes = [[char_class(c) for c in text] for text in texts]
    lengths = torch.tensor([len(c) for c in classes], dtype=torch.long)
    flat = torch.tensor([c for cs in classes for c in cs], dtype=torch.long)
    return flat, lengths


class ReadingHead(nn.Module):
    """Patch tokens [B, rows*cols, D] -> per-frame class logits [B, cols*frames_per_column, VOCAB_SIZE].

    The rows of each patch column are averaged (a line is one row of text), then each column is split into
    `frames_per_column` frames, so a column can emit several characters (Tibetan stacks are narrow).

    It reads the last layer's tokens before the backbone's final LayerNorm (the one the CLS embedding passes),
    through a LayerNorm of its own, so the two heads do not fight over one norm's gain."""

    def __init__(self, hidden_size: int, frames_per_column: int = 4) -> None:
        super().__init__()
        self.frames_per_column = frames_per_column
        self.norm = nn.LayerNorm(hidden_size)
        self.proj = nn.Linear(hidden_size, frames_per_column * VOCAB_SIZE)
        # Start at CTC's prior (about half the frames blank) so that the first thing the loss learns, "mostly
        # blank, whatever the image", is already in the head's bias. Left at zero, that answer is learnt
        # faster by the backbone as a whole (Adam moves each of its many weights by ~lr a step) than by one
        # bias, and the backbone turns input-blind: every image embedding the same within ~30 steps.
        with torch.no_grad():
            self.proj.bias.view(frames_per_column, VOCAB_SIZE)[:, BLANK] = math.log(VOCAB_SIZE)

    def forward(self, patch_tokens: torch.Tensor, rows: int) -> torch.Tensor:
        batch, n, dim = patch_tokens.shape
        columns = patch_tokens.reshape(batch, rows, n // rows, dim).mean(dim=1)
        return self.proj(self.norm(columns)).reshape(batch, -1, VOCAB_SIZE)


class BagHead(nn.Module):
    """The pooled image feature (DINOv2's CLS, what the embedding is made of) -> one logit per class: which
    characters occur in the line, in any order. A direct reading signal on the token the embedding uses."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden_size, VOCAB_SIZE)
        # At the prior (a line holds ~15 of the 259 classes: logit -3), for the reason given in ReadingHead.
        nn.init.constant_(self.proj.bias, BAG_PRIOR_LOGIT)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.proj(pooled)


def bag_targets(targets: torch.Tensor, target_lengths: torch.Tensor) -> torch.Tensor:
    """Multi-hot [B, VOCAB_SIZE] from CTC targets: 1 where the class occurs in the line."""
    rows = torch.repeat_interleave(torch.arange(len(target_lengths)), target_lengths)
    bag = torch.zeros(len(target_lengths), VOCAB_SIZE)
    bag[rows, targets] = 1.0
    return bag


def bag_loss(logits: torch.Tensor, targets: torch.Tensor, target_lengths: torch.Tensor) -> torch.Tensor:
    bag = bag_targets(targets, target_lengths).to(logits.device)
    return F.binary_cross_entropy_with_logits(logits.float(), bag)


def reading_loss(logits: torch.Tensor, targets: torch.Tensor, target_lengths: torch.Tensor) -> torch.Tensor:
    """CTC loss per target character, averaged over the batch. A line longer than its frames can emit has
    no alignment: its term is zeroed (zero_infinity), not allowed to turn the step non-finite."""
    log_probs = F.log_softmax(logits.float(), dim=-1).transpose(0, 1)  # [T, B, V], as ctc_loss wants
    input_lengths = torch.full((logits.shape[0],), logits.shape[1], dtype=torch.long)
    return F.ctc_loss(log_probs, targets, input_lengths, target_lengths, blank=BLANK, reduction="mean",
                      zero_infinity=True)
