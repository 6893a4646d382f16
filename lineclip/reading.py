"""An auxiliary reading loss for the image tower: CTC over the patch columns of a line, as OCR models read.

Why: a from-scratch image tower trained by the contrastive loss alone gets one bit of signal per line (which
text is mine?), and while its features cannot tell lines apart, the cheapest way to lower that loss is to
make every embedding the same (the loss then sits at exactly ln B and its gradient vanishes). A reading
loss gives every line dozens of targets (its characters, in order) from the first step, so the patch
features learn glyphs whatever the contrastive loss is doing; the CLS token that the embedding is made of
then has something to pool. The head is never part of a bundle (the Workbench never sees it): the final one is
saved beside the run's bundle (`save_reading_head`), so that validation and `lineclip.evaluate` can decode what
the tower reads (`greedy_decode`) and measure it as OCR is (lineclip.transcripts: CER, decode-then-match).

Targets are Unicode code points, not ByT5 bytes: a Tibetan character is 3 bytes, and a 32 px line of 110 px
has 14 patch columns, so bytes would need more frames than the line has. The Tibetan block (U+0F00-U+0FFF)
gets one class per code point, the space one, anything else one shared class; 0 is CTC's blank.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

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
    """A pooled feature (DINOv2's CLS, what the image embedding is made of, or the text tower's mean, what the text
    embedding is made of) -> one logit per class and part: which characters occur in each of the line's parts
    (`parts` = the sum of the pyramid levels, `bag_targets`). A direct reading signal on the token the embedding
    uses; with more than one level it also says where (PHOC's spatial pyramid)."""

    def __init__(self, hidden_size: int, parts: int = 1) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden_size, parts * VOCAB_SIZE)
        # At the prior (a line holds ~15 of the 259 classes: logit -3), for the reason given in ReadingHead.
        nn.init.constant_(self.proj.bias, BAG_PRIOR_LOGIT)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.proj(pooled)


def bag_targets(targets: torch.Tensor, target_lengths: torch.Tensor, levels: Sequence[int] = (1,)) -> torch.Tensor:
    """Multi-hot [B, sum(levels) * VOCAB_SIZE] from CTC targets, a pyramid as PHOC's (Almazan et al. 2014): at
    level L the line's characters are cut into L runs of equal length, and a character belongs to the run its
    centre falls in ((2i + 1) L / 2n for character i of n); 1 where a class occurs in a run. Level 1 alone is the
    bag of the whole line."""
    n_lines = len(target_lengths)
    rows = torch.repeat_interleave(torch.arange(n_lines), target_lengths)
    starts = torch.cumsum(target_lengths, 0) - target_lengths
    position = torch.arange(len(targets)) - torch.repeat_interleave(starts, target_lengths)
    length = target_lengths[rows]
    bags = []
    for level in levels:
        part = ((2 * position + 1) * level) // (2 * length)
        bag = torch.zeros(n_lines, level, VOCAB_SIZE)
        bag[rows, part, targets] = 1.0
        bags.append(bag.reshape(n_lines, level * VOCAB_SIZE))
    return torch.cat(bags, dim=1)


def bag_loss(logits: torch.Tensor, targets: torch.Tensor, target_lengths: torch.Tensor,
             levels: Sequence[int] = (1,)) -> torch.Tensor:
    bag = bag_targets(targets, target_lengths, levels).to(logits.device)
    return F.binary_cross_entropy_with_logits(logits.float(), bag)


@dataclass(frozen=True)
class ReadingWeights:
    """How much each reading target weighs beside the contrastive loss (0: off), from `loss.*`: CTC over the image
    tower's columns, the bag (pyramid) of characters on the image CLS, and the same bag on the text tower's mean."""

    ctc: float = 0.0
    bag: float = 0.0
    text_bag: float = 0.0
    bag_levels: tuple[int, ...] = (1,)

    @classmethod
    def from_loss(cls, loss: object) -> ReadingWeights:
        return cls(loss.reading_weight, loss.bag_weight, loss.text_bag_weight, tuple(loss.bag_levels))


NO_READING = ReadingWeights()  # the contrastive loss alone


