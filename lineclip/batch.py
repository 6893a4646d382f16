"""From LineRecords to model batches: byte-level text encoding, a corruption-tolerant dataset, and a
sampler that only ever puts lines of one canvas width (bucket) into a batch.

One bucket per batch is what keeps an image's embedding independent of its batch mates: no image is
padded to the widest line of its batch, so no padding mask is needed on the vision side.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from lineclip.manifest import LineRecord
from lineclip.preprocess import DEFAULT_MAX_IMAGE_PIXELS, TooManyPixels, image_size, load_image

if TYPE_CHECKING:
    from lineclip.preprocess import LineImageTransform

logger = logging.getLogger(__name__)

# ByT5's vocabulary: 0 <pad>, 1 </s>, 2 <unk>, then the 256 byte values shifted by 3.
PAD_ID, EOS_ID, BYTE_OFFSET = 0, 1, 3

# What a broken image file raises in PIL: truncated data and bad headers (OSError, of which
# UnidentifiedImageError is a subclass), nonsense sizes/modes (ValueError), absurd dimensions.
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    UnidentifiedImageError,
    ValueError,
    Image.DecompressionBombError,
)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _cut_at_char_boundary(data: bytes, limit: int) -> int:
    """Largest length <= limit that does not end inside a multi-byte UTF-8 character."""
    if len(data) <= limit:
        return len(data)
    end = limit
    # data[end] is the first byte dropped; while it is a continuation byte (10xxxxxx) the cut splits a
    # character, so back up to that character's lead byte (at most 3 steps for valid UTF-8).
    while end > 0 and (data[end] & 0xC0) == 0x80:
        end -= 1
    return end


def encode_texts(
    texts: Sequence[str], max_length: int, pad_to_multiple: int = 8
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """ByT5 input ids and attention mask ([B, L], int64) plus how many texts had to be truncated.

    Each text becomes its UTF-8 bytes + 3 followed by </s>. A text needing more than ``max_length``
    ids is cut to ``max_length - 1`` bytes or fewer, at a character boundary, so the model never sees
    half a Tibetan character. L is the longest row rounded up to ``pad_to_multiple`` (friendlier
    shapes for kernels and compilation caches), which never exceeds ``max_length`` rounded up.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1 (room for </s>), got {max_length}")
    if pad_to_multiple < 1:
        raise ValueError(f"pad_to_multiple must be >= 1, got {pad_to_multiple}")
    byte_budget = max_length - 1
    pieces: list[bytes] = []
    lengths = np.empty(len(texts), dtype=np.int64)
    n_truncated = 0
    for row, text in enumerate(texts):
        data = text.encode("utf-8")
        keep = _cut_at_char_boundary(data, byte_budget)
        n_truncated += keep < len(data)
        pieces.append(data[:keep])
        lengths[row] = keep

    batch = len(texts)
    width = _round_up(int(lengths.max()) + 1, pad_to_multiple) if batch else 0
    input_ids = np.full((batch, width), PAD_ID, dtype=np.int64)
    if batch:
        flat = np.frombuffer(b"".join(pieces), dtype=np.uint8).astype(np.int64) + BYTE_OFFSET
        starts = np.cumsum(lengths) - lengths
        rows = np.repeat(np.arange(batch), lengths)
        cols = np.arange(flat.size) - np.repeat(starts, lengths)
        input_ids[rows, cols] = flat
        input_ids[np.arange(batch), lengths] = EOS_ID
    attention_mask = (np.arange(width)[None, :] <= lengths[:, None]).astype(np.int64)
    return torch.from_numpy(input_ids), torch.from_numpy(attention_mask), n_truncated


def count_truncated(texts: Iterable[str], max_length: int) -> int:
    """How many texts would not fit ``max_length`` ids (UTF-8 bytes + </s>) and would be cut."""
    return sum(len(text.encode("utf-8")) + 1 > max_length for text in texts)


