"""Towers build offline, round-trip through save_pretrained/from_pretrained (the hub path with a local dir),
the heads keep the Workbench format. (Optimizer groups and schedule: test_trainer.py.)"""

import pytest
import torch
from transformers import ByT5Tokenizer, Dinov2Config, Dinov2Model, T5Config, T5EncoderModel
from usage_support import compose_cfg

from lineclip.config import register_configs
from lineclip.reading import VOCAB_SIZE
from lineclip.towers import (
    DualEncoder,
    ProjectionHead,
    build_image_backbone,
    build_image_processor,
    build_text_encoder,
    build_tokenizer,
    head_hidden_dim,
    masked_mean,
)
from lineclip.trainer import build_model

register_configs()
TINY_VIT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, patch_size=14)
TINY_T5 = dict(vocab_size=384, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=1)


def _cfg(overrides=()):
    return compose_cfg(*overrides)


def test_pretrained_path_loads_a_local_save_pretrained_dir(tmp_path):
    vit = Dinov2Model(Dinov2Config(**TINY_VIT))
    t5 = T5EncoderModel(T5Config(**TINY_T5, is_encoder_decoder=False))
    vit.save_pretrained(tmp_path / "vit")
    t5.save_pretrained(tmp_path / "t5")
    ByT5Tokenizer().save_pretrained(tmp_path / "t5")
    loaded_vit = build_image_backbone(str(tmp_path / "vit"), {})
    loaded_t5 = build_text_encoder(str(tmp_path / "t5"), {})
    for a, b in ((vit, loaded_vit), (t5, loaded_t5)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert isinstance(build_tokenizer(str(tmp_path / "t5")), ByT5Tokenizer)
    # a backbone dir without preprocessor_config.json falls back to ImageNet statistics
    processor = build_image_processor(str(tmp_path / "vit"), 56)
    assert list(processor.image_mean) == [0.485, 0.456, 0.406] and list(processor.image_std) == [0.229, 0.224, 0.225]


def test_the_whole_run_config_builds_from_local_dirs(tmp_path):
    Dinov2Model(Dinov2Config(**TINY_VIT)).save_pretrained(tmp_path / "vit")
    T5EncoderModel(T5Config(**TINY_T5, is_encoder_decoder=False)).save_pretrained(tmp_path / "t5")
    ByT5Tokenizer().save_pretrained(tmp_path / "t5")
    cfg = _cfg(["model=dinov2_base", "text=byt5_small", f"model.name_or_path={tmp_path / 'vit'}",
                f"text.name_or_path={tmp_path / 't5'}"])
    model, _, tokenizer = build_model(cfg)
    assert model.image_backbone.config.hidden_size == 32 and model.text_encoder.config.d_model == 32
    assert model.image_head.output_dim == cfg.model.projection_dim


def test_projection_head_is_the_workbench_format(tmp_path):
    head = ProjectionHead(768, 256)
    assert head.net[0].out_features == head_hidden_dim(768, 256) == 512
    assert head_hidden_dim(64, 8) == 32 and head_hidden_dim(1536, 256) == 768
    head.save(tmp_path / "h.pt")
    blob = torch.load(tmp_path / "h.pt", weights_only=True)
    assert set(blob) == {"state_dict", "input_dim", "output_dim"}
    assert set(blob["state_dict"]) == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}
    again = ProjectionHead.load(tmp_path / "h.pt")
    x = torch.randn(3, 768)
    torch.testing.assert_close(again(x), head(x))


def test_dual_encoder_outputs_and_frozen_mask_token():
    model = DualEncoder(Dinov2Model(Dinov2Config(**TINY_VIT)), T5EncoderModel(T5Config(**TINY_T5)), projection_dim=16)
    assert not model.image_backbone.embeddings.mask_token.requires_grad
    ids = torch.tensor([[10, 11, 12, 1], [20, 1, 0, 0]])
    out = model(pixel_values=torch.randn(2, 3, 28, 56), input_ids=ids, attention_mask=(ids > 0).long())
    assert out.image.shape == out.text.shape == (2, 16)
    torch.testing.assert_close(out.image.norm(dim=-1), torch.ones(2))
    assert out.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
    fixed = DualEncoder(Dinov2Model(Dinov2Config(**TINY_VIT)), T5EncoderModel(T5Config(**TINY_T5)),
                        temperature=0.1, learnable_temperature=False)
    assert not fixed.logit_scale.requires_grad and fixed.scale().item() == pytest.approx(10.0)
    capped = DualEncoder(Dinov2Model(Dinov2Config(**TINY_VIT)), T5EncoderModel(T5Config(**TINY_T5)),
                         temperature=0.001)
    assert capped.scale().item() == pytest.approx(100.0)


def test_reading_heads_exist_in_training_only_and_read_the_columns():
    text = T5EncoderModel(T5Config(**{**TINY_T5, "dropout_rate": 0.0}))  # train mode, same numbers twice
    model = DualEncoder(Dinov2Model(Dinov2Config(**TINY_VIT)), text, projection_dim=16,
                        reading_frames_per_column=3, reading_bag=True, text_bag=True, bag_parts=3)
    pixels = torch.randn(2, 3, 28, 70)  # 2 x 5 patches of 14 px
    ids, mask = torch.randint(3, 259, (2, 6)), torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    out = model.train()(pixel_values=pixels, input_ids=ids, attention_mask=mask)
    assert out.reading_logits.shape == (2, 5 * 3, VOCAB_SIZE) and out.bag_logits.shape == (2, 3 * VOCAB_SIZE)
    # the text bag is read from what the text embedding is made of: the tower's masked mean
    text_hidden = model.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out.text_bag_logits, model.text_bag_head(masked_mean(text_hidden, mask)))
    hidden = model.image_backbone(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(out.reading_logits, model.reading_head(hidden[:, 1:], rows=2))
    evaluated = model.eval()(pixel_values=pixels, input_ids=ids, attention_mask=mask)
    assert evaluated.reading_logits is None and evaluated.bag_logits is None and evaluated.text_bag_logits is None
    torch.testing.assert_close(evaluated.image, model.encode_image(pixels))


def test_masked_mean_ignores_padding():
    hidden = torch.tensor([[[1.0], [3.0], [100.0]]])
    assert masked_mean(hidden, torch.tensor([[1, 1, 0]])).item() == 2.0


def test_init_from_says_which_chosen_tower_config_it_does_not_use(caplog):
    """The demo starts from the shipped reader: its towers are the bundle's, so a text= chosen beside it is not
    what trains, and one warning says so; the demo's own choice (text=byt5_cpu) is the reader's and says nothing."""
    with caplog.at_level("WARNING", logger="lineclip.trainer"):
        model, _, _ = build_model(_cfg())
    assert not caplog.records
    with caplog.at_level("WARNING", logger="lineclip.trainer"):
        model, _, _ = build_model(_cfg(["text=byt5_tiny"]))
    assert model.text_encoder.config.d_model == 128  # the reader's tower, not byt5_tiny's 64
    [record] = caplog.records
    assert "text.config" in record.getMessage() and "d_model=64 (128)" in record.getMessage()
    assert "model.config" not in record.getMessage()
