"""lineclip.encoder: finding a bundle (run dir, checkpoint prefix, any of its files), refusing broken ones with one
line, and embedding exactly as training does; plus the Workbench's own way of loading a bundle."""

import json
import logging
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from usage_support import overfit_run

from lineclip import artifacts
from lineclip.bundle import BundleError, BundleRef, check_bundle, resolve_bundle
from lineclip.config import asset_dir
from lineclip.encoder import ImageReadError, LineEncoder

CKPT = "checkpoint_step_0000030_"


def _fake_bundle(directory, prefix="", skip=()):
    """The five entries as empty stand-ins (enough for resolving and the completeness check)."""
    directory.mkdir(parents=True, exist_ok=True)
    for entry in artifacts.BUNDLE_ENTRIES:
        if entry in skip:
            continue
        path = directory / f"{prefix}{entry}"
        if entry in (artifacts.BACKBONE, artifacts.TEXT_ENCODER):
            path.mkdir()
            (path / "config.json").write_text("{}")
        elif entry == artifacts.CONFIG:
            path.write_text(json.dumps({"mode": "line_clip", "target_height": 56, "max_width": 1024,
                                        "width_buckets": [256], "patch_multiple": 14,
                                        "image_preprocess_pipeline": "bdrc", "text_max_length": 64}))
        else:
            path.write_bytes(b"")
    return directory


def test_resolve_accepts_a_run_dir_a_prefix_and_any_file_of_a_bundle(tmp_path):
    run = _fake_bundle(_fake_bundle(tmp_path / "run"), CKPT)
    assert resolve_bundle(run) == BundleRef(run, "")
    for given in (f"{CKPT}", CKPT.rstrip("_"), f"{CKPT}training_config.json",
                  f"{CKPT}text_hierarchy_clip_text_projection_head.pt", f"{CKPT}text_hierarchy_projection_head.pt",
                  f"{CKPT}text_hierarchy_vit_backbone", f"{CKPT}text_hierarchy_clip_text_encoder"):
        assert resolve_bundle(run / given) == BundleRef(run, CKPT), given
    (run / f"{CKPT}training_state").mkdir()  # written beside a checkpoint bundle for resuming
    assert resolve_bundle(run / f"{CKPT}training_state") == BundleRef(run, CKPT)
    assert resolve_bundle(run / "text_hierarchy_vit_backbone") == BundleRef(run, "")
    for ref in (BundleRef(run, ""), BundleRef(run, CKPT)):
        assert check_bundle(ref)["mode"] == "line_clip"


@pytest.mark.parametrize(
    "case,expected",
    [
        ("missing_dir", "does not exist"),
        ("empty_dir", "no lineclip bundle at"),
        ("only_checkpoint", "bundles there: 'checkpoint_step_0000030_'"),
        ("partial", "incomplete bundle at"),
        ("mixed_prefixes", "every file of one bundle must share one prefix"),
        ("not_line_clip", "is not a line_clip training config"),
    ],
)
def test_broken_bundles_fail_with_one_line(tmp_path, case, expected):
    run = tmp_path / "run"
    if case == "empty_dir":
        run.mkdir()
    elif case == "only_checkpoint":
        _fake_bundle(run, CKPT)
    elif case == "partial":
        _fake_bundle(run, skip=(artifacts.TEXT_HEAD,))
    elif case == "mixed_prefixes":  # the text head of the final bundle is only there under a checkpoint's prefix
        _fake_bundle(run, skip=(artifacts.TEXT_HEAD,))
        (run / f"{CKPT}{artifacts.TEXT_HEAD}").write_bytes(b"")
    elif case == "not_line_clip":
        _fake_bundle(run)
        (run / artifacts.CONFIG).write_text(json.dumps({"mode": "patch"}))
    with pytest.raises(BundleError) as err:
        check_bundle(resolve_bundle(run))
    assert expected in str(err.value) and "\n" not in str(err.value)
    if case == "mixed_prefixes":
        assert f"{CKPT}{artifacts.TEXT_HEAD}" in str(err.value)


def test_import_lineclip_stays_light():
    code = "import sys, lineclip; assert 'load_encoder' in dir(lineclip); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ------------------------------------------------------------------------------------- with a trained run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return overfit_run(tmp_path_factory)[0]


