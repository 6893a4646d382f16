"""Tests for lineclip.batch: ByT5 byte encoding, corrupt-image tolerance, single-bucket batching."""

from __future__ import annotations

import io
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lineclip.batch import (
    BYTE_OFFSET,
    EOS_ID,
    PAD_ID,
    BucketBatchSampler,
    LineCollator,
    LineDataset,
    TrainTexts,
    byte_encode,
    count_truncated,
    group_keys,
    text_lengths,
    text_padding_fraction,
)
from lineclip.lines import LineRecord

# Real transcriptions (tibetan_lines_dev, Derge Kangyur), copied here so tests never read ../shared.
TIB_1 = "༄༄༎དང་སྦྱོར་བར་བྱ༎ལྷོ་ལས་དབུ་མ་བཟུང་ནས་སུ༎ཐིག་ལེ་ང་རོ་ལྡན་པར་བྱ༎"
TIB_2 = "རྩོད་པ་དང་། །དགེ་འདུན་དབྱེན་རྣམས་བསྡུས་པ་ཡིན། །རབ་ཏུ་འབྱུང་བའི་གཞིའི་སྤྱི་སྡོམ་ལ།"
TIB_3 = "བློན་པོ་རྣམས་ཀྱིས་སྨྲས་པ། ལྷ་གྲོང་ན་ལ་ད་ན་བྲམ་ཟེ་གནས་ལེན་གྱི་བུ་ཞེས་བགྱི་བ"
TEXTS = [TIB_1, "Derge Kangyur, vol. 1", TIB_2, "ཀ", f"{TIB_3} (f. 12a)", "a"]


