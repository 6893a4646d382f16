"""Compose every group option and every experiment with Hydra's own API (no training)."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from lineclip.config import ConfigError, check_config, conf_dir, register_configs

register_configs()
CONF = conf_dir()
GROUPS = ["model", "text", "data", "preprocess", "optim", "loss", "trainer", "logger"]


def _compose(overrides=()):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def _options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_defaults_are_the_offline_demo():
    cfg = _compose()
    assert cfg.model.name == "dinov2_tiny" and cfg.model.name_or_path is None
    assert cfg.text.name == "byt5_tiny" and cfg.text.name_or_path is None
    assert cfg.data.name == "demo" and cfg.preprocess.pipeline == "bdrc" and cfg.logger.name == "wandb"
    assert Path(cfg.data.train_manifest).is_file() and Path(cfg.data.val_manifest).is_file()
    assert Path(cfg.data.dataset_dir).is_dir()
    check_config(cfg)


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_group_option_composes(group, option):
    cfg = _compose([f"{group}={option}"])
    node = OmegaConf.to_container(cfg[group], resolve=False)
    assert isinstance(node, dict) and node
    if "name" in cfg[group]:
        assert cfg[group].name == option


def test_every_experiment_has_a_test():
    assert set(_options("experiment")) == {"openpecha_bdrc_1gpu", "openpecha_bdrc_3gpu", "cpu_small",
                                           "stage1_synthetic", "stage2_real", "cpu_read", "cpu_read_real"}


def test_cpu_small_recipe_composes_and_checks():
    cfg = _compose(["experiment=cpu_small"])
    assert (cfg.preprocess.target_height, cfg.preprocess.patch_multiple) == (32, 8)
    assert cfg.model.config.patch_size == 8 and cfg.text.max_length == 128 and not cfg.data.crop_to_text
    check_config(cfg)  # on the bundled demo data it is ready to run


def test_cpu_read_stages_compose_with_the_collapse_remedies():
    read = _compose(["experiment=cpu_read"])
    assert (read.preprocess.pipeline, read.preprocess.target_height, read.model.config.patch_size) == ("none", 32, 8)
    assert list(read.preprocess.image_mean) == [1.0, 1.0, 1.0] and read.loss.reading_weight > 0
    assert read.loss.temperature == 0.2 and read.data.name == "openpecha"
    real = _compose(["experiment=cpu_read_real", "model.init_from=runs/read"])
    # stage 2 keeps stage 1's towers, heads and pixel normalisation; only the data side changes
    assert {**real.model, "init_from": None} == {**read.model} and real.text.config == read.text.config
    assert list(real.preprocess.image_std) == list(read.preprocess.image_std) and real.preprocess.pipeline == "bdrc"
    assert real.loss == read.loss and real.model.init_from == "runs/read"
    with pytest.raises(ConfigError, match="data.train_manifest"):
        check_config(read)


@pytest.mark.parametrize("experiment", ["openpecha_bdrc_1gpu", "openpecha_bdrc_3gpu", "stage1_synthetic",
                                        "stage2_real"])
def test_gpu_experiments_compose(experiment):
    cfg = _compose([f"experiment={experiment}"])
    assert cfg.model.name_or_path == "facebook/dinov2-base"
    assert cfg.text.name_or_path == "google/byt5-small"
    assert cfg.preprocess.pipeline == "bdrc" and cfg.trainer.mixed_precision == "bf16"
    with pytest.raises(ConfigError, match="data.train_manifest"):
        check_config(cfg)  # the presets need the user's manifests


def test_spec_models_select_by_group():
    cfg = _compose(["model=dinov2_base", "text=byt5_small"])
    assert cfg.model.name_or_path == "facebook/dinov2-base" and cfg.text.name_or_path == "google/byt5-small"
    assert cfg.model.projection_dim == 256


@pytest.mark.parametrize("override", ["optim.lrr=1e-4", "trainer.epoch=3", "data.batchsize=8"])
def test_misspelt_key_fails_at_composition(override):
    with pytest.raises(ConfigCompositionException):
        _compose([override])


@pytest.mark.parametrize("override", ["optim.lr=fast", "data.batch_size=big", "trainer.max_steps=1.5"])
def test_wrong_type_fails_at_composition(override):
    with pytest.raises(ConfigCompositionException):
        _compose([override])


@pytest.mark.parametrize(
    "overrides,field",
    [
        (["optim.lr=0"], "optim.lr"),
        (["optim.lr=-1e-4"], "optim.lr"),
        (["preprocess.pipeline=sharpen"], "preprocess.pipeline"),
        (["preprocess.target_height=64"], "preprocess.target_height"),
        (["trainer.mixed_precision=fp8"], "trainer.mixed_precision"),
        (["data.train_manifest=/nonexistent/lines.jsonl"], "data.train_manifest"),
        (["data.on_bad_row=ignore"], "data.on_bad_row"),
        (["data.batch_size=0"], "data.batch_size"),
        (["preprocess.width_buckets=[512,256]"], "preprocess.width_buckets"),
        (["preprocess.patch_multiple=7", "preprocess.target_height=56"], "patch"),
        (["loss.name=triplet"], "loss.name"),
        (["data.text_span.p=1.5"], "data.text_span.p"),
        (["data.text_span.min_syllables=4", "data.text_span.max_syllables=3"], "data.text_span"),
        (["data.text_span.min_syllables=0"], "data.text_span"),
        (["data.min_batch_size=0"], "data.min_batch_size"),
    ],
)
def test_semantic_checks_name_the_field(overrides, field):
    cfg = _compose(overrides)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        check_config(cfg)


def test_phrase_training_keys_default_off_and_compose():
    cfg = _compose()
    assert cfg.data.text_span.p == 0.0 and cfg.data.group_batches_by is None and cfg.data.min_batch_size == 2
    assert cfg.loss.name == "infonce"
    siglip = _compose(["loss=siglip", "data.text_span.p=0.3", "data.group_batches_by=page_id"])
    check_config(siglip)
    assert siglip.loss.name == "siglip" and siglip.loss.logit_bias == -10.0 and siglip.loss.temperature == 0.1