def byte_texts(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[str]:
    """The texts a batch's ByT5 ids spell (ids 0-2 are pad, </s> and unk; a byte is its id - 3): what the text
    tower saw, a phrase where training cut one (data.text_span), a cut at max_length dropping a broken character."""
    texts = []
    for ids, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
        raw = bytes(i - 3 for i, m in zip(ids, mask, strict=True) if m and 3 <= i < 259)
        texts.append(raw.decode("utf-8", errors="ignore"))
    return texts


def reading_loss(logits: torch.Tensor, targets: torch.Tensor, target_lengths: torch.Tensor) -> torch.Tensor:
    """CTC loss per target character, averaged over the batch. A line longer than its frames can emit has
    no alignment: its term is zeroed (zero_infinity), not allowed to turn the step non-finite."""
    log_probs = F.log_softmax(logits.float(), dim=-1).transpose(0, 1)  # [T, B, V], as ctc_loss wants
    input_lengths = torch.full((logits.shape[0],), logits.shape[1], dtype=torch.long)
    return F.ctc_loss(log_probs, targets, input_lengths, target_lengths, blank=BLANK, reduction="mean",
                      zero_infinity=True)


# ------------------------------------------------------------------------------ reading out: greedy CTC decoding

# What OTHER_CLASS decodes to: the head cannot say which non-Tibetan character it saw.
OTHER_CHAR = "\ufffd"


def class_char(index: int) -> str:
    """The inverse of `char_class`: a class's character ("" for the blank, U+FFFD for the shared other class)."""
    if index == BLANK:
        return ""
    if 1 <= index <= 256:
        return chr(TIBETAN_FIRST + index - 1)
    if index == SPACE_CLASS:
        return " "
    if index == OTHER_CLASS:
        return OTHER_CHAR
    raise ValueError(f"no reading class {index} (0-{VOCAB_SIZE - 1})")


def readable_text(text: str) -> str:
    """`text` as the head can write it (every character through char_class and back): the reference a reading
    is compared with, so that a Latin digit the head can only call "other" is not counted against it twice."""
    return "".join(class_char(char_class(c)) for c in text)


def greedy_decode(logits: torch.Tensor) -> list[str]:
    """Best-path CTC decoding of [B, frames, VOCAB_SIZE] logits: the most likely class per frame, repeats collapsed,
    blanks dropped, classes mapped back to characters (a blank between two equal classes keeps both)."""
    best = logits.argmax(dim=-1).cpu()
    keep = best != BLANK
    keep[:, 1:] &= best[:, 1:] != best[:, :-1]
    return ["".join(class_char(int(c)) for c in row[mask]) for row, mask in zip(best, keep, strict=True)]


# ------------------------------------------------------------------- the head beside a run's bundle (never in it)

READING_HEAD_WEIGHTS = "reading_head.safetensors"
READING_HEAD_CONFIG = "reading_head.json"
READING_HEAD_FORMAT = 1


def save_reading_head(head: ReadingHead, directory: str | Path, bundle_fingerprint: str) -> None:
    """`reading_head.safetensors` + `reading_head.json` in `directory` (a run dir, beside its final bundle: the
    Workbench loads the bundle's own entries only, so the head never changes what it sees). The json records the
    geometry (hidden size, frames per column, classes) and the fingerprint of the bundle the head was trained with,
    so that a head left beside another model is refused rather than read wrongly. Each file is written to a
    temporary name and renamed into place, the json last."""
    from safetensors.torch import save_file

    directory = Path(directory)
    config = {"format": READING_HEAD_FORMAT, "hidden_size": head.norm.normalized_shape[0],
              "frames_per_column": head.frames_per_column, "vocab_size": VOCAB_SIZE,
              "classes": "blank, U+0F00-U+0FFF, space, other", "bundle_fingerprint": bundle_fingerprint}
    weights_tmp = directory / f".{READING_HEAD_WEIGHTS}.tmp"
    config_tmp = directory / f".{READING_HEAD_CONFIG}.tmp"
    try:
        save_file({k: v.detach().float().cpu().contiguous() for k, v in head.state_dict().items()}, weights_tmp)
        config_tmp.write_text(json.dumps(config, indent=2), encoding="utf-8")
        weights_tmp.replace(directory / READING_HEAD_WEIGHTS)
        config_tmp.replace(directory / READING_HEAD_CONFIG)
    finally:
        weights_tmp.unlink(missing_ok=True)
        config_tmp.unlink(missing_ok=True)


def load_reading_head(directory: str | Path, bundle_fingerprint: str | None) -> tuple[ReadingHead | None, str]:
    """The head saved beside a bundle, or (None, why not). Refused (None) when there is none, when its json does not
    parse or name this geometry, or when it was trained with another bundle (`bundle_fingerprint` differs). Weights
    load through safetensors only (no pickle)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path, weights_path = directory / READING_HEAD_CONFIG, directory / READING_HEAD_WEIGHTS
    if not config_path.is_file() or not weights_path.is_file():
        return None, f"no {READING_HEAD_CONFIG} and {READING_HEAD_WEIGHTS} in {directory}"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if config.get("format") != READING_HEAD_FORMAT or config.get("vocab_size") != VOCAB_SIZE:
            return None, f"{config_path}: format {config.get('format')} / vocab {config.get('vocab_size')} unknown"
        if config.get("bundle_fingerprint") != bundle_fingerprint:
            return None, f"{config_path} was saved with another model (fingerprint {config.get('bundle_fingerprint')})"
        head = ReadingHead(int(config["hidden_size"]), int(config["frames_per_column"]))
        head.load_state_dict(load_file(weights_path))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as exc:
        return None, f"{weights_path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    return head.eval(), ""