class StandInTransform:
    """LineImageTransform's contract (bucket_of, __call__): height 28, width padded to a multiple of 64."""

    height = 28
    multiple = 64

    def bucket_of(self, width: int, height: int) -> int:
        content = max(1, round(width * self.height / height))
        return -(-content // self.multiple) * self.multiple

    def __call__(self, image: Image.Image) -> torch.Tensor:
        width, height = image.size
        content = max(1, round(width * self.height / height))
        resized = image.convert("RGB").resize((content, self.height))
        canvas = np.full((self.height, self.bucket_of(width, height), 3), 255, dtype=np.uint8)
        canvas[:, :content] = np.asarray(resized)
        return torch.from_numpy(canvas).permute(2, 0, 1).float() / 255.0


# --- text encoding -------------------------------------------------------------------------------


def test_encode_texts_matches_byt5_tokenizer() -> None:
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.ByT5Tokenizer()  # byte-level: needs no vocabulary files
    expected = tokenizer(TEXTS, padding=True)
    input_ids, attention_mask, n_truncated = byte_encode(TEXTS, max_length=1024)
    longest = len(expected["input_ids"][0])
    assert n_truncated == 0
    assert input_ids.dtype == attention_mask.dtype == torch.long
    assert input_ids.shape == attention_mask.shape == (len(TEXTS), -(-longest // 8) * 8)
    assert input_ids[:, :longest].tolist() == expected["input_ids"]
    assert attention_mask[:, :longest].tolist() == expected["attention_mask"]
    assert (input_ids[:, longest:] == PAD_ID).all() and (attention_mask[:, longest:] == 0).all()
    assert attention_mask.sum(1).tolist() == [len(t.encode("utf-8")) + 1 for t in TEXTS]


def test_encode_texts_layout() -> None:
    input_ids, attention_mask, _ = byte_encode(["ཀ", "ab"], max_length=64, pad_to_multiple=8)
    assert input_ids.tolist() == [
        [0xE0 + BYTE_OFFSET, 0xBD + BYTE_OFFSET, 0x80 + BYTE_OFFSET, EOS_ID, 0, 0, 0, 0],
        [ord("a") + BYTE_OFFSET, ord("b") + BYTE_OFFSET, EOS_ID, 0, 0, 0, 0, 0],
    ]
    assert attention_mask.sum(1).tolist() == [4, 3]
    ids, _, _ = byte_encode(["ab"], max_length=64, pad_to_multiple=1)
    assert ids.shape == (1, 3)


def decode_row(ids: torch.Tensor) -> tuple[str, int]:
    """(text, position of EOS) of one encoded row; raises UnicodeDecodeError on a split character."""
    row = ids.tolist()
    eos = row.index(EOS_ID)
    return bytes(i - BYTE_OFFSET for i in row[:eos]).decode("utf-8"), eos


@pytest.mark.parametrize("max_length", range(1, 24))
def test_truncation_backs_up_to_a_character_boundary(max_length: int) -> None:
    texts = [TIB_1, "ab" + TIB_2, "x" + TIB_3, "𝄞𝄞𝄞𝄞𝄞𝄞", "ok"]  # 3-byte Tibetan, 4-byte music symbols
    input_ids, attention_mask, n_truncated = byte_encode(texts, max_length=max_length)
    assert n_truncated == count_truncated(texts, max_length)
    assert n_truncated == sum(len(t.encode()) + 1 > max_length for t in texts)
    assert input_ids.shape[1] <= -(-max_length // 8) * 8
    for row, text in enumerate(texts):
        decoded, eos = decode_row(input_ids[row])  # valid UTF-8 or this raises
        assert text.startswith(decoded)
        assert eos + 1 <= max_length
        assert attention_mask[row].sum().item() == eos + 1
        # The cut keeps as much as fits: one more character would not have fitted.
        if decoded != text:
            next_char = text[len(decoded)]
            assert eos + len(next_char.encode()) + 1 > max_length


def test_truncation_count_and_exact_fit() -> None:
    fits = "ཀ" * 21  # 63 bytes + EOS = 64 ids
    over = "ཀ" * 22
    input_ids, attention_mask, n_truncated = byte_encode([fits, over, TIB_2], max_length=64)
    assert n_truncated == 2
    assert input_ids.shape == (3, 64)
    assert decode_row(input_ids[0]) == (fits, 63)
    assert decode_row(input_ids[1]) == (fits, 63)
    text, eos = decode_row(input_ids[2])
    # TIB_2 mixes 3-byte letters and 1-byte spaces: the cut lands 0-2 bytes short of the budget.
    assert TIB_2.startswith(text) and 61 <= eos <= 63 and attention_mask[2].sum() == eos + 1
    # max_length 62 leaves 61 bytes: 20 whole characters, never 20 and a third.
    input_ids, _, n_truncated = byte_encode([over], max_length=62)
    assert n_truncated == 1 and decode_row(input_ids[0]) == ("ཀ" * 20, 60)
    assert input_ids.shape == (1, 64)  # longest row 61 rounded up to 8, <= 62 rounded up
    assert count_truncated([fits, over, "", TIB_1], 64) == 2


def test_encode_texts_edge_cases() -> None:
    input_ids, attention_mask, n = byte_encode([], max_length=16)
    assert input_ids.shape == attention_mask.shape == (0, 0) and n == 0
    input_ids, attention_mask, n = byte_encode([""], max_length=16)
    assert input_ids.tolist() == [[EOS_ID] + [PAD_ID] * 7] and attention_mask.sum() == 1 and n == 0
    with pytest.raises(ValueError):
        byte_encode(["a"], max_length=0)
    with pytest.raises(ValueError):
        byte_encode(["a"], max_length=8, pad_to_multiple=0)


# --- dataset with corrupt files ------------------------------------------------------------------


def jpeg_bytes(size: tuple[int, int]) -> bytes:
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)  # noise: no tiny JPEG
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def make_records(tmp_path: Path) -> list[LineRecord]:
    """Good lines in two buckets, one truncated JPEG (readable header), one garbage file (no header)."""
    specs = [
        ("g0.png", (100, 20)),  # 140 px wide at height 28 -> bucket 192
        ("g1.png", (50, 10)),  # -> 192
        ("g2.jpg", (300, 30)),  # -> 320
        ("g3.png", (60, 12)),  # -> 192
        ("g4.jpg", (320, 32)),  # -> 320
    ]
    records = []
    for i, (name, size) in enumerate(specs):
        path = tmp_path / name
        mode = "L" if i == 3 else "RGB"  # the transform, not the dataset, handles modes
        Image.new(mode, size, "white").save(path)
        records.append(LineRecord(f"g{i}", str(path), TEXTS[i]))
    truncated = tmp_path / "truncated.jpg"
    data = jpeg_bytes((300, 30))
    truncated.write_bytes(data[: len(data) // 2])
    records.append(LineRecord("truncated", str(truncated), TIB_1))
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(bytes(random.Random(0).randrange(256) for _ in range(500)))
    records.append(LineRecord("garbage", str(garbage), TIB_2))
    return records


def test_dataset_buckets_and_corrupt_images(tmp_path: Path) -> None:
    records = make_records(tmp_path)
    dataset = LineDataset(records, StandInTransform())
    assert len(dataset) == 7
    assert dataset.buckets.tolist() == [192, 192, 320, 192, 320, 320, -1]
    assert dataset.n_unreadable_headers == 1 and dataset.unreadable_indices == [6]
    item = dataset[2]
    assert item is not None and item["index"] == 2 and item["text"] == TEXTS[2]
    assert item["pixel_values"].shape == (3, 28, 320)
    assert dataset[3]["pixel_values"].shape == (3, 28, 192)  # grayscale file
    assert dataset[5] == {"index": 5, "corrupt": "corrupt_image"}  # truncated JPEG: header fine, pixels not
    assert dataset[6] == {"index": 6, "corrupt": "corrupt_image"}  # garbage


def test_header_reads_in_threads_agree(tmp_path: Path) -> None:
    records = make_records(tmp_path) * 60  # above the threading threshold
    threaded = LineDataset(records, StandInTransform(), header_workers=4)
    serial = LineDataset(records, StandInTransform(), header_workers=1)
    assert threaded.buckets.tolist() == serial.buckets.tolist()
    assert threaded.n_unreadable_headers == 60


def test_file_changed_after_dataset_built_is_skipped_not_fatal(tmp_path: Path) -> None:
    records = make_records(tmp_path)
    dataset = LineDataset(records, StandInTransform())
    Image.new("RGB", (1000, 20), "white").save(records[0].image_path)  # now a wider bucket
    assert dataset[0] == {"index": 0, "corrupt": "corrupt_image"}


def test_collator_counts_and_shapes(tmp_path: Path) -> None:
    dataset = LineDataset(make_records(tmp_path), StandInTransform())
    collate = LineCollator(max_length=32)
    batch = collate([dataset[i] for i in (2, 5, 4)])
    assert batch["pixel_values"].shape == (2, 3, 28, 320)
    assert batch["indices"].tolist() == [2, 4]
    assert batch["n_corrupt"] == 1
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[1] % 8 == 0
    assert batch["n_truncated"] == count_truncated([TEXTS[2], TEXTS[4]], 32) == 2

    empty = collate([None, None])
    assert empty["pixel_values"].shape[0] == empty["input_ids"].shape[0] == len(empty["indices"]) == 0
    assert empty["n_corrupt"] == 2 and empty["n_truncated"] == 0

    with pytest.raises(ValueError, match="one bucket"):
        collate([dataset[0], dataset[2]])


def test_dataloader_with_workers_survives_corrupt_files(tmp_path: Path) -> None:
    dataset = LineDataset(make_records(tmp_path) * 3, StandInTransform())
    sampler = BucketBatchSampler(dataset.buckets, batch_size=2, shuffle=True, seed=1)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=LineCollator(max_length=64), num_workers=2, timeout=60
    )
    seen: list[int] = []
    n_corrupt = 0
    for batch in loader:
        n_corrupt += batch["n_corrupt"]
        seen += batch["indices"].tolist()
        assert len(batch["indices"]) + batch["n_corrupt"] > 0
    assert n_corrupt == 3  # the truncated JPEG, three times; the garbage file is never sampled
    assert sorted(seen) == sorted(i for i in range(21) if i % 7 < 5)


def test_real_transform_keeps_bucket_width(tmp_path: Path) -> None:
    preprocess = pytest.importorskip("lineclip.preprocess")
    records = make_records(tmp_path)[:5]
    for augment in (False, True):
        transform = preprocess.LineImageTransform(pipeline="none", augment=augment, seed=0)
        dataset = LineDataset(records, transform)
        for i in range(len(dataset)):
            item = dataset[i]
            assert item is not None and item["pixel_values"].shape[-1] == dataset.buckets[i]


# --- bucket batch sampler ------------------------------------------------------------------------


def random_buckets(n: int = 503, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    buckets = rng.choice([256, 384, 512, 768, 1022], size=n, p=[0.4, 0.3, 0.15, 0.1, 0.05])
    buckets[rng.choice(n, size=9, replace=False)] = -1
    return buckets


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("drop_last", [False, True])
def test_sampler_batches_are_single_bucket_and_cover_every_index(shuffle: bool, drop_last: bool) -> None:
    buckets = random_buckets()
    sampler = BucketBatchSampler(buckets, batch_size=16, shuffle=shuffle, seed=3, drop_last=drop_last)
    assert sampler.batch_size == 16 and sampler.drop_last is drop_last
    batches = list(sampler)
    assert len(batches) == len(sampler)
    counts = Counter(int(b) for b in buckets if b != -1)
    expected_len = sum((n // 16) if drop_last else -(-n // 16) for n in counts.values())
    assert len(sampler) == expected_len
    flat = [i for batch in batches for i in batch]
    assert len(flat) == len(set(flat))
    assert all(buckets[i] != -1 for i in flat)
    for batch in batches:
        assert len({int(buckets[i]) for i in batch}) == 1
        assert all(isinstance(i, int) for i in batch)
        assert 1 <= len(batch) <= 16
        if drop_last:
            assert len(batch) == 16
    if not drop_last:
        assert sorted(flat) == [i for i in range(len(buckets)) if buckets[i] != -1]


def test_sampler_is_deterministic_per_seed_and_epoch() -> None:
    buckets = random_buckets()

    def epoch_batches(seed: int, epoch: int) -> list[list[int]]:
        sampler = BucketBatchSampler(buckets, batch_size=8, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert epoch_batches(0, 0) == epoch_batches(0, 0)
    assert epoch_batches(0, 1) == epoch_batches(0, 1)
    assert epoch_batches(0, 0) != epoch_batches(0, 1)
    assert epoch_batches(0, 0) != epoch_batches(1, 0)
    assert epoch_batches(0, 1) != epoch_batches(1, 0)  # not seeded with seed + epoch
    sampler = BucketBatchSampler(buckets, batch_size=8, shuffle=True, seed=0)
    first = list(sampler)
    assert list(sampler) == first  # re-iterating the same epoch replays it
    # The batch order is shuffled too, not just the members: buckets interleave.
    order = [int(buckets[b[0]]) for b in first]
    assert order != sorted(order)


def test_sampler_without_shuffle_keeps_manifest_order() -> None:
    buckets = [384, 256, 256, -1, 384, 256, 512, 256]
    sampler = BucketBatchSampler(buckets, batch_size=2, shuffle=False)
    assert list(sampler) == [[1, 2], [5, 7], [0, 4], [6]]
    sampler.set_epoch(5)
    assert list(sampler) == [[1, 2], [5, 7], [0, 4], [6]]
    assert list(BucketBatchSampler(buckets, batch_size=2, shuffle=False, drop_last=True)) == [
        [1, 2],
        [5, 7],
        [0, 4],
    ]
    assert len(BucketBatchSampler([-1, -1], batch_size=4, shuffle=True)) == 0
    assert list(BucketBatchSampler([-1, -1], batch_size=4, shuffle=True)) == []
    with pytest.raises(ValueError):
        BucketBatchSampler(buckets, batch_size=0, shuffle=False)


# --- text-length buckets and padding --------------------------------------------------------------


def random_texts(n: int, seed: int = 0) -> list[str]:
    """Tibetan-like texts (3-byte letters, 1-byte spaces) from a few bytes to well past 512 bytes."""
    rng = random.Random(seed)
    letters = [chr(c) for c in range(0x0F40, 0x0F6A)] + [" ", "་"]
    return ["".join(rng.choice(letters) for _ in range(rng.choice([2, 20, 60, 120, 150, 170, 250]))) for _ in range(n)]


def test_text_lengths_are_what_encode_texts_gives() -> None:
    texts = random_texts(200) + ["", "a", "ཀ" * 200]
    for max_length in (1, 7, 64, 512):
        lengths = text_lengths(texts, max_length)
        _, attention_mask, _ = byte_encode(texts, max_length)
        assert lengths.dtype == np.int64 and lengths.tolist() == attention_mask.sum(1).tolist()
        assert lengths.max() <= max_length
    with pytest.raises(ValueError):
        text_lengths(["a"], 0)


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("text_bucket_bytes", [1, 64, 1000])
def test_sampler_with_lengths_groups_width_and_text_bucket(
    shuffle: bool, drop_last: bool, text_bucket_bytes: int
) -> None:
    buckets = random_buckets()
    lengths = text_lengths(random_texts(len(buckets)), max_length=512)
    sampler = BucketBatchSampler(
        buckets, 16, shuffle=shuffle, seed=3, drop_last=drop_last, lengths=lengths, text_bucket_bytes=text_bucket_bytes
    )
    batches = list(sampler)
    groups = Counter((int(b), int(n) // text_bucket_bytes) for b, n in zip(buckets, lengths, strict=True) if b != -1)
    assert len(sampler) == len(batches) == sum((c // 16) if drop_last else -(-c // 16) for c in groups.values())
    flat = [i for batch in batches for i in batch]
    assert len(flat) == len(set(flat)) and all(buckets[i] != -1 for i in flat)
    if drop_last:
        assert all(len(batch) == 16 for batch in batches)
        assert len(flat) == sum(c // 16 * 16 for c in groups.values())
    else:
        assert sorted(flat) == [i for i in range(len(buckets)) if buckets[i] != -1]
    for batch in batches:
        assert len({(int(buckets[i]), int(lengths[i]) // text_bucket_bytes) for i in batch}) == 1
        assert all(isinstance(i, int) for i in batch) and 1 <= len(batch) <= 16
        # One text bucket: no row is padded by a text bucket's width or more (plus the multiple of 8).
        assert -(-max(lengths[batch]) // 8) * 8 - min(lengths[batch]) < text_bucket_bytes + 8


def test_sampler_with_lengths_is_deterministic_per_seed_and_epoch() -> None:
    buckets = random_buckets()
    lengths = text_lengths(random_texts(len(buckets)), max_length=512)

    def epoch_batches(seed: int, epoch: int) -> list[list[int]]:
        sampler = BucketBatchSampler(buckets, 8, shuffle=True, seed=seed, lengths=lengths, text_bucket_bytes=64)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert epoch_batches(0, 0) == epoch_batches(0, 0)
    assert epoch_batches(0, 1) == epoch_batches(0, 1)
    assert epoch_batches(0, 0) != epoch_batches(0, 1)
    assert epoch_batches(0, 0) != epoch_batches(1, 0)


def test_sampler_with_lengths_without_shuffle_keeps_manifest_order() -> None:
    buckets = [384, 256, 256, -1, 384, 256, 512, 256]
    lengths = [10, 70, 5, 9, 20, 60, 300, 66]  # text buckets of 64: 0, 1, 0, -, 0, 0, 4, 1
    sampler = BucketBatchSampler(buckets, batch_size=2, shuffle=False, lengths=lengths, text_bucket_bytes=64)
    assert list(sampler) == [[2, 5], [1, 7], [0, 4], [6]]
    # Without lengths, the same sampler groups by width only (the behaviour before text buckets).
    assert list(BucketBatchSampler(buckets, batch_size=2, shuffle=False)) == [[1, 2], [5, 7], [0, 4], [6]]
    with pytest.raises(ValueError, match="shape"):
        BucketBatchSampler(buckets, 2, shuffle=False, lengths=lengths[:-1])
    with pytest.raises(ValueError, match=">= 0"):
        BucketBatchSampler(buckets, 2, shuffle=False, lengths=[-1] * len(buckets))
    with pytest.raises(ValueError, match="text_bucket_bytes"):
        BucketBatchSampler(buckets, 2, shuffle=False, lengths=lengths, text_bucket_bytes=0)


@pytest.mark.parametrize("max_length", [16, 512])
@pytest.mark.parametrize("pad_to_multiple", [1, 8])
def test_padding_fraction_matches_the_encoded_batches(max_length: int, pad_to_multiple: int) -> None:
    texts = random_texts(300, seed=1)
    buckets = np.full(len(texts), 256)
    lengths = text_lengths(texts, max_length)
    for sampler_lengths in (None, lengths):
        batches = list(BucketBatchSampler(buckets, 32, shuffle=True, seed=0, lengths=sampler_lengths))
        padded = total = 0
        for batch in batches:  # independent count: what the collator would really build
            _, attention_mask, _ = byte_encode([texts[i] for i in batch], max_length, pad_to_multiple)
            padded += int((attention_mask == 0).sum())
            total += attention_mask.numel()
        assert text_padding_fraction(batches, lengths, pad_to_multiple) == pytest.approx(padded / total)
    assert text_padding_fraction([], lengths) == 0.0
    assert text_padding_fraction([[0]], [8]) == 0.0 and text_padding_fraction([[0, 1]], [8, 2]) == 6 / 16


def test_text_buckets_cut_padding() -> None:
    texts = random_texts(2000, seed=2)
    buckets = np.full(len(texts), 256)
    lengths = text_lengths(texts, 512)
    width_only = text_padding_fraction(BucketBatchSampler(buckets, 32, shuffle=True), lengths)
    with_text = text_padding_fraction(BucketBatchSampler(buckets, 32, shuffle=True, lengths=lengths), lengths)
    assert with_text < width_only / 2


class BrokenTransform(StandInTransform):
    def __call__(self, image: Image.Image) -> torch.Tensor:
        raise ValueError("bug in the transform")


def test_transform_errors_are_not_mistaken_for_corrupt_files(tmp_path: Path) -> None:
    dataset = LineDataset(make_records(tmp_path), BrokenTransform())
    with pytest.raises(RuntimeError, match="g0.png"):
        dataset[0]


# --- same-page batches, tail batches ---------------------------------------------------------------


def test_group_batches_by_page_fills_each_batch_from_one_page() -> None:
    # three pages of 4 lines in one width bucket, interleaved in the manifest, one 2-line page in another bucket
    buckets = [256] * 12 + [384, 384]
    pages = [0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 3]
    sampler = BucketBatchSampler(buckets, batch_size=4, shuffle=True, seed=5, groups=pages)
    batches = list(sampler)
    by_page = sorted(sorted(b) for b in batches)
    assert by_page == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11], [12, 13]]
    # without groups the same sampler mixes pages (seed 5: at least one batch spans several)
    mixed = list(BucketBatchSampler(buckets, batch_size=4, shuffle=True, seed=5))
    assert any(len({pages[i] for i in b}) > 1 for b in mixed)
    # without shuffle: key order, then manifest order
    assert list(BucketBatchSampler(buckets, batch_size=4, shuffle=False, groups=pages)) == [
        [0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11], [12, 13]]


def test_group_batches_keeps_pages_contiguous_deterministic_and_single_bucket() -> None:
    rng = np.random.default_rng(1)
    n = 300
    buckets = rng.choice([256, 384, 512], size=n)
    pages = rng.integers(0, 40, size=n)
    pages[rng.choice(n, 30, replace=False)] = -1  # lines without a page

    def epoch(e: int) -> list[list[int]]:
        sampler = BucketBatchSampler(buckets, batch_size=8, shuffle=True, seed=2, groups=pages)
        sampler.set_epoch(e)
        return list(sampler)

    batches = epoch(0)
    assert batches == epoch(0) and batches != epoch(1)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(n))  # min_batch_size 1: every line once
    for b in batches:
        assert len({int(buckets[i]) for i in b}) == 1
    # within a bucket, the batches (in cut order) list each page's lines as one run: count page switches
    for width in (256, 384, 512):
        sampler = BucketBatchSampler(buckets, batch_size=8, shuffle=True, seed=2, groups=pages)
        order = sampler._order(sampler._groups[[256, 384, 512].index(width)], np.random.default_rng(0))
        keyed = [int(pages[i]) for i in order if pages[i] >= 0]
        runs = 1 + sum(a != b for a, b in zip(keyed, keyed[1:], strict=False))
        assert runs == len(set(keyed))


def test_group_keys_pair_pages_with_their_volume() -> None:
    records = [
        LineRecord("a", "a.png", "ཀ", doc_id="v1", page_id="p1"),
        LineRecord("b", "b.png", "ཁ", doc_id="v2", page_id="p1"),  # same page id, another volume
        LineRecord("c", "c.png", "ག", doc_id="v1", page_id="p1"),
        LineRecord("d", "d.png", "ང", doc_id="v1"),  # no page
        LineRecord("e", "e.png", "ཅ", doc_id="v2", extra={"collection": "TCCG"}),
    ]
    assert group_keys(records, "page_id").tolist() == [0, 1, 0, -1, -1]
    assert group_keys(records, "doc_id").tolist() == [0, 1, 0, 0, 1]
    assert group_keys(records, "collection").tolist() == [-1, -1, -1, -1, 0]


def test_min_batch_size_drops_small_tails_and_counts_them() -> None:
    # bucket 256: 9 lines -> 4 + 4 + a tail of 1; bucket 384: 3 lines -> a tail of 3; bucket 512: 1 line
    buckets = [256] * 9 + [384] * 3 + [512]
    for shuffle in (False, True):
        sampler = BucketBatchSampler(buckets, batch_size=4, shuffle=shuffle, min_batch_size=2)
        batches = list(sampler)
        assert sorted(len(b) for b in batches) == [3, 4, 4]
        assert len(sampler) == 3 and sampler.n_dropped == 2  # the 256 tail of 1 and the lone 512 line
        assert 12 not in {i for b in batches for i in b}
    # min 4 = batch size: only full batches, as drop_last
    assert BucketBatchSampler(buckets, batch_size=4, shuffle=False, min_batch_size=4).n_dropped == 5
    assert BucketBatchSampler(buckets, batch_size=4, shuffle=False, drop_last=True).n_dropped == 5
    # min 1: every line, as before
    one = BucketBatchSampler(buckets, batch_size=4, shuffle=False)
    assert one.n_dropped == 0 and len(one) == 5
    with pytest.raises(ValueError, match="min_batch_size"):
        BucketBatchSampler(buckets, batch_size=4, shuffle=False, min_batch_size=5)


# --- training texts: phrases and positives ----------------------------------------------------------


def test_train_texts_positives_of_a_hand_built_batch() -> None:
    lines = [
        "ཀ་ཁ་ག",            # 0: 3 syllables; with min = max = 3 its phrase is all of it
        "ང་ཀ་ཁ་ག་ཅ།",        # 1: contains line 0's text
        "ཆ་ཇ་ཉ་ཏ",          # 2: unrelated
        "ཀ་ཁ་ག",            # 3: identical to line 0
        "ཐ",                # 4: one syllable: stays whole
    ]
    texts = TrainTexts(lines, p=1.0, min_syllables=3, max_syllables=3, seed=0)
    fed = [texts.text(i) for i in range(5)]
    assert fed[0] == "ཀ་ཁ་ག" and fed[3] == "ཀ་ཁ་ག" and fed[4] == "ཐ"
    assert fed[1] in ("ང་ཀ་ཁ", "ཀ་ཁ་ག", "ཁ་ག་ཅ") and fed[2] in ("ཆ་ཇ་ཉ", "ཇ་ཉ་ཏ")
    pos = texts.positives([0, 1, 2, 3, 4])
    # [i, j]: text j occurs in line i. Texts 0 and 3 ("ཀ་ཁ་ག") occur in lines 0, 1, 3: positives of all three.
    expected = [
        [1, fed[1] in lines[0], 0, 1, 0],
        [1, 1, 0, 1, 0],
        [0, 0, 1, 0, 0],
        [1, fed[1] in lines[3], 0, 1, 0],
        [0, 0, 0, 0, 1],
    ]
    assert pos.tolist() == [[bool(v) for v in row] for row in expected]
    # the order given is the order of rows and columns
    assert texts.positives([1, 0]).tolist() == [[True, True], [fed[1] in lines[0], True]]


def test_train_texts_are_seeded_by_seed_epoch_and_index() -> None:
    lines = [f"{TIB_2} {i}" for i in range(40)]
    a = TrainTexts(lines, p=0.5, min_syllables=2, max_syllables=8, seed=1)
    first = [a.text(i) for i in range(40)]
    assert [a.text(i) for i in reversed(range(40))] == first[::-1]  # order-free: a pure function of the index
    b = TrainTexts(lines, p=0.5, min_syllables=2, max_syllables=8, seed=1)
    assert [b.text(i) for i in range(40)] == first  # a new process / a resume draws the same
    whole = sum(t == lines[i] for i, t in enumerate(first))
    assert 8 <= whole <= 32  # about half stay whole
    assert all(t in lines[i] for i, t in enumerate(first))
    a.set_epoch(1)
    assert [a.text(i) for i in range(40)] != first
    assert [TrainTexts(lines, p=0.5, seed=2).text(i) for i in range(40)] != first
    assert [TrainTexts(lines).text(i) for i in range(40)] == lines  # p = 0: the transcriptions


def test_train_texts_encode_replaces_the_text_side() -> None:
    lines = ["ཀ་ཁ་ག་ང", "ཅ་ཆ"]
    texts = TrainTexts(lines, p=1.0, min_syllables=2, max_syllables=2, seed=0)
    batch = {"indices": torch.tensor([0, 1]), **dict(zip(("input_ids", "attention_mask"),
                                                         byte_encode(lines, 64)[:2], strict=True))}
    out = texts.encode(batch, 64)
    ids, mask, _ = byte_encode([texts.text(0), texts.text(1)], 64)
    assert torch.equal(out["input_ids"], ids) and torch.equal(out["attention_mask"], mask)
    assert texts.text(1) == "ཅ་ཆ" and texts.text(0) in ("ཀ་ཁ", "ཁ་ག", "ག་ང")
    assert TrainTexts(lines).encode(batch, 64) is batch


def test_train_texts_positives_agree_with_plain_substring_tests() -> None:
    rng = random.Random(4)
    letters = ["ཀ", "ཁ", "ག", "ཀྲ"]  # few syllables: phrases recur in other lines, and inside other syllables
    lines = ["་".join(rng.choice(letters) for _ in range(rng.randint(1, 9))) + rng.choice(["", "།", " །"])
             for _ in range(60)]
    lines[7] = lines[3]  # duplicates
    texts = TrainTexts(lines, p=0.6, min_syllables=1, max_syllables=3, seed=9)
    order = rng.sample(range(60), 60)
    pos = texts.positives(order)
    fed = [texts.text(i) for i in order]
    assert pos.tolist() == [[t in lines[i] for t in fed] for i in order]
    assert pos.sum() > 3 * 60  # many off-diagonal positives
