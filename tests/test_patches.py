"""Patch geometry and the position table (lineclip/patches.py): strips tokenise a line as readers do, and every
from-scratch preset gives each token column of its widest line a position of its own."""

import logging
import math

import pytest
import torch
from transformers import Dinov2Config, Dinov2Model, T5Config, T5EncoderModel
from usage_support import compose_cfg

from lineclip.bundle import BundleRef, load_model
from lineclip.config import ConfigError, check_config
from lineclip.patches import (
    MIN_TRANSFORMERS_FOR_STRIPS,
    check_patch_geometry,
    patch_hw,
    position_grid,
    position_table_problem,
)
from lineclip.reading import VOCAB_SIZE
from lineclip.towers import DualEncoder

STRIP = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, patch_size=[32, 4],
             image_size=[32 * 64, 4 * 64])  # a 64 x 64 grid: 64 columns, lines up to 256 px
TINY_T5 = dict(vocab_size=384, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=1)


def test_patch_and_grid_arithmetic():
    assert patch_hw(14) == (14, 14) and patch_hw([32, 4]) == (32, 4) and patch_hw((32, 8)) == (32, 8)
    assert position_grid(32, 8) == (16, 4.0)  # the old dinov2_cpu: 4 x 4
    assert position_grid([4096, 512], [32, 4]) == (128 * 128, 128.0)
    positions, side = position_grid([100, 640], [32, 4])  # 3 x 160 = 480: not a square
    assert positions == 480 and side != int(side)


def test_position_table_problems_name_the_fix():
    # the old dinov2_cpu on cpu_read's lines: 4x4 grid, 32 columns -> a warning asking for a side >= 32
    message, fatal = position_table_problem(32, 8, 32, 256)
    assert not fatal and "4x4 grid" in message and "32 token columns" in message and ">= 32" in message
    message, fatal = position_table_problem([100, 640], [32, 4], 32, 640)
    assert fatal and "480 positions" in message
    assert position_table_problem(256, 8, 32, 256) is None  # 32 x 32 covers 32 columns
    assert position_table_problem([4096, 512], [32, 4], 32, 512) is None
    assert position_table_problem([4096, 512], [32, 4], 32, 516) is not None  # 129 columns > 128


def test_patch_geometry_checks():
    check_patch_geometry([32, 4], 32, 4, "p", "5.18.0")
    check_patch_geometry(8, 32, 8, "p", "4.40.0")  # square patches need no new transformers
    with pytest.raises(ValueError, match="patch_multiple=8 differs"):
        check_patch_geometry([32, 4], 32, 8, "p")
    with pytest.raises(ValueError, match="target_height=48 is not a multiple"):
        check_patch_geometry([32, 4], 48, 4, "p")
    with pytest.raises(ValueError, match=f"needs transformers >= {MIN_TRANSFORMERS_FOR_STRIPS}, installed 5.17.0"):
        check_patch_geometry([32, 4], 32, 4, "p", "5.17.0")
    check_patch_geometry([32, 4], 32, 4, "p", "5.18.0.dev0")


