"""From LineRecords to model batches: byte-level text encoding, a corruption-tolerant dataset, and a
sampler that only ever puts lines of one canvas width (bucket) into a batch.

One bucket per batch is what keeps an image's embedding independent of its batch mates: no image is
padded to the widest line of its batch, so no padding mask is needed on the vision side.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from lineclip.lines import LineRecord, LineTable, StringColumn
from lineclip.phrases import sample_phrase
from lineclip.preprocess import (
    DECODE_ERRORS,
    DEFAULT_MAX_IMAGE_PIXELS,
    load_image,
    round_up,
)
from lineclip.reading import reading_targets

if TYPE_CHECKING:
    from lineclip.preprocess import LineImageTransform

logger = logging.getLogger(__name__)

# ByT5's vocabulary: 0 <pad>, 1 </s>, 2 <unk>, then the 256 byte values shifted by 3.
PAD_ID, EOS_ID, BYTE_OFFSET = 0, 1, 3



def cut_at_char_boundary(data: bytes, limit: int) -> int:
    """Largest length <= limit that does not end inside a multi-byte UTF-8 character."""
    if len(data) <= limit:
        return len(data)
    end = limit
    # data[end] is the first byte dropped; while it is a continuation byte (10xxxxxx) the cut splits a
    # character, so back up to that character's lead byte (at most 3 steps for valid UTF-8).
    while end > 0 and (data[end] & 0xC0) == 0x80:
        end -= 1
    return end


def byte_encode(
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
        keep = cut_at_char_boundary(data, byte_budget)
        n_truncated += keep < len(data)
        pieces.append(data[:keep])
        lengths[row] = keep

    batch = len(texts)
    width = round_up(int(lengths.max()) + 1, pad_to_multiple) if batch else 0
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


def _byte_lengths(texts: Iterable[str] | StringColumn) -> np.ndarray:
    if isinstance(texts, StringColumn):
        return texts.byte_lengths()
    return np.array([len(text.encode("utf-8")) for text in texts], dtype=np.int64)


def count_truncated(texts: Iterable[str] | StringColumn, max_length: int) -> int:
    """How many texts would not fit ``max_length`` ids (UTF-8 bytes + </s>) and would be cut."""
    return int((_byte_lengths(texts) + 1 > max_length).sum())


def text_lengths(texts: Sequence[str] | StringColumn, max_length: int) -> np.ndarray:
    """Per text, the number of ids ``byte_encode`` gives it (UTF-8 bytes after truncation + </s>, so at most
    ``max_length``): the ``lengths`` that ``BucketBatchSampler`` groups by. Only the texts that are cut are
    looked at one by one (for the character boundary)."""
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1 (room for </s>), got {max_length}")
    budget = max_length - 1
    if isinstance(texts, StringColumn):
        return texts.cut_lengths(budget) + 1
    if not isinstance(texts, Sequence):
        texts = list(texts)
    lengths = _byte_lengths(texts)
    for i in np.flatnonzero(lengths > budget).tolist():
        lengths[i] = cut_at_char_boundary(texts[i].encode("utf-8"), budget)
    return lengths + 1


def text_padding_fraction(
    batches: Iterable[Sequence[int]], lengths: Sequence[int] | np.ndarray, pad_to_multiple: int = 8
) -> float:
    """Share of the text positions that are padding over ``batches`` (lists of record indices), with each
    batch encoded as ``byte_encode`` does: ``[B, longest rounded up to pad_to_multiple]``, where record i
    takes ``lengths[i]`` ids (see ``text_lengths``). 0.0 when there is nothing to encode."""
    if pad_to_multiple < 1:
        raise ValueError(f"pad_to_multiple must be >= 1, got {pad_to_multiple}")
    length_array = np.asarray(lengths, dtype=np.int64)
    # index arrays as they are (the sampler's int32), lists as int64
    arrays = [batch if isinstance(batch, np.ndarray) else np.asarray(batch, dtype=np.int64) for batch in batches]
    arrays = [batch for batch in arrays if batch.size]
    if not arrays:
        return 0.0
    # All batches at once (a million-line epoch is tens of thousands of batches): per batch its longest text.
    sizes = np.array([batch.size for batch in arrays])
    batch_lengths = length_array[np.concatenate(arrays)]
    longest = np.maximum.reduceat(batch_lengths, np.cumsum(sizes) - sizes)
    widths = -(-longest // pad_to_multiple) * pad_to_multiple
    total = int((widths * sizes).sum())
    return (total - int(batch_lengths.sum())) / total if total else 0.0


def _where(record: LineRecord) -> str:
    return f"{record.image_path} ({record.source})" if record.source else record.image_path


def visible_shares(texts: StringColumn | Sequence[str], crop_to_text_bytes: int | None) -> np.ndarray | None:
    """Per line the leading share of its image width that its text still describes once cut to
    `crop_to_text_bytes` (text.max_length) ids; 1.0 for every text that is not cut. None without a crop (every
    share would be 1.0: 8 bytes a line for nothing)."""
    if not crop_to_text_bytes:
        return None
    if isinstance(texts, StringColumn):
        total = texts.byte_lengths()
    else:
        total = np.array([len(text.encode("utf-8")) for text in texts], dtype=np.int64)
    share = np.ones(len(total), dtype=np.float64)
    for i in np.flatnonzero(total > crop_to_text_bytes - 1).tolist():
        data = texts[i].encode("utf-8")
        kept = cut_at_char_boundary(data, crop_to_text_bytes - 1)
        # a little slack so the last kept syllable is not sliced through
        share[i] = min(1.0, kept / len(data) * 1.04 + 0.01) if kept < len(data) else 1.0
    return share


class LineDataset(torch.utils.data.Dataset):
    """Line images (transformed) with their texts. A file that fails to decode yields
    ``{"index": i, "corrupt": "corrupt_image"}``, never raises, so a data-loader worker never dies.

    ``buckets[i]`` is the canvas width record i will get, computed up front from image sizes (the table's, from
    the line cache or the manifest, else read from the headers here) so the sampler can group lines without
    decoding them; -1 marks an image that cannot be used (such records are counted in
    ``n_unreadable_headers`` and never sampled).

    The records are held as a LineTable (columns, not Python objects): with fork-started loader workers nothing
    per line is refcounted, so the workers share the parent's pages instead of copying them.
    """

    def __init__(
        self,
        records: Sequence[LineRecord] | LineTable,
        transform: LineImageTransform,
        header_workers: int | None = None,
        crop_to_text_bytes: int | None = None,
        max_image_pixels: int | None = None,
    ) -> None:
        """`crop_to_text_bytes`: when a transcription is cut to this many bytes (text.max_length), cut its image to
        the same leading share of its width, so image and text still show the same part of the line.
        `max_image_pixels`: images whose header claims more are never decoded (counted as too_large_image);
        None: lineclip.preprocess.DEFAULT_MAX_IMAGE_PIXELS, 0: no limit of lineclip's own."""
        from lineclip.sizes import IMAGE_PROBLEMS, complete_sizes

        table = records if isinstance(records, LineTable) else LineTable.from_records(records)
        self.transform = transform
        self.max_image_pixels = DEFAULT_MAX_IMAGE_PIXELS if max_image_pixels is None else max_image_pixels
        self.visible_share = visible_shares(table.texts, crop_to_text_bytes)
        # Sizes not known yet are read from the headers (in parallel: lineclip.sizes).
        self.records = complete_sizes(table, self.max_image_pixels, header_workers, progress=False)
        sizes = self.records.sizes
        # Found before training, from headers: "empty_image" (a zero-byte file or a zero width/height, what a
        # degenerate OCR crop leaves; decoders refuse a 0-px header), "unreadable_image" (any other header that
        # fails) or "too_large_image". Such lines are never sampled; the trainer counts them by kind or, in error
        # mode, stops.
        problems = np.flatnonzero(sizes[:, 0] < 0)
        self.image_problems: dict[int, str] = {int(i): IMAGE_PROBLEMS.get(int(sizes[i, 0]), "unreadable_image")
                                              for i in problems}
        self.buckets = self._bucket_array(sizes)
        self.unreadable_indices: list[int] = problems.tolist()
        self.n_unreadable_headers = len(self.unreadable_indices)
        if self.n_unreadable_headers:
            first = self.records[self.unreadable_indices[0]]
            logger.warning(
                "%d of %d line images have unreadable or empty headers and will not be sampled (first: %s)",
                self.n_unreadable_headers,
                len(self.records),
                _where(first),
            )

    def _bucket_array(self, sizes: np.ndarray) -> np.ndarray:
        """Per line its bucket (-1: not usable), computed once per distinct visible size: far fewer than lines."""
        usable = np.flatnonzero(sizes[:, 0] >= 0)
        if usable.size == 0:
            return np.full(len(sizes), -1, dtype=np.int16)
        widths = sizes[usable, 0].astype(np.int64)
        if self.visible_share is not None:
            widths = np.maximum(1, np.ceil(widths * self.visible_share[usable])).astype(np.int64)
        keys = (widths << 32) | sizes[usable, 1].astype(np.int64)  # one int per (width, height)
        del widths
        distinct, inverse = np.unique(keys, return_inverse=True)
        per_size = np.array([self.transform.bucket_of(int(k >> 32), int(k & 0xFFFFFFFF)) for k in distinct],
                            dtype=np.int64)
        # Canvas widths are a few thousand px: int16 where they fit (2 bytes a line, not 8; 10M lines: 60 MB less).
        buckets = np.full(len(sizes), -1, dtype=np.int16 if per_size.max() <= np.iinfo(np.int16).max else np.int32)
        buckets[usable] = per_size[inverse.reshape(-1)]
        return buckets

    def _visible(self, index: int, size: tuple[int, int]) -> tuple[int, int]:
        width, height = size
        return max(1, math.ceil(width * self.visible_share[index])), height

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        # Only the two fields a line needs, not a whole LineRecord (its extras are parsed JSON).
        image_path, text = self.records.image_paths[index], self.records.texts[index]
        try:
            # Decoded here, inside the try (a truncated JPEG opens fine and only fails once its pixels are
            # read), turned by its EXIF orientation as the header size was. No mode conversion here: the
            # transform owns it (it flattens alpha onto white paper, which a plain convert("RGB") would turn black).
            images = self.records.images  # lines read from tar shards (lineclip.shards) carry their bytes there
            image = images.load(index, self.max_image_pixels) if images is not None else load_image(
                image_path, self.max_image_pixels)
            if self.visible_share is not None and self.visible_share[index] < 1.0:
                image = image.crop((0, 0, *self._visible(index, image.size)))
        except DECODE_ERRORS as exc:
            logger.warning("skipping corrupt line image %s: %s", _where(self.records[index]), exc)
            return {"index": index, "corrupt": "corrupt_image"}
        try:
            pixel_values = self.transform(image)
        except Exception as exc:
            # Not a data problem we can count and skip: surface it, with the file that triggered it.
            raise RuntimeError(f"image transform failed on {_where(self.records[index])}") from exc
        bucket = int(self.buckets[index])
        if pixel_values.shape[-1] != bucket:
            # The size it was bucketed by was wrong (the file changed since its header was read, or the
            # manifest's width/height do not hold for this line); a batch of mixed widths would fail to stack,
            # so this line is counted like a corrupt one.
            logger.warning(
                "line image %s decoded to width %d, expected bucket %d; skipping it",
                _where(self.records[index]),
                pixel_values.shape[-1],
                bucket,
            )
            return {"index": index, "corrupt": "corrupt_image"}
        return {"pixel_values": pixel_values, "text": text, "index": index}


class BucketBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of indices that all share one bucket (canvas width); bucket -1 is never sampled.

    With ``lengths`` (per record, the text ids it will get: ``text_lengths(texts, max_length)``), a batch
    also shares one text-length bucket, ``lengths[i] // text_bucket_bytes``, so a batch of short lines is
    not padded to one long line: ByT5's cost grows with the padded length. A group is then one (width,
    text bucket) pair; without ``lengths`` it is one width, as before.

    With ``shuffle``, indices are shuffled within each group and the batch order is shuffled, both with
    a numpy Generator seeded from ``(seed, epoch)``, so an epoch is reproducible. Without, indices keep
    manifest order and groups come in ascending (width, text bucket) order.

    With ``groups`` (per record an int key, e.g. its page; -1: none), lines of one key are kept together:
    within each (width, text bucket) group the keys come in a random order and each key's lines in a random
    order (``shuffle``; else key order and manifest order), and batches are cut from that sequence, so a
    batch holds whole runs of one page: the hard negatives a reader must tell apart. Lines with key -1
    are scattered like ungrouped ones.

    A group's last batch is short; one of fewer than ``min_batch_size`` lines is dropped (a batch of one
    line has loss 0 and accuracy 1: nothing to learn). ``n_dropped`` lines are left out of each epoch; with
    ``shuffle``, different ones each epoch, except in groups smaller than ``min_batch_size``.

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
        groups: Sequence[int] | np.ndarray | None = None,
        min_batch_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 1 <= min_batch_size <= batch_size:
            raise ValueError(f"min_batch_size must be in [1, batch_size={batch_size}], got {min_batch_size}")
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
        self.min_batch_size = min_batch_size
        bucket_array = np.asarray(buckets)
        if groups is None:
            self.groups = None
        else:
            self.groups = np.asarray(groups, dtype=np.int64)
            if self.groups.shape != bucket_array.shape:
                raise ValueError(f"groups has shape {self.groups.shape}, buckets {bucket_array.shape}")
        sampled = np.flatnonzero(bucket_array != -1)
        # One sort key per line, (width, text bucket) packed into an int64: fewer 8-byte temporaries per line than
        # a lexsort of two columns (a 10M-line start-up peaks here).
        keys = bucket_array[sampled].astype(np.int64)
        if lengths is not None:
            length_array = np.asarray(lengths)
            if length_array.shape != bucket_array.shape:
                raise ValueError(f"lengths has shape {length_array.shape}, buckets {bucket_array.shape}")
            if length_array.size and length_array.min() < 0:
                raise ValueError("lengths must be >= 0")
            keys = (keys << 32) | (length_array[sampled] // text_bucket_bytes)
        # Stable: each group keeps manifest order, groups come in ascending order.
        order = np.argsort(keys, kind="stable")
        keys = keys[order]
        # int32 indices below 2**31 lines: the groups and every epoch's order take 4 bytes a line, not 8.
        by_group = sampled[order].astype(np.int32 if len(bucket_array) < 2**31 else np.int64)
        del sampled, order
        starts = np.flatnonzero(keys[1:] != keys[:-1]) + 1
        self._groups: list[np.ndarray] = [g for g in np.split(by_group, starts) if g.size]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches_in(self, n_items: int) -> int:
        full, tail = divmod(n_items, self.batch_size)
        return full + (0 if self.drop_last or tail < self.min_batch_size else 1)

    @property
    def n_dropped(self) -> int:
        """Lines left out of every epoch: short last batches (drop_last, or under min_batch_size)."""
        return sum(group.size - min(group.size, self._batches_in(group.size) * self.batch_size)
                   for group in self._groups)

    def _order(self, group: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.groups is None:
            return rng.permutation(group) if self.shuffle else group
        keys = self.groups[group]
        # -1 (no key): a key of its own per line, so such lines are scattered, not batched together.
        keys = np.where(keys < 0, keys.max(initial=0) + 1 + np.arange(keys.size), keys)
        distinct, inverse = np.unique(keys, return_inverse=True)
        if not self.shuffle:
            return group[np.argsort(inverse, kind="stable")]
        key_rank = rng.permutation(distinct.size)[inverse]
        return group[np.lexsort((rng.random(group.size), key_rank))]

    def __len__(self) -> int:
        return sum(self._batches_in(group.size) for group in self._groups)

    def batch_arrays(self) -> list[np.ndarray]:
        """This epoch's batches as index arrays (what ``__iter__`` yields as lists): a million lines are a few
        thousand arrays, not a million Python ints."""
        # (seed, epoch) as entropy rather than seed + epoch: seed 0 epoch 1 must not replay seed 1 epoch 0.
        rng = np.random.default_rng([self.seed, self.epoch])
        batches: list[np.ndarray] = []
        for group in self._groups:
            order = self._order(group, rng)
            for start in range(0, self._batches_in(order.size) * self.batch_size, self.batch_size):
                batches.append(order[start : start + self.batch_size])
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batch_arrays():
            yield batch.tolist()


def text_hash_ids(texts: Sequence[str]) -> torch.Tensor:
    """[B] int64, one id per distinct text, the same in every process, worker and run (the first 63 bits of its
    BLAKE2b digest): lines with identical transcriptions are each other's positives, and no table over the whole
    dataset is needed to say so. Two different texts share an id with probability ~N^2 / 2^64 (1e-5 at 10M)."""
    return torch.tensor([int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
                         >> 1 for text in texts], dtype=torch.long)


@dataclass
class LineCollator:
    """Stacks one bucket's images and byte-encodes the texts. Corrupt items (marked, or None) are
    dropped and counted; if every item was corrupt the batch has B == 0 so the trainer can skip it."""

    max_length: int
    pad_to_multiple: int = 8
    reading: bool = False  # also the CTC targets of the auxiliary reading loss (lineclip.reading)

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
                "text_ids": torch.zeros((0,), dtype=torch.long),
                "n_corrupt": n_corrupt,
                "corrupt_indices": corrupt_indices,
                "n_truncated": 0,
            }
        shapes = {tuple(item["pixel_values"].shape) for item in good}
        if len(shapes) != 1:
            # An explicit check rather than `assert`, which `python -O` would strip.
            raise ValueError(f"a batch must hold one bucket (one image shape), got shapes {sorted(shapes)}")
        texts = [item["text"] for item in good]
        input_ids, attention_mask, n_truncated = byte_encode(texts, self.max_length, self.pad_to_multiple)
        extra = {}
        if self.reading:
            extra["reading_targets"], extra["reading_lengths"] = reading_targets(texts)
        return {
            **extra,
            "pixel_values": torch.stack([item["pixel_values"] for item in good]),
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "indices": torch.tensor([item["index"] for item in good], dtype=torch.long),
            "text_ids": text_hash_ids(texts),  # identical transcriptions: positives of each other
            "n_corrupt": n_corrupt,
            "corrupt_indices": corrupt_indices,
            "n_truncated": n_truncated,
        }


def group_keys(records: Sequence[LineRecord] | LineTable, field: str) -> np.ndarray:
    """Per record an int key of its `field` (`page_id`, `doc_id`, or an extra manifest field such as
    `collection`), numbered in order of first appearance; -1 where the line has no value. Pages are keyed with
    their document, since a page id need only be unique within its volume."""
    table = records if isinstance(records, LineTable) else LineTable.from_records(records)
    if field in ("doc_id", "page_id", "line_id"):
        values = pa.chunked_array(table.columns[field].chunks, pa.string())
        if field == "page_id":
            doc = pa.chunked_array(table.columns["doc_id"].chunks, pa.string())
            values = pc.if_else(pc.equal(values, ""), "", pc.binary_join_element_wise(doc, values, "\x00"))
    elif field == "source":
        values = pa.array([table.source(i) for i in range(len(table))], pa.string())
    else:
        extras = table.columns["extra"]
        values = pa.array([json.loads(e).get(field, "") if (e := extras[i]) else "" for i in range(len(extras))],
                          pa.string())
    encoded = pc.dictionary_encode(values)
    if isinstance(encoded, pa.ChunkedArray):
        encoded = encoded.combine_chunks()  # unifies the chunks' dictionaries, keeping first-seen order
    keys = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    blank = encoded.dictionary.to_pylist().index("") if "" in encoded.dictionary.to_pylist() else -1
    if blank >= 0:
        keys = np.where(keys == blank, -1, keys - (keys > blank))
    return keys


class ShownTexts(Sequence[str]):
    """The transcriptions as the model is shown them: cut to `limit` bytes (at a character boundary, like
    byte_encode) when the image is cropped to its text, else whole. Built per item, on demand."""

    def __init__(self, texts: Sequence[str] | StringColumn, limit: int | None = None) -> None:
        self.texts, self.limit = texts, limit

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> str:  # type: ignore[override]
        text = self.texts[index]
        if self.limit is None:
            return text
        return text.encode()[: self.limit].decode(errors="ignore")


class TrainTexts:
    """The text each training line is paired with, and which texts of a contrastive batch are positives of
    which lines.

    With probability `p` a line's text is a run of whole syllables of its transcription
    (`phrases.sample_phrase`, `min_syllables`..`max_syllables`) instead of all of it; the image stays the
    whole line. The draw uses a numpy Generator seeded from (seed, epoch, dataset index), so a line's text in
    an epoch is the same on every process, in any order, and after a resume.

    Positives are not built in the collator: it runs in data-loader workers (which never see the epoch
    change) and sees one micro-batch of one process, while the contrastive batch spans the micro-batches of a
    grad-cache step and, with `loss.gather`, every process. A batch's dataset indices, though, are ints that
    gather like any tensor, and from them every process derives the same texts and transcriptions: so the
    trainer gathers the indices and calls `positives` on the whole batch (text j is a positive of line i
    when it occurs in line i's transcription: a phrase found in two lines is a positive of both, identical
    lines are positives of each other, as before).
    """

    def __init__(self, transcriptions: Sequence[str], p: float = 0.0, min_syllables: int = 2,
                 max_syllables: int = 8, seed: int = 0) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        if not 1 <= min_syllables <= max_syllables:
            raise ValueError(f"need 1 <= min_syllables <= max_syllables, got {min_syllables}, {max_syllables}")
        self.transcriptions = transcriptions
        self.p, self.min_syllables, self.max_syllables, self.seed = p, min_syllables, max_syllables, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def text(self, index: int) -> str:
        transcription = self.transcriptions[index]
        if self.p == 0.0:
            return transcription
        rng = np.random.default_rng([self.seed, self.epoch, index])
        if rng.random() >= self.p:
            return transcription
        # A line of fewer syllables than min_syllables is its own phrase.
        return sample_phrase(transcription, rng, self.min_syllables, self.max_syllables) or transcription

    def positives(self, indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """[N, N] bool over the batch's lines (in the order given): [i, j] when line j's text occurs in line
        i's transcription. The diagonal is always true."""
        indices = indices.tolist() if isinstance(indices, torch.Tensor) else list(indices)
        lines = [self.transcriptions[i] for i in indices]
        # One C-level search per text through all the lines joined by NUL (which no text holds), rather than
        # N^2 `in` tests: 4-6x faster at N = 1000 (0.06-0.1 s, CPU).
        haystack = "\x00".join(lines)
        starts = np.cumsum([0] + [len(line) + 1 for line in lines[:-1]]).tolist()
        positives = torch.zeros((len(indices), len(indices)), dtype=torch.bool)
        for j, index in enumerate(indices):
            text = self.text(index)
            found = haystack.find(text)
            while found != -1:
                i = bisect.bisect_right(starts, found) - 1
                positives[i, j] = True
                found = haystack.find(text, starts[i] + len(lines[i]) + 1)
        return positives

    def encode(self, batch: dict[str, Any], max_length: int, pad_to_multiple: int = 8) -> dict[str, Any]:
        """`batch` (from LineCollator) with its text side re-encoded from this epoch's texts (a no-op at p=0)."""
        if self.p == 0.0 or len(batch["indices"]) == 0:
            return batch
        input_ids, attention_mask, _ = byte_encode([self.text(i) for i in batch["indices"].tolist()], max_length,
                                                    pad_to_multiple)
        return {**batch, "input_ids": input_ids, "attention_mask": attention_mask}