def text_lengths(texts: Iterable[str], max_length: int) -> np.ndarray:
    """Per text, the number of ids ``encode_texts`` gives it (UTF-8 bytes after truncation + </s>, so at most
    ``max_length``): the ``lengths`` that ``BucketBatchSampler`` groups by."""
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1 (room for </s>), got {max_length}")
    budget = max_length - 1
    return np.array([_cut_at_char_boundary(text.encode("utf-8"), budget) + 1 for text in texts], dtype=np.int64)


def text_padding_fraction(
    batches: Iterable[Sequence[int]], lengths: Sequence[int] | np.ndarray, pad_to_multiple: int = 8
) -> float:
    """Share of the text positions that are padding over ``batches`` (lists of record indices), with each
    batch encoded as ``encode_texts`` does: ``[B, longest rounded up to pad_to_multiple]``, where record i
    takes ``lengths[i]`` ids (see ``text_lengths``). 0.0 when there is nothing to encode."""
    if pad_to_multiple < 1:
        raise ValueError(f"pad_to_multiple must be >= 1, got {pad_to_multiple}")
    length_array = np.asarray(lengths, dtype=np.int64)
    padded = total = 0
    for batch in batches:
        if len(batch) == 0:
            continue
        batch_lengths = length_array[np.asarray(batch, dtype=np.int64)]
        width = _round_up(int(batch_lengths.max()), pad_to_multiple)
        total += width * batch_lengths.size
        padded += width * batch_lengths.size - int(batch_lengths.sum())
    return padded / total if total else 0.0


def _where(record: LineRecord) -> str:
    return f"{record.image_path} ({record.source})" if record.source else record.image_path


def _header_size(path: str, max_pixels: int | None = None) -> tuple[int, int] | str | None:
    """(width, height) as the model sees the image (EXIF orientation applied), "too_large_image" past the pixel
    limit, or None for any header that cannot be read (FIFOs and devices are refused without reading)."""
    try:
        # Only the header is parsed; pixel data is decoded later, in the worker that needs it.
        return image_size(path, DEFAULT_MAX_IMAGE_PIXELS if max_pixels is None else max_pixels)
    except TooManyPixels:
        return "too_large_image"
    except _DECODE_ERRORS:
        return None