@pytest.fixture(scope="module")
def encoder(run):
    from lineclip import load_encoder

    return load_encoder(run, device="cpu")


@pytest.mark.slow
def test_reproduces_the_exported_training_corpus(encoder, run):
    meta = pd.read_parquet(run / artifacts.EMBEDDINGS_META)
    exported = np.load(run / artifacts.EMBEDDINGS)
    ours = encoder.encode_images(meta["image_path"].tolist(), batch_size=3)
    assert ours.dtype == np.float32 and ours.shape == exported.shape == (8, encoder.dim)
    np.testing.assert_allclose(ours, exported, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(encoder.encode_texts(meta["text"].tolist()), axis=1), 1.0, atol=1e-5)
    assert encoder.text_max_length == 64 and encoder.transform.pipeline == "bdrc"


@pytest.mark.slow
def test_images_are_bucketed_but_returned_in_input_order(encoder, run):
    meta = pd.read_parquet(run / artifacts.EMBEDDINGS_META)
    demo = asset_dir("demo") / "eval" / "lines"
    # cropped (bucket 266) and full-width demo lines (bucket 1022), paths and PIL images, interleaved
    items = [meta["image_path"][0], str(demo / "15_TCCG_002.jpg"), Image.open(meta["image_path"][1]),
             demo / "25_TCCG_005.jpg", meta["image_path"][2]]
    assert len({encoder.transform(Image.open(p) if not isinstance(p, Image.Image) else p).shape for p in items}) == 2
    together = encoder.encode_images(items, batch_size=2)
    one_by_one = np.concatenate([encoder.encode_images([item], batch_size=1) for item in items])
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)
    assert encoder.encode_images([]).shape == (0, encoder.dim)


@pytest.mark.slow
def test_texts_are_normalised_like_training_and_long_ones_warn(encoder, run, caplog):
    text = pd.read_parquet(run / artifacts.EMBEDDINGS_META)["text"][0] + " ཀུན་རིག་མཆོག"  # 60 + 34 bytes
    messy = "  " + unicodedata.normalize("NFD", text).replace(" ", " \t ") + "\n"
    with caplog.at_level(logging.WARNING, logger="lineclip.encoder"):
        a, b, c = encoder.encode_texts([text, messy, text[:10]], batch_size=2)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert "2 of 3 texts exceed text_max_length=64" in caplog.text
    with pytest.raises(TypeError):
        encoder.encode_texts(text)


@pytest.mark.slow
def test_unreadable_images_raise_or_are_skipped(encoder, run, tmp_path):
    good = pd.read_parquet(run / artifacts.EMBEDDINGS_META)["image_path"].tolist()[:2]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.raises(ImageReadError, match="broken.jpg"):
        encoder.encode_images([good[0], bad, good[1]])
    emb, kept = encoder.encode_image_files([good[0], bad, good[1]])
    assert kept.tolist() == [0, 2]
    np.testing.assert_allclose(emb, encoder.encode_images(good), atol=1e-6)


@pytest.mark.slow
def test_a_checkpoint_loads_by_prefix_and_differs_from_the_final_model(encoder, run):
    from lineclip import load_encoder

    ckpt = load_encoder(run / CKPT.rstrip("_"), device="cpu")
    assert ckpt.bundle == BundleRef(run, CKPT) and ckpt.training_config["global_step"] == 30
    same = load_encoder(run / f"{CKPT}training_config.json", device="cpu")
    texts = ["ཀུན་རིག་མཆོག", "བཀྲ་ཤིས"]
    np.testing.assert_array_equal(ckpt.encode_texts(texts), same.encode_texts(texts))
    assert not np.allclose(ckpt.encode_texts(texts), encoder.encode_texts(texts), atol=1e-3)
    assert ckpt.fingerprint() != encoder.fingerprint()


@pytest.mark.slow
def test_a_broken_head_is_one_line(run, tmp_path):
    from lineclip import load_encoder

    copy = shutil.copytree(run, tmp_path / "run", ignore=shutil.ignore_patterns("checkpoint_*"))
    (copy / artifacts.TEXT_HEAD).write_bytes(b"not a torch file")
    with pytest.raises(BundleError, match="cannot load .*text_hierarchy_clip_text_projection_head.pt") as err:
        load_encoder(copy)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------ the Workbench


