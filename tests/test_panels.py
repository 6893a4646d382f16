"""lineclip.panels: the W&B objects beyond scalars, checked against independent computations; and, end to end,
what an offline training run writes under its run dir (tests/wandb_records.py reads it back)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import wandb
from PIL import Image

from lineclip import panels
from lineclip.batch import byte_encode, cut_at_char_boundary
from lineclip.preprocess import LineGeometry, LineImageTransform


def caption(image: wandb.Image) -> str:
    return wandb.Image.captions([image])[0]


TIBETAN = ["བཀྲ་ཤིས་བདེ་ལེགས།", "སངས་རྒྱས། ཆོས།", "ཀ", "དགེ་འདུན་ལ་སྐྱབས་སུ་མཆིའོ།"]


def test_table_queries_are_a_seeded_ascending_subset():
    candidates = [3, 5, 8, 13, 21, 34, 55, 89, 144]
    chosen = panels.table_queries(candidates, 4, seed=7)
    assert chosen == sorted(chosen) and len(set(chosen)) == 4 and set(chosen) <= set(candidates)
    assert panels.table_queries(candidates, 4, seed=7) == chosen  # the same rows every validation
    assert panels.table_queries(list(reversed(candidates)), 4, seed=7) != [] and \
        panels.table_queries(candidates, 4, seed=8) != chosen  # another seed, (here) another set
    assert panels.table_queries(candidates, 100, seed=0) == candidates  # fewer candidates than asked: all
    assert panels.table_queries(candidates, 0, seed=0) == [] and panels.table_queries([], 5, seed=0) == []


def _embedded(n=11, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, dim, generator=g), dim=-1)
    text = F.normalize(image + 0.7 * torch.randn(n, dim, generator=g), dim=-1)
    ids = torch.arange(n)
    if n > 4:
        ids[4] = ids[2]  # lines 2 and 4 share a transcription: either is a hit for the other's text
    return image, text, ids


def test_retrieval_table_rows_match_a_full_sort():
    image, text, ids = _embedded()
    n = len(ids)
    ranks = torch.arange(n) + 100  # any values: the table shows what it is given
    names = [f"line{i}" for i in range(n)]
    texts = [f"text of {i}" for i in range(n)]
    asked = []

    def thumbnail(row):
        asked.append(row)
        return np.full((4, 12, 3), row, dtype=np.uint8)

    table = panels.retrieval_table([2, 7], image, text, ids, ranks, names, texts, thumbnail, top_k=3)
    assert isinstance(table, wandb.Table)
    assert table.columns == ["query", "text", "line", "rank", "hits", "top1", "score1", "hit1", "top2", "score2",
                             "hit2", "top3", "score3", "hit3"]
    sims = (text @ image.T).numpy()
    for query, row in zip([2, 7], table.data, strict=True):
        order = np.argsort(-sims[query])[:3]
        assert row[:2] == [f"line{query}", f"text of {query}"]
        assert caption(row[2]) == f"line{query}" and row[3] == 100 + query
        hits = [bool(ids[j] == ids[query]) for j in order]
        assert row[4] == sum(hits)
        for j, col in enumerate(order):
            image_cell, score, hit = row[5 + 3 * j: 8 + 3 * j]
            assert isinstance(image_cell, wandb.Image)
            assert caption(image_cell) == f"{j + 1}. {sims[query, col]:.3f} {'✓' if hits[j] else '✗'} line{col}"
            assert score == pytest.approx(float(sims[query, col]), abs=1e-6) and hit is hits[j]
    marks = {row[7 + 3 * j] for row in table.data for j in range(3)}
    assert marks == {True, False}  # both marks occur
    assert sorted(set(asked)) == sorted({2, 7, *np.argsort(-sims[2])[:3], *np.argsort(-sims[7])[:3]})


def test_retrieval_table_on_a_gallery_smaller_than_top_k():
    image, text, ids = _embedded(n=2)
    table = panels.retrieval_table([0], image, text, ids, torch.ones(2, dtype=torch.long), ["a", "b"],
                                   ["ta", "tb"], lambda row: np.zeros((2, 2), np.uint8), top_k=3)
    row = table.data[0]
    assert len(row) == len(table.columns) and row[-3:] == [None, None, None]  # no third line to show


def test_rank_histograms_count_every_query_in_equal_bins():
    g = torch.Generator().manual_seed(1)
    n = 300
    ranks = {"t2i": torch.randint(1, n + 1, (n,), generator=g), "i2t": torch.ones(n, dtype=torch.long)}
    out = panels.rank_histograms(ranks, n)
    assert set(out) == {"val/t2i_rank", "val/t2i_log10_rank", "val/i2t_rank", "val/i2t_log10_rank"}
    hist = out["val/t2i_rank"]
    edges = np.asarray(hist.bins)
    widths = np.diff(edges)
    assert len(hist.histogram) <= 64 and np.all(widths == widths[0]) and widths[0] == int(widths[0])
    assert edges[0] == 1 and edges[-1] > n  # every rank 1..n falls in a bin
    t2i = ranks["t2i"].numpy()
    reference = [int(((t2i >= lo) & (t2i < hi)).sum()) for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    assert list(hist.histogram) == reference and sum(reference) == n
    # every i2t query found its line first: all of them in the first bin of both histograms
    assert out["val/i2t_rank"].histogram[0] == n and out["val/i2t_log10_rank"].histogram[0] == n
    log_hist = out["val/t2i_log10_rank"]
    assert log_hist.bins[0] == 0 and log_hist.bins[-1] == pytest.approx(np.log10(n))
    assert sum(log_hist.histogram) == n


def test_tower_texts_are_what_byte_encode_gave_the_tower():
    ids, mask, n_truncated = byte_encode(TIBETAN, max_length=20)
    assert n_truncated == 3  # all but the one-letter line are cut (Tibetan: 3 bytes a letter)
    expected = [t.encode()[:cut_at_char_boundary(t.encode(), 19)].decode() for t in TIBETAN]
    assert panels.tower_texts(ids, mask) == expected
    assert expected[0] != TIBETAN[0] and expected[2] == TIBETAN[2]


def test_tower_images_undo_the_normalisation_only(tmp_path):
    rng = np.random.default_rng(0)
    page = rng.integers(0, 256, size=(40, 300, 3), dtype=np.uint8)
    line = Image.fromarray(page)
    geometry = LineGeometry(28, 512, (128, 256, 512), 14)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    normalised = LineImageTransform("none", geometry, mean, std)(line)
    plain = LineImageTransform("none", geometry, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))(line)  # x / 255: the pixels
    shown = panels.tower_images(normalised[None], mean, std)[0]
    assert shown.shape == (28, plain.shape[-1], 3) and shown.dtype == np.uint8
    reference = (plain.permute(1, 2, 0).numpy() * 255).round()
    assert np.abs(shown.astype(float) - reference).max() <= 1  # float rounding only
    assert (shown[:, -5:] == 255).all()  # the white padding up to the bucket width is shown too


def test_input_images_caption_name_size_and_tower_text():
    pixels = torch.zeros(3, 3, 14, 42)
    ids, mask, _ = byte_encode(TIBETAN[:3], 128)
    images = panels.input_images(pixels, ids, mask, (0.5,) * 3, (0.5,) * 3, ["a", "b", "c"], n=2)
    assert len(images) == 2 and all(isinstance(i, wandb.Image) for i in images)
    assert caption(images[1]) == f"b (42x14): {TIBETAN[1]}"


def test_line_thumbnail_keeps_the_aspect_and_caps_the_width(tmp_path):
    Image.new("L", (2000, 100), 200).save(tmp_path / "wide.png")
    Image.new("RGBA", (300, 60), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    wide = panels.line_thumbnail(str(tmp_path / "wide.png"), height=48, max_width=500)
    assert wide.size == (500, 25) and wide.mode == "L"  # a grey scan stays grey
    clear = panels.line_thumbnail(str(tmp_path / "clear.png"), height=48)
    assert clear.size == (240, 48) and clear.mode == "RGB"
    assert clear.getpixel((10, 10)) == (255, 255, 255)  # alpha on white paper


def test_model_artifact_names_entries_without_the_prefix(tmp_path):
    (tmp_path / "checkpoint_step_0000002_backbone").mkdir()
    (tmp_path / "checkpoint_step_0000002_backbone" / "config.json").write_text("{}")
    (tmp_path / "checkpoint_step_0000002_head.pt").write_bytes(b"weights")
    artifact = panels.model_artifact("model-x", tmp_path, "checkpoint_step_0000002_", ["backbone", "head.pt"],
                                     {"global_step": 2}, policy="immutable")
    assert artifact.type == "model" and artifact.metadata == {"global_step": 2}
    entries = artifact.manifest.entries
    assert set(entries) == {"backbone/config.json", "head.pt"}
    assert entries["head.pt"].local_path == str(tmp_path / "checkpoint_step_0000002_head.pt")  # in place
    with pytest.raises(FileNotFoundError, match="missing"):
        panels.model_artifact("model-x", tmp_path, "", ["head.pt"], {})


def test_logger_none_builds_nothing_and_imports_no_wandb():
    code = ("import sys\nfrom types import SimpleNamespace as N\nfrom lineclip.tracking import RunPanels\n"
            "cfg = N(logger=N(name='none'))\np = RunPanels(N(is_main_process=True), cfg, None, None, False)\n"
            "p.log_inputs({}, 0); p.log_bundle('', 3); p.close()\n"
            "assert p.validation(3) is None and not hasattr(p, 'tracker')\nprint('wandb' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def panel_run(tmp_path_factory, tiny_dataset):
    from test_train_e2e import run_train

    out = tmp_path_factory.mktemp("panels")
    # A WANDB_DATA_DIR of the user's own would be left alone: unset, the run stages under its own dir.
    env = {k: v for k, v in os.environ.items() if k != "WANDB_DATA_DIR"}
    run_train(out, tiny_dataset, "logger=wandb", "logger.log_model=true", "logger.log_checkpoints=true",
              "logger.val_table_top_k=3", "logger.input_grid_lines=5",
              env={**env, "WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    return out


@pytest.mark.slow
def test_offline_run_writes_every_panel_under_its_run_dir(panel_run, tiny_dataset):
    from wandb_records import artifacts, history, manifest_files, offline_run

    from lineclip.bundle import BUNDLE_ENTRIES, checkpoint_prefix
    from lineclip.encoder import LineEncoder
    from lineclip.manifest import read_manifest
    from lineclip.metrics import retrieval_ranks, text_ids

    run = offline_run(panel_run)
    rows = dict(history(panel_run))
    val, _ = read_manifest(str(tiny_dataset / "eval" / "meta" / "lines.jsonl"), str(tiny_dataset))
    train, _ = read_manifest(str(tiny_dataset / "train" / "meta" / "lines.jsonl"), str(tiny_dataset))

    # train/inputs, once at step 0: the first batch's lines exactly as the towers got them
    inputs = rows[0]["train/inputs"]
    assert inputs["_type"] == "images/separated" and inputs["count"] == 5
    assert not any("train/inputs" in r for step, r in rows.items() if step)
    by_id = {r.sample_id: r for r in train}
    config = json.loads((panel_run / "training_config.json").read_text())
    transform = LineImageTransform(config["image_preprocess_pipeline"],
                                   LineGeometry(config["target_height"], config["max_width"],
                                                tuple(config["width_buckets"]), config["patch_multiple"]),
                                   (0.0,) * 3, (1.0,) * 3)
    for filename, caption in zip(inputs["filenames"], inputs["captions"], strict=True):
        name, text = caption.split(": ", 1)
        record = by_id[name.split(" ")[0]]
        assert text == record.text.encode()[:cut_at_char_boundary(record.text.encode(), 127)].decode()
        shown = np.asarray(Image.open(run / "files" / filename).convert("RGB")).astype(float)
        expected = (transform(Image.open(record.image_path)).permute(1, 2, 0).numpy() * 255).round()
        assert shown.shape == expected.shape and np.abs(shown - expected).max() <= 1

    # at each validation (steps 2 and 4): the table and the rank histograms
    assert {step for step, r in rows.items() if "val/retrieval" in r} == {2, 4}
    tables = [a for a in artifacts(panel_run) if a.type == "run_table"]
    assert len(tables) == 2
    final_table = json.loads(Path(manifest_files(tables[-1])["val/retrieval.table.json"]).read_text())
    assert rows[4]["val/retrieval"]["nrows"] == len(final_table["data"]) == len(val)  # 12 lines < 16 queries
    assert str(panel_run / "wandb" / "data") in manifest_files(tables[-1])["val/retrieval.table.json"]

    # the final model's own embeddings give the same top 3 and the same ranks as the last validation
    encoder = LineEncoder.load(panel_run, device="cpu")
    image = torch.as_tensor(encoder.encode_images([r.image_path for r in val]))
    text = torch.as_tensor(encoder.encode_texts([r.text for r in val]))
    ids = torch.as_tensor(text_ids([r.text for r in val]))
    sims = (text @ image.T).numpy()
    ranks = retrieval_ranks(image, text, ids)
    staged = manifest_files(tables[-1])
    val_index = {r.sample_id: i for i, r in enumerate(val)}
    for row in final_table["data"]:
        q = val_index[row[0]]
        assert row[1] == val[q].text and row[3] == int(ranks["t2i"][q])
        order = np.argsort(-sims[q], kind="stable")[:3]
        for j, col in enumerate(order):
            cell, score, hit = row[5 + 3 * j: 8 + 3 * j]
            shown = val_index[cell["caption"].split(" ")[-1]]  # the line the table shows: `1. 0.123 ✓ <name>`
            # the j-th best score, and the score of the line shown (the same line unless two lines tie)
            assert score == pytest.approx(float(sims[q, col]), abs=1e-4)
            assert score == pytest.approx(float(sims[q, shown]), abs=1e-4)
            assert hit == (val[shown].text == val[q].text) and cell["caption"].startswith(f"{j + 1}. ")
            thumb = Image.open(staged[cell["path"]])
            assert thumb.size == (cell["width"], cell["height"])
            assert thumb.height == panels.THUMBNAIL_HEIGHT or thumb.width == panels.THUMBNAIL_MAX_WIDTH
    for direction in ("t2i", "i2t"):
        hist = rows[4][f"val/{direction}_rank"]
        edges = np.asarray(hist["bins"])
        assert hist["_type"] == "histogram"
        assert hist["values"] == np.histogram(ranks[direction].numpy(), bins=edges)[0].tolist()
        assert sum(rows[4][f"val/{direction}_log10_rank"]["values"]) == len(val)

    # the data wait beside samples/s
    metrics = [json.loads(line) for line in (panel_run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [m for m in metrics if "train/loss" in m]
    assert train_rows and all(m["train/data_wait_s"] >= 0 and 0 <= m["train/data_wait_fraction"] <= 1
                              for m in train_rows)

    # the model artifacts: the step-2 checkpoint (copied to the staging dir) and the final bundle (in place)
    models = [a for a in artifacts(panel_run) if a.type == "model"]
    assert [set(a.aliases) for a in models] == [{"latest", "step-2"}, {"step-4", "final", "latest"}]
    checkpoint, final = (manifest_files(a) for a in models)
    prefix = checkpoint_prefix(2)
    assert json.loads(models[0].metadata) == json.loads((panel_run / f"{prefix}training_config.json").read_text())
    assert json.loads(models[1].metadata) == config
    for name, local in checkpoint.items():
        entry = name.split("/")[0]
        assert entry in BUNDLE_ENTRIES
        original = panel_run / f"{prefix}{name}"
        assert local.startswith(str(panel_run / "wandb" / "data")) and Path(local).read_bytes() == original.read_bytes()
    assert {name.split("/")[0] for name in final} == {*BUNDLE_ENTRIES, "faiss_embeddings.npy",
                                                      "faiss_embeddings_meta.parquet", "data_report.json"}
    assert all(local == str(panel_run / name) for name, local in final.items())


@pytest.mark.parametrize(("override", "message"), [
    ("logger.val_table_top_k=0", "logger.val_table_top_k must be > 0"),
    ("logger.val_table_queries=-1", "logger.val_table_queries must be >= 0"),
    ("logger.input_grid_lines=-2", "logger.input_grid_lines must be >= 0"),
])
def test_panel_settings_are_checked(compose_cfg, override, message):
    from lineclip.config import ConfigError, check_config

    cfg = compose_cfg(override)
    assert cfg.logger.log_model is False and cfg.logger.log_checkpoints is False  # artifacts: off by default
    with pytest.raises(ConfigError, match=message):
        check_config(cfg)
