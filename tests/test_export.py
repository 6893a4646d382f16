"""The one image-embedding path (lineclip.encoder.embed_batches) and the corpus export's parts: training-time
(validation, export) and inference-time (LineEncoder) embeddings are one computation; parts written by
processes as they embed merge into the corpus file in dataset order. The 2-process run of the export is in
test_distributed.py (tests/distributed/checks.py export)."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from PIL import Image

from lineclip.batch import LineCollator, LineDataset
from lineclip.config import asset_dir
from lineclip.corpus import EmbeddingPart, merge_parts
from lineclip.encoder import LineEncoder, embed_batches, line_batches
from lineclip.manifest import read_manifest
from lineclip.preprocess import LineGeometry, LineImageTransform
from lineclip.validation import embed_dataset, export_corpus


def test_parts_merge_into_dataset_order_in_chunks(tmp_path):
    rng = np.random.default_rng(0)
    n, dim = 23, 5
    rows = rng.standard_normal((n, dim)).astype(np.float32)
    dealt = rng.permutation([i for i in range(n + 4) if i not in (3, 11, 12, 20)])[:n - 4]  # holes: skipped lines
    shares = [dealt[0::3], dealt[1::3], dealt[2::3]]  # three processes; one batch of each at a time
    for rank, share in enumerate(shares):
        with EmbeddingPart(tmp_path, rank, dim) as part:
            for start in range(0, len(share), 4):
                part.append(share[start:start + 4], rows[share[start:start + 4] % n])
            assert part.n_rows == len(share)
    order = merge_parts(tmp_path, 3, dim, tmp_path / "merged.npy", chunk_rows=3)
    np.testing.assert_array_equal(order, np.sort(dealt))
    merged = np.load(tmp_path / "merged.npy")
    assert merged.dtype == np.float32 and merged.shape == (len(dealt), dim)
    np.testing.assert_array_equal(merged, rows[np.sort(dealt) % n])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged.npy"]  # the parts are gone


def test_merge_refuses_a_line_embedded_twice_or_a_short_part(tmp_path):
    for rank in (0, 1):
        with EmbeddingPart(tmp_path, rank, 2) as part:
            part.append(np.array([rank, 5]), np.ones((2, 2)))
    with pytest.raises(RuntimeError, match="embedded by two processes"):
        merge_parts(tmp_path, 2, 2, tmp_path / "m.npy")
    with EmbeddingPart(tmp_path, 0, 2) as part:
        part.append(np.array([0]), np.ones((1, 2)))
    with open(tmp_path / "part_00000.f32", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(RuntimeError, match="incomplete part"):
        merge_parts(tmp_path, 1, 2, tmp_path / "m.npy")
    with EmbeddingPart(tmp_path, 0, 2):
        pass
    assert merge_parts(tmp_path, 1, 2, tmp_path / "empty.npy").size == 0
    assert np.load(tmp_path / "empty.npy").shape == (0, 2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random model and 12 demo lines as records: three cropped to 250 px (another width bucket), and a
    broken file at position 5."""
    from usage_support import compose_cfg

    from lineclip.trainer import build_model

    torch.manual_seed(0)
    model, _, _ = build_model(compose_cfg())
    model.eval()
    demo = asset_dir("demo")
    records, _ = read_manifest(demo / "eval" / "meta" / "lines.jsonl", demo)
    records = records[:12]
    files = tmp_path_factory.mktemp("lines")
    for i in (1, 4, 9):
        with Image.open(records[i].image_path) as image:
            image.crop((0, 0, 250, image.height)).save(files / f"{i}.png")
        records[i] = replace(records[i], image_path=str(files / f"{i}.png"))
    (files / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    records = [*records[:5], replace(records[5], image_path=str(files / "broken.jpg")), *records[5:]]
    return model, records, LineImageTransform("bdrc", LineGeometry())


def test_inference_and_training_embed_a_line_identically(tiny):
    """LineEncoder (evaluate/index/search) and validation/export take the same path: equal to the bit."""
    model, records, transform = tiny
    dataset = LineDataset(records, transform)
    assert len(set(dataset.buckets.tolist()) - {-1}) >= 2 and dataset.buckets[5] == -1
    trained = embed_dataset(Accelerator(cpu=True), model, dataset, LineCollator(64), batch_size=4, num_workers=0)
    encoder = LineEncoder(model, transform, 64, {}, device="cpu")
    inferred, kept = encoder.encode_image_files([r.image_path for r in records], batch_size=4)
    np.testing.assert_array_equal(kept, trained.indices.numpy())
    assert 5 not in kept.tolist() and len(kept) == len(records) - 1
    np.testing.assert_array_equal(inferred, trained.image.numpy())
    # and one line alone gives the same row as in its batch (one bucket a batch: no padding to batch mates)
    alone = encoder.encode_images([records[7].image_path], batch_size=1)
    np.testing.assert_allclose(alone[0], inferred[list(kept).index(7)], atol=1e-6)


def test_the_export_writes_what_validation_embeds(tiny, tmp_path):
    model, records, transform = tiny
    dataset = LineDataset(records, transform)
    accelerator = Accelerator(cpu=True)
    reference = embed_dataset(accelerator, model, dataset, LineCollator(64), 3, 0, with_text=False)
    export = export_corpus(accelerator, model, dataset, LineCollator(64), 3, 0, tmp_path / "export")
    np.testing.assert_array_equal(export.indices, reference.indices.numpy())
    np.testing.assert_array_equal(np.load(export.embeddings), reference.image.numpy())
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["faiss_embeddings.npy"]
    assert model.training is False  # the caller's mode is restored


def test_embed_batches_restores_the_training_mode_and_reports_corrupt_pixels(tiny, tmp_path):
    model, records, transform = tiny
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(open(records[0].image_path, "rb").read()[:400])  # a header that opens, pixels that don't
    dataset = LineDataset([replace(records[0], image_path=str(truncated)), records[1]], transform)
    model.train()
    try:
        out = list(embed_batches(model, dataset, line_batches(dataset.buckets, 2), LineCollator(64), 0,
                                 torch.device("cpu")))
        assert model.training
    finally:
        model.eval()
    assert sum(len(b.failed) for b in out) == 1 and [b.failed for b in out if b.failed] == [[0]]
    assert np.concatenate([b.indices for b in out]).tolist() == [1]


def test_text_embeddings_stream_into_a_given_array_with_duplicates_embedded_once(tiny, tmp_path):
    model, _, transform = tiny
    encoder = LineEncoder(model, transform, 64, {}, device="cpu")
    texts = ["ཀུན་རིག", "བཀྲ་ཤིས་བདེ་ལེགས", "ཀུན་རིག", "abc", "  ཀུན་རིག ", "ཡེ་ཤེས"]  # 0, 2, 4 are one normalised text
    in_memory = encoder.encode_texts(texts, batch_size=2)
    out = np.lib.format.open_memmap(tmp_path / "t.npy", mode="w+", dtype=np.float32, shape=(len(texts), encoder.dim))
    assert encoder.encode_texts(texts, batch_size=2, out=out) is out
    out.flush()
    np.testing.assert_array_equal(np.load(tmp_path / "t.npy"), in_memory)
    np.testing.assert_array_equal(in_memory[0], in_memory[2])
    np.testing.assert_array_equal(in_memory[0], in_memory[4])
    one_by_one = np.concatenate([encoder.encode_texts([t]) for t in texts])
    np.testing.assert_allclose(in_memory, one_by_one, atol=1e-6)
    with pytest.raises(ValueError, match="out has shape"):
        encoder.encode_texts(texts, out=np.zeros((2, encoder.dim), np.float32))


def test_corpus_meta_from_the_line_columns_equals_the_one_built_from_records():
    """The export writes the meta parquet straight from the LineTable's columns (no LineRecord per line): the same
    frame as from the records one by one, for any subset and order of rows."""
    import pandas as pd

    from lineclip.artifacts import META_COLUMNS, corpus_meta
    from lineclip.lines import LineTable

    records, _ = read_manifest(asset_dir("demo") / "train" / "meta" / "lines.jsonl")
    table = LineTable.from_records(records)
    rows = np.array([5, 0, 17, 3, 159], dtype=np.int64)
    from_columns = corpus_meta(table, rows)
    expected = pd.DataFrame({c: [getattr(records[i], c) for i in rows] for c in META_COLUMNS})
    pd.testing.assert_frame_equal(from_columns, expected)
    pd.testing.assert_frame_equal(corpus_meta(records, rows), expected)
    assert len(corpus_meta(table)) == len(records)
