"""End to end: `python -m lineclip.train` on a few real lines, every artifact checked, the bundle reloaded
the way the PechaBridge Workbench does, and a 4-job Hydra multirun."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

from lineclip import bundle
from lineclip.trainer import COLLAPSE_COSINE, COLLAPSE_STEPS, CollapseWatch

pytestmark = pytest.mark.slow
SPEC_BUNDLE = [
    "text_hierarchy_vit_backbone",
    "text_hierarchy_projection_head.pt",
    "text_hierarchy_clip_text_encoder",
    "text_hierarchy_clip_text_projection_head.pt",
    "training_config.json",
]


def run_train(out: Path, dataset: Path, *overrides: str, multirun: bool = False, env: dict | None = None):
    args = [
        sys.executable, "-m", "lineclip.train", *(["-m"] if multirun else []),
        "data=openpecha", f"data.dataset_dir={dataset}",
        f"data.train_manifest={dataset}/train/meta/lines.jsonl",
        f"data.val_manifest={dataset}/eval/meta/lines.jsonl",
        "data.batch_size=8", "data.num_workers=0", "trainer.max_steps=4", "trainer.checkpoint_every_steps=2",
        "trainer.progress_bar=false", "text.max_length=128",
        f"hydra.{'sweep' if multirun else 'run'}.dir={out}", *overrides,
    ]
    env = env or {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_dataset):
    out = tmp_path_factory.mktemp("run")
    # No W&B credentials and no WANDB_MODE: the run must fall back to offline by itself, not hang or crash.
    empty_netrc = tmp_path_factory.mktemp("home") / ".netrc"
    empty_netrc.write_text("")
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "WANDB_API_KEY")}
    env.update(NETRC=str(empty_netrc), HOME=str(empty_netrc.parent), WANDB_SILENT="true")
    run_train(out, tiny_dataset, "logger=wandb", env=env)
    return out


def test_every_spec_artifact_is_written(trained_run):
    for step in (2,):
        for entry in SPEC_BUNDLE:
            assert (trained_run / f"checkpoint_step_{step:07d}_{entry}").exists(), entry
    assert not list(trained_run.glob("checkpoint_step_0000004_*"))  # the last step is the final bundle
    for entry in SPEC_BUNDLE + ["faiss_embeddings.npy", "faiss_embeddings_meta.parquet"]:
        assert (trained_run / entry).exists(), entry
    assert not list(trained_run.glob(".staging*"))
    # the text encoder is the encoder alone: no decoder weights saved
    from safetensors.torch import load_file

    weights = load_file(trained_run / "text_hierarchy_clip_text_encoder" / "model.safetensors")
    assert weights and not any(k.startswith("decoder.") for k in weights)


def test_training_config_has_the_workbench_keys(trained_run, tiny_dataset):
    cfg = json.loads((trained_run / "training_config.json").read_text())
    assert cfg["mode"] == "line_clip"
    assert (cfg["target_height"], cfg["max_width"], cfg["patch_multiple"]) == (56, 1024, 14)
    assert cfg["width_buckets"] == [256, 384, 512, 768, 1024]
    assert cfg["image_preprocess_pipeline"] == "bdrc" and cfg["image_preprocess_bdrc"] is True
    assert cfg["image_preprocess_pb"] is False
    for key in ("val_i2t_r1", "val_t2i_r1"):
        assert 0.0 <= cfg[key] <= 1.0 and cfg[key] == cfg["val_metrics"][key]
    assert cfg["world_size"] == 1 and cfg["global_batch_size"] == 8 and cfg["seed"] == 42
    assert cfg["lineclip_version"] and cfg["config"]["data"]["train_manifest"].startswith(str(tiny_dataset))
    report = cfg["data_report"]
    assert report["train"]["rows_used"] == 24 and report["val"]["rows_used"] == 12
    texts = [json.loads(x)["text"] for x in (tiny_dataset / "train/meta/lines.jsonl").read_text().splitlines()]
    expected_truncated = sum(len(t.encode()) + 1 > 128 for t in texts)
    assert report["train_truncated_texts"] == expected_truncated
    assert report["train_truncated_share"] == pytest.approx(expected_truncated / 24)
    # data.min_batch_size=2 (default) at batch 8: a width bucket whose line count is 1 mod 8 loses that one line
    from lineclip.batch import LineDataset
    from lineclip.manifest import read_manifest
    from lineclip.preprocess import LineGeometry, LineImageTransform

    records, _ = read_manifest(tiny_dataset / "train/meta/lines.jsonl", tiny_dataset)
    widths = LineDataset(records, LineImageTransform("bdrc", LineGeometry())).buckets.tolist()
    assert report["train_lines_dropped_per_epoch"] == sum(widths.count(w) % 8 == 1 for w in set(widths))
    ckpt = json.loads((trained_run / "checkpoint_step_0000002_training_config.json").read_text())
    assert ckpt["global_step"] == 2 and ckpt["mode"] == "line_clip" and ckpt["val_t2i_r1"] is not None


def test_corpus_embeddings_and_meta(trained_run, tiny_dataset):
    emb = np.load(trained_run / "faiss_embeddings.npy")
    meta = pd.read_parquet(trained_run / "faiss_embeddings_meta.parquet")
    rows = [json.loads(x) for x in (tiny_dataset / "train/meta/lines.jsonl").read_text().splitlines()]
    assert emb.dtype == np.float32 and emb.shape == (24, 64)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert list(meta.columns) == ["sample_id", "doc_id", "page_id", "line_id", "text", "image_path"]
    assert meta["sample_id"].tolist() == [r["id"] for r in rows]  # manifest order
    assert meta["line_id"].tolist() == [str(r["line_id"]) for r in rows]
    assert all(Path(p).is_file() for p in meta["image_path"])


def _workbench_head(path):
    blob = torch.load(path, map_location="cpu", weights_only=True)
    d_in, d_out = blob["input_dim"], blob["output_dim"]
    h = max(2 * d_out, d_in // 2, 32)
    head = nn.Module()
    head.net = nn.Sequential(nn.Linear(d_in, h), nn.GELU(), nn.Linear(h, d_out))
    head.load_state_dict(blob["state_dict"])
    head.forward = head.net.forward
    assert set(blob["state_dict"]) == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}
    return head.eval()


@torch.inference_mode()
def test_bundle_reloads_like_the_workbench_and_reproduces_embeddings(trained_run):
    from lineclip.batch import byte_encode
    from lineclip.preprocess import LineGeometry, LineImageTransform
    from lineclip.towers import masked_mean

    cfg = json.loads((trained_run / "training_config.json").read_text())
    meta = pd.read_parquet(trained_run / "faiss_embeddings_meta.parquet")
    corpus = np.load(trained_run / "faiss_embeddings.npy")

    # image side: AutoImageProcessor + AutoModel on the backbone dir, the head rebuilt from its dict
    processor = AutoImageProcessor.from_pretrained(trained_run / "text_hierarchy_vit_backbone")
    backbone = AutoModel.from_pretrained(trained_run / "text_hierarchy_vit_backbone").eval()
    head = _workbench_head(trained_run / "text_hierarchy_projection_head.pt")
    geometry = LineGeometry(cfg["target_height"], cfg["max_width"], tuple(cfg["width_buckets"]), cfg["patch_multiple"])
    transform = LineImageTransform(cfg["image_preprocess_pipeline"], geometry,
                                   tuple(processor.image_mean), tuple(processor.image_std))
    for i in (0, 5, 23):
        pixels = transform(Image.open(meta["image_path"][i]).convert("RGB"))[None]
        emb = F.normalize(head(backbone(pixel_values=pixels).pooler_output), dim=-1)[0].numpy()
        np.testing.assert_allclose(emb, corpus[i], atol=1e-4)

    # text side: AutoModel + AutoTokenizer on the text dir, get_encoder() when present, masked mean
    tokenizer = AutoTokenizer.from_pretrained(trained_run / "text_hierarchy_clip_text_encoder")
    model = AutoModel.from_pretrained(trained_run / "text_hierarchy_clip_text_encoder").eval()
    encoder = model.get_encoder() if hasattr(model, "get_encoder") else model
    text_head = _workbench_head(trained_run / "text_hierarchy_clip_text_projection_head.pt")
    texts = meta["text"].tolist()[:4]
    tok = tokenizer(texts, padding=True, truncation=True, max_length=cfg["text_max_length"], return_tensors="pt")
    hidden = encoder(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).last_hidden_state
    workbench = F.normalize(text_head(masked_mean(hidden, tok["attention_mask"])), dim=-1)

    # lineclip's own path: byte batching + the T5 encoder as trained (T5EncoderModel)
    from lineclip.towers import ProjectionHead, build_text_encoder

    ours_encoder = build_text_encoder(str(trained_run / "text_hierarchy_clip_text_encoder"), {}).eval()
    ours_head = ProjectionHead.load(trained_run / "text_hierarchy_clip_text_projection_head.pt").eval()
    ids, mask, _ = byte_encode(texts, cfg["text_max_length"])
    ours = F.normalize(ours_head(masked_mean(ours_encoder(input_ids=ids, attention_mask=mask).last_hidden_state,
                                             mask)), dim=-1)
    short = [i for i, t in enumerate(texts) if len(t.encode()) + 1 <= cfg["text_max_length"]]
    torch.testing.assert_close(ours[short], workbench[short], atol=1e-4, rtol=1e-4)


def test_wandb_falls_back_to_offline_under_the_run_dir(trained_run):
    runs = list((trained_run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    log = (trained_run / "train.log").read_text()
    assert log.count("W&B: no credentials") == 1



def test_validation_scores_within_page_and_phrase_queries_and_logs_the_levels(trained_run, tiny_dataset):
    from lineclip import load_encoder
    from lineclip.manifest import read_manifest
    from lineclip.phrases import contains_phrase, sample_phrases

    cfg = json.loads((trained_run / "training_config.json").read_text())
    val = cfg["val_metrics"]
    records, _ = read_manifest(tiny_dataset / "eval/meta/lines.jsonl", tiny_dataset)
    texts, pages = [r.text for r in records], [r.page_id for r in records]
    encoder = load_encoder(trained_run, device="cpu")
    sims = encoder.encode_texts(texts).astype(np.float64) @ encoder.encode_images(
        [r.image_path for r in records]).astype(np.float64).T  # [text, image]
    # within page (4 pages of 3 lines), t2i: ranks by explicit comparison on the query's page
    ranks = []
    for q in range(12):
        page = [j for j in range(12) if pages[j] == pages[q]]
        best = max(sims[q, j] for j in page if texts[j] == texts[q])
        ranks.append(1 + sum(sims[q, j] > best + 1e-5 for j in page))
    assert val["val_page_t2i_r1"] == pytest.approx(np.mean(np.array(ranks) <= 1))
    assert val["val_page_t2i_mrr"] == pytest.approx(np.mean(1 / np.array(ranks)))
    # phrase queries of seed 0 (trainer.val_phrase_seed), every line containing the phrase correct
    drawn = sample_phrases(texts, 0)
    queries = [q for q, p in enumerate(drawn) if p is not None]
    emb = encoder.encode_texts([drawn[q] for q in queries]).astype(np.float64)
    phrase_sims = emb @ encoder.encode_images([r.image_path for r in records]).astype(np.float64).T
    phrase_ranks = []
    for row, q in enumerate(queries):
        best = max(phrase_sims[row, j] for j in range(12) if contains_phrase(texts[j], drawn[q]))
        phrase_ranks.append(1 + sum(phrase_sims[row, j] > best + 1e-5 for j in range(12)))
    assert val["val_phrase_t2i_r10"] == pytest.approx(np.mean(np.array(phrase_ranks) <= 10))
    assert "val_page_i2t_r1" in val and "val_t2i_r1" in val  # the whole-gallery metrics stay
    # Levels by hand: eval lines 0 and 1 share a text on page TCCG:15; 4 pages x 3 lines; 2 collections x 6.
    levels = cfg["data_report"]["val_levels"]
    assert levels["val_page_chance_r1"] == pytest.approx((2 / 3 + 2 / 3 + 10 / 3) / 12)
    assert levels["val_chance_r1"] == pytest.approx((2 / 12 + 2 / 12 + 10 / 12) / 12)
    assert levels["val_collection_level_r1"] == pytest.approx((2 / 6 + 2 / 6 + 10 / 6) / 12)
    assert "val_phrase_t2i_length_level_r10" in levels and "val_page_i2t_length_level_r1" in levels
    assert "val_page_t2i_r1" not in levels
    assert all("val_page_chance_r1" not in h for h in cfg["val_history"])  # constants are kept once
    # and the tracker got all of them: the offline W&B run's record file (what `wandb sync` uploads) has the keys
    record = next((trained_run / "wandb").glob("offline-run-*/*.wandb")).read_bytes()
    for key in ("val_page_t2i_r1", "val_page_i2t_r1", "val_phrase_t2i_r1", "val_page_chance_r1",
                "val_phrase_collection_level_r1", "val_t2i_length_level_r1"):
        assert bytes([len(key)]) + key.encode() in record, key  # a length-prefixed protobuf string: the exact key

def test_multirun_four_jobs_each_complete(tmp_path, tiny_dataset):
    out = tmp_path / "sweep"
    run_train(out, tiny_dataset, "optim.lr=1e-4,5e-5", "data.batch_size=4,8", "logger=wandb",
              "trainer.max_steps=1", "trainer.export_embeddings=true", multirun=True)
    jobs = sorted(p for p in out.iterdir() if p.is_dir() and (p / "training_config.json").exists())
    assert len(jobs) == 4
    seen = set()
    for job in jobs:
        assert bundle.is_complete_bundle(job, "") and (job / "faiss_embeddings.npy").exists()
        assert len(list((job / "wandb").glob("offline-run-*"))) == 1  # one W&B run per job, under its dir
        cfg = json.loads((job / "training_config.json").read_text())["config"]
        seen.add((cfg["optim"]["lr"], cfg["data"]["batch_size"]))
    assert seen == {(1e-4, 4), (1e-4, 8), (5e-5, 4), (5e-5, 8)}


@pytest.mark.parametrize(
    "override,reason",
    [
        ("optim.lr=-1", "optim.lr must be > 0"),
        ("data.train_manifest=/nonexistent/lines.jsonl", "data.train_manifest=/nonexistent/lines.jsonl is not"),
        ("preprocess.pipeline=sharpen", "preprocess.pipeline='sharpen' is not one of"),
    ],
)
def test_bad_config_exits_nonzero_with_one_line(tmp_path, override, reason):
    proc = subprocess.run([sys.executable, "-m", "lineclip.train", override, "logger=none",
                           f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "ERROR" in line]
    assert len(errors) == 1 and reason in errors[0]
    assert not (tmp_path / "text_hierarchy_vit_backbone").exists()


def test_collapse_is_logged_and_warned_once(trained_run):
    rows = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/loss" in r]
    assert train_rows and [r["step"] for r in train_rows] == sorted(r["step"] for r in train_rows)
    for r in train_rows:
        assert -1.0 <= r["train/embedding_cosine_image"] <= 1.0 and -1.0 <= r["train/embedding_cosine_text"] <= 1.0
        assert r["train/embedding_cosine"] == max(r["train/embedding_cosine_image"], r["train/embedding_cosine_text"])
    warnings = (trained_run / "train.log").read_text().count("embeddings collapsing")
    assert warnings <= 1
    above = [r["step"] for r in train_rows if r["train/embedding_cosine"] > COLLAPSE_COSINE]
    if any(above[i + COLLAPSE_STEPS - 1] - above[i] == COLLAPSE_STEPS - 1 for i in range(len(above) - 4)):
        assert warnings == 1  # (logged steps only: a run logged every step shows every run of steps)


def test_collapse_is_warned_once_after_steps_in_a_row_not_after_one_batch():
    rng = np.random.default_rng(0)
    for _ in range(50):
        cosines = rng.choice([0.5, 0.995], size=40, p=[0.3, 0.7])
        watch = CollapseWatch()
        warned_at = [i for i, c in enumerate(cosines) if watch.update(float(c))]
        # independently: the first index closing COLLAPSE_STEPS values above the threshold in a row
        first = next((i for i in range(COLLAPSE_STEPS - 1, len(cosines))
                      if all(cosines[i - COLLAPSE_STEPS + 1 : i + 1] > COLLAPSE_COSINE)), None)
        assert warned_at == ([] if first is None else [first])
    spikes = CollapseWatch()  # the demo's pattern: one look-alike batch an epoch
    assert not any(spikes.update(0.990 + 0.001 * (i % 10 == 9)) for i in range(60))


@pytest.mark.slow
def test_reading_losses_train_and_stay_out_of_the_bundle(tmp_path, tiny_dataset):
    out = tmp_path / "run"
    run_train(out, tiny_dataset, "logger=none", "loss.reading_weight=1.0", "loss.bag_weight=1.0",
              "loss.text_bag_weight=1.0", "loss.bag_levels=[1,2]",
              "preprocess.image_mean=[1.0,1.0,1.0]", "preprocess.image_std=[0.5,0.5,0.5]")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    reading = [r["train/reading_loss"] for r in rows if "train/loss" in r]
    assert reading and all(math.isfinite(v) and v > 0 for v in reading)
    # the bundle is what the Workbench reads: the same files, no reading head, the configured pixel statistics
    processor = json.loads((out / "text_hierarchy_vit_backbone" / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == [1.0, 1.0, 1.0] and processor["image_std"] == [0.5, 0.5, 0.5]
    head = torch.load(out / "text_hierarchy_projection_head.pt", weights_only=True)
    assert set(head["state_dict"]) == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}
    backbone = AutoModel.from_pretrained(out / "text_hierarchy_vit_backbone")
    assert not any("reading" in name or "bag" in name for name, _ in backbone.named_parameters())


def test_train_log_times_the_start_up_phases(trained_run):
    """One line says where the time to the first batch went (issue 25): each phase once, none negative, and
    together no more than the process's age at that point."""
    import re

    line = re.search(r"start-up phases \(s\): (.*)", (trained_run / "train.log").read_text()).group(1)
    phases = {name: float(value) for name, value in (part.split("=") for part in line.split(", "))}
    for name in ("imports", "run setup", "parse", "header scan", "model build", "bucketing", "first batch", "total"):
        assert name in phases, (name, line)
    assert all(seconds >= 0 for seconds in phases.values()), line
    total = phases.pop("total")
    assert sum(phases.values()) <= total + 0.5, line  # the laps add up to at most the process's age