def _column_codes(config: dict, height: int, width: int) -> torch.Tensor:
    """The position codes transformers adds to each token column of a height x width line, averaged over rows."""
    embeddings = Dinov2Model(Dinov2Config(**config)).embeddings
    ph, pw = patch_hw(config["patch_size"])
    tokens = torch.zeros(1, 1 + (height // ph) * (width // pw), config["hidden_size"])
    codes = embeddings.interpolate_pos_encoding(tokens, height, width)[0, 1:]
    return codes.reshape(height // ph, width // pw, -1).mean(0)


def _effective_rank(codes: torch.Tensor) -> float:
    s = torch.linalg.svdvals(codes - codes.mean(0))
    p = s / s.sum()
    return math.exp(-(p * p.clamp_min(1e-12).log()).sum().item())


def test_a_covering_table_gives_each_column_its_own_position():
    torch.manual_seed(0)
    small = dict(STRIP, patch_size=8, image_size=32)  # the old dinov2_cpu table: 4 x 4, stretched to 32 columns
    old = _column_codes(small, 32, 256)
    torch.manual_seed(0)
    fixed = _column_codes(dict(small, image_size=256), 32, 256)  # 32 x 32: one column each
    torch.manual_seed(0)
    strips = _column_codes(STRIP, 32, 256)  # 64 strip columns from a 64 x 64 grid
    adjacent = {name: torch.nn.functional.cosine_similarity(c[1:], c[:-1]).mean().item()
                for name, c in (("old", old), ("fixed", fixed), ("strips", strips))}
    assert old.shape[0] == 32 and fixed.shape[0] == 32 and strips.shape[0] == 64
    assert adjacent["old"] > 0.9 and adjacent["fixed"] < 0.5 and adjacent["strips"] < 0.5
    assert _effective_rank(old) < 6 and _effective_rank(fixed) > 20 and _effective_rank(strips) > 25


def test_strip_tokens_read_one_row_and_round_trip_through_save_pretrained(tmp_path):
    model = DualEncoder(Dinov2Model(Dinov2Config(**STRIP)), T5EncoderModel(T5Config(**TINY_T5)), projection_dim=16,
                        reading_frames_per_column=2)
    pixels = torch.randn(3, 3, 32, 200)  # 50 strips of 4 px
    out = model.train()(pixel_values=pixels)
    assert out.reading_logits.shape == (3, 50 * 2, VOCAB_SIZE)
    hidden = model.image_backbone(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(out.reading_logits, model.reading_head(hidden[:, 1:], rows=1))
    # The Workbench's path: AutoModel-style from_pretrained of the saved dir, no custom code.
    model.eval()
    model.image_backbone.save_pretrained(tmp_path / "text_hierarchy_vit_backbone")
    model.text_encoder.save_pretrained(tmp_path / "text_hierarchy_clip_text_encoder")
    model.image_head.save(tmp_path / "text_hierarchy_projection_head.pt")
    model.text_head.save(tmp_path / "text_hierarchy_clip_text_projection_head.pt")
    loaded = load_model(BundleRef(tmp_path, ""), patch_multiple=4).eval()
    assert list(loaded.image_backbone.config.patch_size) == [32, 4]
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(pixels), model.encode_image(pixels))


FROM_SCRATCH = [[], ["experiment=cpu_small"], ["experiment=cpu_scratch"], ["experiment=cpu_read"],
                ["experiment=cpu_read_real"],
                ["experiment=cpu_reader"], ["model=dinov2_cpu_strip", "preprocess.target_height=32",
                                            "preprocess.patch_multiple=4", "preprocess.max_width=512",
                                            "preprocess.width_buckets=[256,512]"]]


@pytest.mark.parametrize("overrides", FROM_SCRATCH, ids=lambda o: " ".join(o) or "default")
def test_every_from_scratch_preset_covers_its_widest_line(overrides, tmp_path, caplog):
    manifest = tmp_path / "lines.jsonl"
    manifest.write_text("")
    cfg = compose_cfg(*overrides, f"data.train_manifest={manifest}", "data.val_manifest=null",
                      "data.dataset_dir=null")
    with caplog.at_level(logging.WARNING, logger="lineclip.config"):
        check_config(cfg)
    assert not [r for r in caplog.records if "position table" in r.getMessage()]
    ph, pw = patch_hw(cfg.model.config.patch_size)
    _, side = position_grid(cfg.model.config.image_size, cfg.model.config.patch_size)
    assert side >= cfg.preprocess.max_width // pw and pw == cfg.preprocess.patch_multiple


def test_an_uncovered_table_warns_and_a_non_square_one_is_refused(tmp_path, caplog):
    manifest = tmp_path / "lines.jsonl"
    manifest.write_text("")
    base = ["experiment=cpu_read", f"data.train_manifest={manifest}", "data.val_manifest=null", "data.dataset_dir=null"]
    with caplog.at_level(logging.WARNING, logger="lineclip.config"):
        check_config(compose_cfg(*base, "model.config.image_size=32"))
    assert any("4x4 grid" in r.getMessage() for r in caplog.records)
    with pytest.raises(ConfigError, match="not a square number"):
        check_config(compose_cfg(*base, "model.config.image_size=[32,64]"))