class LineDataset(torch.utils.data.Dataset):
    """Line images (transformed) with their texts. A file that fails to decode yields
    ``{"index": i, "corrupt": "corrupt_image"}``, never raises, so a data-loader worker never dies.

    ``buckets[i]`` is the canvas width record i will get, computed up front from image headers so the
    sampler can group lines without decoding them; -1 marks a header that could not be read (such
    records are counted in ``n_unreadable_headers`` and never sampled).
    """

    def __init__(
        self,
        records: Sequence[LineRecord],
        transform: LineImageTransform,
        header_workers: int | None = None,
        crop_to_text_bytes: int | None = None,
        max_image_pixels: int | None = None,
    ) -> None:
        """`crop_to_text_bytes`: when a transcription is cut to this many bytes (text.max_length), cut its image to
        the same leading share of its width, so image and text still show the same part of the line.
        `max_image_pixels`: images whose header claims more are never decoded (counted as too_large_image);
        None: lineclip.preprocess.DEFAULT_MAX_IMAGE_PIXELS, 0: no limit of lineclip's own."""
        self.records = records
        self.transform = transform
        self.max_image_pixels = DEFAULT_MAX_IMAGE_PIXELS if max_image_pixels is None else max_image_pixels
        self.visible_share = np.ones(len(records))
        if crop_to_text_bytes:
            for i, record in enumerate(records):
                total = len(record.text.encode("utf-8"))
                kept = _cut_at_char_boundary(record.text.encode("utf-8"), crop_to_text_bytes - 1)
                # a little slack so the last kept syllable is not sliced through
                self.visible_share[i] = min(1.0, kept / total * 1.04 + 0.01) if kept < total else 1.0
        paths = [record.image_path for record in records]
        workers = header_workers if header_workers is not None else min(8, os.cpu_count() or 1)
        # Header reads are I/O bound (and slow on network file systems), so threads overlap them well.
        if workers > 1 and len(paths) > 256:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                sizes = list(pool.map(lambda path: _header_size(path, self.max_image_pixels), paths))
        else:
            sizes = [_header_size(path, self.max_image_pixels) for path in paths]
        # Found before training, from headers: "empty_image" (a zero-byte file or a zero width/height, what a
        # degenerate OCR crop leaves; decoders refuse a 0-px header) or "unreadable_image" (any other header
        # that fails). Such lines are never sampled; the trainer counts them by kind or, in error mode, stops.
        self.image_problems: dict[int, str] = {}
        for i, size in enumerate(sizes):
            if isinstance(size, str):
                self.image_problems[i] = size
            elif size is None:
                empty = os.path.isfile(paths[i]) and os.path.getsize(paths[i]) == 0
                self.image_problems[i] = "empty_image" if empty else "unreadable_image"
            elif min(size) <= 0:
                self.image_problems[i] = "empty_image"
        self.buckets = np.array(
            [-1 if i in self.image_problems else transform.bucket_of(*self._visible(i, size))
             for i, size in enumerate(sizes)],
            dtype=np.int64,
        )
        self.unreadable_indices: list[int] = sorted(self.image_problems)
        self.n_unreadable_headers = len(self.unreadable_indices)
        if self.n_unreadable_headers:
            first = records[self.unreadable_indices[0]]
            logger.warning(
                "%d of %d line images have unreadable or empty headers and will not be sampled (first: %s)",
                self.n_unreadable_headers,
                len(records),
                _where(first),
            )

    def _visible(self, index: int, size: tuple[int, int]) -> tuple[int, int]:
        width, height = size
        return max(1, math.ceil(width * self.visible_share[index])), height

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        try:
            # Decoded here, inside the try (a truncated JPEG opens fine and only fails once its pixels are
            # read), turned by its EXIF orientation as the header size was. No mode conversion here: the
            # transform owns it (it flattens alpha onto white paper, which a plain convert("RGB") would turn black).
            image = load_image(record.image_path, self.max_image_pixels)
            if self.visible_share[index] < 1.0:
                image = image.crop((0, 0, *self._visible(index, image.size)))
        except _DECODE_ERRORS as exc:
            logger.warning("skipping corrupt line image %s: %s", _where(record), exc)
            return {"index": index, "corrupt": "corrupt_image"}
        try:
            pixel_values = self.transform(image)
        except Exception as exc:
            # Not a data problem we can count and skip: surface it, with the file that triggered it.
            raise RuntimeError(f"image transform failed on {_where(record)}") from exc
        bucket = int(self.buckets[index])
        if pixel_values.shape[-1] != bucket:
            # The header lied (e.g. the file changed since the dataset was built); a batch of mixed widths
            # would fail to stack, so this line is treated like a corrupt one.
            logger.warning(
                "line image %s decoded to width %d, expected bucket %d; skipping it",
                _where(record),
                pixel_values.shape[-1],
                bucket,
            )
            return {"index": index, "corrupt": "corrupt_image"}
        return {"pixel_values": pixel_values, "text": record.text, "index": index}


class BucketBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of indices that all share one bucket (canvas width); bucket -1 is never sampled.

    With ``lengths`` (per record, the text ids it will get: ``text_lengths(texts, max_length)``), a batch
    also shares one text-length bucket, ``lengths[i] // text_bucket_bytes``, so a batch of short lines is
    not padded to one long line: ByT5's cost grows with the padded length. A group is then one (width,
    text bucket) pair; without ``lengths`` it is one width, as before.

    With ``shuffle``, indices are shuffled within each group and the batch order is shuffled, both with
    a numpy Generator seeded from ``(seed, epoch)``, so an epoch is reproducible. Without, indices keep
    manifest order and groups come in ascending (width, text bucket) order.

    Multi-process note: accelerate's ``BatchSamplerShard`` assumes every batch but the last has
    ``batch_size`` items. With ``drop_last=False`` each bucket ends in a short batch, which accelerate
    would drop or top up with indices of another bucket, so shard training with ``drop_last=True``.
    """

    def __init__(
        self,
        buckets: Sequence[int] | np.ndarray,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool = False,
        lengths: Sequence[int] | np.ndarray | None = None,
        text_bucket_bytes: int = 64,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if text_bucket_bytes < 1:
            raise ValueError(f"text_bucket_bytes must be >= 1, got {text_bucket_bytes}")
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.text_bucket_bytes = text_bucket_bytes
        bucket_array = np.asarray(buckets, dtype=np.int64)
        if lengths is None:
            text_keys = np.zeros_like(bucket_array)
        else:
            length_array = np.asarray(lengths, dtype=np.int64)
            if length_array.shape != bucket_array.shape:
                raise ValueError(f"lengths has shape {length_array.shape}, buckets {bucket_array.shape}")
            if length_array.size and length_array.min() < 0:
                raise ValueError("lengths must be >= 0")
            text_keys = length_array // text_bucket_bytes
        sampled = np.flatnonzero(bucket_array != -1)
        # Stable sort by (width, text bucket): each group keeps manifest order, groups come in ascending order.
        by_group = sampled[np.lexsort((text_keys[sampled], bucket_array[sampled]))]
        keys = np.stack([bucket_array[by_group], text_keys[by_group]], axis=1)
        starts = np.flatnonzero(np.any(keys[1:] != keys[:-1], axis=1)) + 1
        self._groups: list[np.ndarray] = [g for g in np.split(by_group, starts) if g.size]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches_in(self, n_items: int) -> int:
        return n_items // self.batch_size if self.drop_last else -(-n_items // self.batch_size)

    def __len__(self) -> int:
        return sum(self._batches_in(group.size) for group in self._groups)

    def __iter__(self) -> Iterator[list[int]]:
        # (seed, epoch) as entropy rather than seed + epoch: seed 0 epoch 1 must not replay seed 1 epoch 0.
        rng = np.random.default_rng([self.seed, self.epoch])
        batches: list[np.ndarray] = []
        for group in self._groups:
            order = rng.permutation(group) if self.shuffle else group
            for start in range(0, self._batches_in(order.size) * self.batch_size, self.batch_size):
                batches.append(order[start : start + self.batch_size])
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        for batch in batches:
            yield batch.tolist()


@dataclass
class LineCollator:
    """Stacks one bucket's images and byte-encodes the texts. Corrupt items (marked, or None) are
    dropped and counted; if every item was corrupt the batch has B == 0 so the trainer can skip it."""

    max_length: int
    pad_to_multiple: int = 8

    def __call__(self, items: list[dict[str, Any] | None]) -> dict[str, Any]:
        good = [item for item in items if item is not None and "corrupt" not in item]
        n_corrupt = len(items) - len(good)
        corrupt_indices = [item["index"] for item in items if item is not None and "corrupt" in item]
        if not good:
            return {
                "pixel_values": torch.zeros((0, 3, 0, 0), dtype=torch.float32),
                "input_ids": torch.zeros((0, 0), dtype=torch.long),
                "attention_mask": torch.zeros((0, 0), dtype=torch.long),
                "indices": torch.zeros((0,), dtype=torch.long),
                "n_corrupt": n_corrupt,
                "corrupt_indices": corrupt_indices,
                "n_truncated": 0,
            }
        shapes = {tuple(item["pixel_values"].shape) for item in good}
        if len(shapes) != 1:
            # An explicit check rather than `assert`, which `python -O` would strip.
            raise ValueError(f"a batch must hold one bucket (one image shape), got shapes {sorted(shapes)}")
        input_ids, attention_mask, n_truncated = encode_texts(
            [item["text"] for item in good], self.max_length, self.pad_to_multiple
        )
        return {
            "pixel_values": torch.stack([item["pixel_values"] for item in good]),
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "indices": torch.tensor([item["index"] for item in good], dtype=torch.long),
            "n_corrupt": n_corrupt,
            "corrupt_indices": corrupt_indices,
            "n_truncated": n_truncated,
        }
