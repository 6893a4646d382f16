"""The recipe's pieces: image crops that follow text truncation, and two-stage training (model.init_from)."""

import json
import math

import pytest
import torch
from PIL import Image
from usage_support import compose_cfg

from lineclip import artifacts
from lineclip.batch import LineDataset
from lineclip.config import ConfigError, register_configs
from lineclip.lines import LineRecord
from lineclip.preprocess import LineGeometry, LineImageTransform

register_configs()


def test_crop_to_text_cuts_the_image_to_the_kept_share(tmp_path):
    path = tmp_path / "line.png"
    Image.new("RGB", (1500, 80), "white").save(path)
    text = "\u0f40" * 100  # 300 bytes
    records = [LineRecord("a", str(path), text), LineRecord("b", str(path), "\u0f40" * 10)]
    transform = LineImageTransform("none", LineGeometry())
    cropped = LineDataset(records, transform, crop_to_text_bytes=128)
    kept = 126  # 127 bytes would split a 3-byte character
    share = kept / 300 * 1.04 + 0.01
    assert cropped.visible_share[0] == pytest.approx(share) and cropped.visible_share[1] == 1.0
    assert cropped.buckets[0] == transform.bucket_of(math.ceil(1500 * share), 80)
    assert cropped[0]["pixel_values"].shape[-1] == cropped.buckets[0]
    whole = LineDataset(records, transform)
    assert whole.buckets[0] == transform.bucket_of(1500, 80) > cropped.buckets[0]
    assert cropped.buckets[1] == whole.buckets[1]  # a text that fits keeps the whole line


def _cfg(*overrides):
    return compose_cfg(*overrides)


@pytest.mark.slow
def test_init_from_starts_from_an_earlier_run(tmp_path, tiny_dataset):
    from lineclip.trainer import build_model, train

    data = ["data=openpecha", f"data.dataset_dir={tiny_dataset}",
            f"data.train_manifest={tiny_dataset}/train/meta/lines.jsonl", "data.num_workers=0", "logger=none",
            "trainer.progress_bar=false", "text.max_length=64", "trainer.export_embeddings=false"]
    stage1 = tmp_path / "stage1"
    train(_cfg(*data, "trainer.max_steps=3", "optim.lr=1e-3", f"output_dir={stage1}"))
    for source in (str(stage1), str(stage1 / "training_config.json")):
        model, _, _ = build_model(_cfg(*data, f"model.init_from={source}"))
        saved = torch.load(stage1 / artifacts.IMAGE_HEAD, weights_only=True)["state_dict"]
        for key, value in saved.items():
            torch.testing.assert_close(model.image_head.state_dict()[key], value)
        saved_text = torch.load(stage1 / artifacts.TEXT_HEAD, weights_only=True)["state_dict"]
        for key, value in saved_text.items():
            torch.testing.assert_close(model.text_head.state_dict()[key], value)
        logit_scale = json.loads((stage1 / artifacts.CONFIG).read_text())["logit_scale"]
        assert model.scale().item() == pytest.approx(logit_scale, rel=1e-5)
        from transformers import Dinov2Model

        backbone = Dinov2Model.from_pretrained(stage1 / artifacts.BACKBONE)
        for (name, a), b in zip(model.image_backbone.state_dict().items(), backbone.state_dict().values(),
                                strict=True):
            torch.testing.assert_close(a, b, msg=name)
    with pytest.raises(ConfigError, match="projection_dim"):
        build_model(_cfg(*data, f"model.init_from={stage1}", "model.projection_dim=32"))


def test_quality_script_collection_level(tmp_path):
    """The quality report's 'knows the collection only' row: a query's line ranks uniformly among its group."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "experiments" / "quality" / "run_quality.py"
    spec = importlib.util.spec_from_file_location("run_quality", script)
    run_quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_quality)
    manifest = tmp_path / "lines.jsonl"
    rows = [{"id": f"{g}{i}", "collection": g} for g, n in (("A", 3), ("B", 12)) for i in range(n)]
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    # By hand: group A (3 lines) finds its line within K with probability min(K, 3) / 3, group B min(K, 12) / 12.
    level = run_quality.group_level(manifest)
    assert level[1] == pytest.approx((3 * 1 / 3 + 12 * 1 / 12) / 15)
    assert level[5] == pytest.approx((3 * 1 + 12 * 5 / 12) / 15)
    assert level[10] == pytest.approx((3 * 1 + 12 * 10 / 12) / 15)
    manifest.write_text(json.dumps({"id": "x"}) + "\n")
    assert run_quality.group_level(manifest) is None
