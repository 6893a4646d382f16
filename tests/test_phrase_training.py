"""Phrase training in the trainer's step functions: TrainTexts positives and the sigmoid loss, with and
without gradient caching (one process; tests/test_distributed.py covers gathering across two)."""

import pytest
import torch
from accelerate import Accelerator
from usage_support import compose_cfg

from lineclip.batch import LineCollator, LineDataset, TrainTexts
from lineclip.config import asset_dir, register_configs
from lineclip.loss import contrastive_loss, sigmoid_loss
from lineclip.manifest import read_manifest
from lineclip.preprocess import LineGeometry, LineImageTransform
from lineclip.trainer import build_model, grad_cache_step, train_step

register_configs()


def _setup(loss: str, n_micro: int = 3, per: int = 4):
    cfg = compose_cfg(f"loss={loss}")
    torch.manual_seed(0)
    model, _, _ = build_model(cfg)
    model.eval()  # no dropout: both computations see the same function
    demo = asset_dir("demo")
    records, _ = read_manifest(demo / "train" / "meta" / "lines.jsonl", demo)
    dataset = LineDataset(records, LineImageTransform("bdrc", LineGeometry()))
    rows = [i for i in range(len(dataset)) if dataset.buckets[i] == 1036][: n_micro * per]
    lines = [r.text for r in records]
    # line rows[1] also carries all of line rows[0]: every phrase of rows[0] is a positive of rows[1] too
    lines[rows[1]] = f"{lines[rows[1]]} {lines[rows[0]]}"
    texts = TrainTexts(lines, p=1.0, min_syllables=2, max_syllables=4, seed=3)
    collate = LineCollator(128)
    batches = [texts.encode(collate([dataset[i] for i in rows[k * per:(k + 1) * per]]), 128)
               for k in range(n_micro)]
    return model, batches, texts, rows


def test_siglip_grad_cache_equals_one_big_batch_with_phrase_positives():
    model, batches, texts, rows = _setup("siglip")
    assert model.logit_bias is not None and model.logit_bias.item() == -10.0
    indices = torch.cat([b["indices"] for b in batches])
    positives = texts.positives(indices)
    assert positives[1, 0] and not positives[0, 1]  # the phrase of line 0 occurs in line 1, not vice versa
    assert positives.diagonal().all()

    outs = [model(pixel_values=b["pixel_values"], input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            for b in batches]
    ref = sigmoid_loss(torch.cat([o.image for o in outs]), torch.cat([o.text for o in outs]), positives,
                       outs[0].logit_scale, outs[0].logit_bias)
    ref.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    cached = grad_cache_step(Accelerator(cpu=True), model, batches, texts, gather=False)
    assert cached.loss.item() == pytest.approx(ref.loss.item(), rel=1e-6)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys() and {"logit_scale", "logit_bias"} <= grads.keys()
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, atol=1e-6, rtol=1e-4, msg=name)


def test_train_step_takes_positives_from_train_texts():
    model, batches, texts, _ = _setup("infonce", n_micro=1, per=6)
    assert model.logit_bias is None
    (batch,) = batches
    out = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"])
    positives = texts.positives(batch["indices"])
    expected = contrastive_loss(out.image, out.text, positives, out.logit_scale)
    diagonal_only = contrastive_loss(out.image, out.text, torch.eye(6, dtype=torch.bool), out.logit_scale)
    result = train_step(Accelerator(cpu=True), model, batches, texts, gather=False, grad_cache=False)
    assert result.loss.item() == pytest.approx(expected.loss.item(), rel=1e-6)
    assert result.loss.item() != pytest.approx(diagonal_only.loss.item(), rel=1e-6)


def test_group_batches_by_a_field_no_line_has_is_a_config_error(tmp_path):
    from lineclip.config import ConfigError
    from lineclip.trainer import train

    cfg = compose_cfg(f"output_dir={tmp_path}", "logger=none", "data.num_workers=0", "data.group_batches_by=shelf_mark")
    with pytest.raises(ConfigError, match="data.group_batches_by=shelf_mark"):
        train(cfg)
