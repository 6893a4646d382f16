"""The reader lineclip ships (`model.init_from=lineclip:cpu_reader`, lineclip/assets/readers/cpu_reader): a complete
bundle with its model card, loaded by the path every bundle takes, and it reads synthetic lines it never saw."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import Dinov2Model, T5EncoderModel
from usage_support import compose_cfg

from lineclip.bundle import check_bundle, resolve_bundle, shipped_bundle_dir
from lineclip.config import check_config
from lineclip.encoder import LineEncoder
from lineclip.synth import generate
from lineclip.trainer import build_model

READER = shipped_bundle_dir("cpu_reader")


def test_lineclip_names_resolve_to_the_packaged_bundle_and_its_card():
    ref = resolve_bundle("lineclip:cpu_reader")
    assert ref.directory == READER and ref.prefix == ""
    config = check_bundle(ref)
    assert config["patch_multiple"] == 4 and config["target_height"] == 32
    card = (READER / "README.md").read_text()
    assert "experiments/quality/pretrain_reader.py" in card and "Learning curve" in card
    assert "/work/" not in (READER / "training_config.json").read_text()  # no paths of the machine it was made on


def test_init_from_the_shipped_reader_loads_its_weights(tmp_path):
    manifest = tmp_path / "lines.jsonl"
    manifest.write_text("")
    cfg = compose_cfg("experiment=cpu_read_real", f"data.train_manifest={manifest}", "data.val_manifest=null",
                      "data.dataset_dir=null")
    check_config(cfg)
    model, _, _ = build_model(cfg)
    # the shipped dirs loaded independently, by the hub code path (from_pretrained of a local dir)
    for loaded, mine in ((Dinov2Model.from_pretrained(READER / "text_hierarchy_vit_backbone"), model.image_backbone),
                         (T5EncoderModel.from_pretrained(READER / "text_hierarchy_clip_text_encoder"),
                          model.text_encoder)):
        expected, got = loaded.state_dict(), mine.state_dict()
        assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    # the CTC head saved beside the bundle too, read by safetensors directly: stage 2 does not restart its reading
    head = load_file(READER / "reading_head.safetensors")
    got = model.reading_head.state_dict()
    assert head.keys() == got.keys() and all(torch.equal(head[k], got[k]) for k in head)


def test_a_reading_head_of_another_geometry_starts_fresh_with_a_warning(tmp_path, caplog):
    manifest = tmp_path / "lines.jsonl"
    manifest.write_text("")
    cfg = compose_cfg("experiment=cpu_read_real", f"data.train_manifest={manifest}", "data.val_manifest=null",
                      "data.dataset_dir=null", "loss.reading_frames_per_column=3")
    model, _, _ = build_model(cfg)
    saved = load_file(READER / "reading_head.safetensors")
    assert model.reading_head.proj.weight.shape[0] != saved["proj.weight"].shape[0]
    assert any("reading head starts fresh" in r.getMessage() and "3" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_the_shipped_reader_finds_unseen_synthetic_lines_far_above_chance(tmp_path):
    # Clean short lines from seed 0's held-out pages (the pages the reader's pretraining never trained on, see
    # experiments/quality/pretrain_reader.py), rendered anew: the eval split of 400 lines, 40 lines.
    generate(compose_cfg(f"out_dir={tmp_path / 'synth'}", "n_lines=400", "seed=0", "height=[32,32]", "p_short=1.0",
                         "short_aspect=[2.0,5.0]", "degradation=0", "p_neighbours=0", "p_frame=0", "p_border=0",
                         "p_jpeg=0", "p_binarized=1.0", "p_yig_mgo=0", "workers=1", "progress=false",
                         config_name="synth"))
    rows = [json.loads(x) for x in (tmp_path / "synth" / "eval" / "meta" / "lines.jsonl").read_text().splitlines()]
    encoder = LineEncoder.load("lineclip:cpu_reader", device="cpu")
    images = encoder.encode_images([str(tmp_path / "synth" / r["line_path"]) for r in rows])
    texts = encoder.encode_texts([r["text"] for r in rows])
    scores = texts @ images.T
    ranks = np.array([(scores[i] > scores[i, i]).sum() + 1 for i in range(len(rows))])
    # A ranker that does not read has mean rank (N+1)/2 with a standard error of ~N/sqrt(12N): 0.7x of it is
    # ~3.4 standard errors away for N=40. Measured for the shipped reader: 9.9 of 40 (chance 20.5).
    assert len(rows) == 40 and ranks.mean() <= 0.7 * (len(rows) + 1) / 2