def _workbench_head(path):
    blob = torch.load(path, map_location="cpu", weights_only=True)
    d_in, d_out = blob["input_dim"], blob["output_dim"]
    assert set(blob["state_dict"]) == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}
    h = max(2 * d_out, d_in // 2, 32)
    head = nn.Module()
    head.net = nn.Sequential(nn.Linear(d_in, h), nn.GELU(), nn.Linear(h, d_out))
    head.load_state_dict(blob["state_dict"])
    return head.net.eval()


@pytest.mark.slow
@torch.inference_mode()
def test_the_workbench_loading_path_gives_the_same_embeddings(encoder, run):
    """Load the finished bundle exactly as the PechaBridge Workbench does and compare with LineEncoder."""
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    from lineclip.preprocess import LineGeometry, LineImageTransform

    cfg = json.loads((run / "training_config.json").read_text())
    meta = pd.read_parquet(run / artifacts.EMBEDDINGS_META)

    processor = AutoImageProcessor.from_pretrained(run / "text_hierarchy_vit_backbone")
    backbone = AutoModel.from_pretrained(run / "text_hierarchy_vit_backbone").eval()
    head = _workbench_head(run / "text_hierarchy_projection_head.pt")
    geometry = LineGeometry(cfg["target_height"], cfg["max_width"], tuple(cfg["width_buckets"]), cfg["patch_multiple"])
    transform = LineImageTransform(cfg["image_preprocess_pipeline"], geometry, tuple(processor.image_mean),
                                   tuple(processor.image_std))
    paths = meta["image_path"].tolist()
    pixels = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    workbench_images = F.normalize(head(backbone(pixel_values=pixels).pooler_output), dim=-1).numpy()
    np.testing.assert_allclose(encoder.encode_images(paths), workbench_images, atol=1e-4)

    tokenizer = AutoTokenizer.from_pretrained(run / "text_hierarchy_clip_text_encoder")
    model = AutoModel.from_pretrained(run / "text_hierarchy_clip_text_encoder").eval()
    text_encoder = model.get_encoder() if hasattr(model, "get_encoder") else model
    text_head = _workbench_head(run / "text_hierarchy_clip_text_projection_head.pt")
    # Texts that fit text_max_length: the Workbench's tokenizer cuts long ones mid-character, lineclip does not.
    texts = ["ཀུན་རིག་མཆོག་།", "བཀྲ་ཤིས་བདེ་ལེགས།", "ཡེ་ཤེས་གཉིས་མེད", "abc"]
    assert all(len(t.encode()) + 1 <= cfg["text_max_length"] for t in texts)
    tok = tokenizer(texts, padding=True, truncation=True, max_length=cfg["text_max_length"], return_tensors="pt")
    hidden = text_encoder(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).last_hidden_state
    mask = tok["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    workbench_texts = F.normalize(text_head(pooled), dim=-1).numpy()
    np.testing.assert_allclose(encoder.encode_texts(texts), workbench_texts, atol=1e-4)


def test_a_bundle_written_before_the_redesign_loads_and_embeds_as_it_did():
    """tests/data/bundle_f90342f was written, and its expected embeddings computed, by the code before issue 15's
    redesign (its README says how): today's LineEncoder must load it and give the same embeddings."""
    bundle = Path(__file__).parent / "data" / "bundle_f90342f"
    rows = [json.loads(x) for x in (asset_dir("demo") / "eval" / "meta" / "lines.jsonl").read_text().splitlines()][:4]
    encoder = LineEncoder.load(bundle, device="cpu")
    images = encoder.encode_images([str(asset_dir("demo") / r["line_path"]) for r in rows])
    texts = encoder.encode_texts([r["text"] for r in rows])
    np.testing.assert_allclose(images, np.load(bundle / "expected_image_embeddings.npy"), atol=1e-5)
    np.testing.assert_allclose(texts, np.load(bundle / "expected_text_embeddings.npy"), atol=1e-5)
