"""Compose every group option and every experiment with Hydra's own API (no training)."""

import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from lineclip.config import ConfigError, TrainConfig, check_config, compose, conf_dir

CONF = conf_dir()
GROUPS = ["model", "text", "data", "preprocess", "optim", "loss", "logger"]
# The keys whose value IS the option's identity (what `group=option` chooses), not a default.
CHOICE_KEYS = {"name", "pipeline"}


def _compose(overrides=()):
    return compose("train", overrides)


def _options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_defaults_are_the_offline_demo_of_the_shipped_reader():
    cfg = _compose()
    # the demo trains the reader the package ships: its towers and weights, no download
    assert cfg.model.name == "cpu_reader" and cfg.model.name_or_path is None
    assert cfg.model.init_from == "lineclip:cpu_reader" and cfg.text.name == "byt5_cpu"
    assert cfg.text.name_or_path is None
    assert cfg.data.name == "demo" and cfg.preprocess.pipeline == "bdrc" and cfg.logger.name == "wandb"
    assert Path(cfg.data.train_manifest).is_file() and Path(cfg.data.val_manifest).is_file()
    assert Path(cfg.data.dataset_dir).is_dir()
    check_config(cfg)


def test_the_demo_sees_lines_as_the_reader_was_trained_to():
    """The demo's towers, pixels and reading loss are cpu_small's (the reader adapted to real lines), so the
    weights it loads mean what they meant in pretraining; another model= drops the reader's pixels with it."""
    demo, small = _compose(), _compose(["experiment=cpu_small"])
    assert demo.model == small.model and demo.text.config == small.text.config
    assert demo.preprocess == small.preprocess and demo.loss == small.loss
    hub = _compose(["model=dinov2_base", "text=byt5_small"])
    assert hub.model.init_from is None
    geometry = OmegaConf.to_container(_compose(["data=openpecha"]).preprocess)
    assert OmegaConf.to_container(hub.preprocess) == geometry | {"image_mean": [1.0, 1.0, 1.0],
                                                                 "image_std": [0.5, 0.5, 0.5]}  # the demo's paper
    assert hub.loss.reading_weight == 0 and hub.text.name == "byt5_small"
    assert _compose(["model=dinov2_base"]).text.name == "byt5_cpu"  # the demo's text tower stays
    # other data: none of the demo's choices
    real = _compose(["data=openpecha"])
    assert (real.model.name, real.text.name, real.model.init_from) == ("dinov2_tiny", "byt5_tiny", None)


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_group_option_composes(group, option):
    cfg = _compose([f"{group}={option}"])
    node = OmegaConf.to_container(cfg[group], resolve=False)
    assert isinstance(node, dict) and node
    if "name" in cfg[group]:
        assert cfg[group].name == option


def test_every_experiment_has_a_test():
    assert set(_options("experiment")) == {"openpecha_bdrc_1gpu", "openpecha_bdrc_3gpu", "cpu_small", "cpu_scratch",
                                           "stage1_synthetic", "stage2_real", "cpu_read", "cpu_read_real",
                                           "cpu_reader"}


def test_cpu_scratch_recipe_composes_and_checks():
    cfg = _compose(["experiment=cpu_scratch"])
    assert (cfg.preprocess.target_height, cfg.preprocess.patch_multiple) == (32, 8)
    assert cfg.model.config.patch_size == 8 and cfg.text.max_length == 128 and not cfg.data.crop_to_text
    assert cfg.model.init_from is None
    check_config(cfg)  # on the bundled demo data it is ready to run


def test_cpu_small_adapts_the_shipped_reader_to_any_manifest(tmp_path):
    small, reader = _compose(["experiment=cpu_small"]), _compose(["experiment=cpu_reader"])
    # the reader's towers, pixels, text length and reading loss: the weights it starts from fit and mean the same
    assert small.model.init_from == "lineclip:cpu_reader" and small.model.config == reader.model.config
    assert small.text == reader.text and small.preprocess == reader.preprocess
    # the same losses, the CTC weighted higher: adapting, the reader keeps reading while the embedding moves
    assert {**small.loss, "reading_weight": reader.loss.reading_weight} == reader.loss
    assert small.loss.reading_weight > reader.loss.reading_weight
    assert small.optim.lr < reader.optim.lr and small.model.backbone_lr_multiplier < 1
    # any manifest: no page grouping (cpu_read_real's), and the corpus is exported for search
    assert small.data.group_batches_by is None and small.trainer.export_embeddings
    manifest = tmp_path / "lines.jsonl"
    manifest.write_text("")
    check_config(_compose(["experiment=cpu_small", f"data.train_manifest={manifest}", "data.val_manifest=null",
                           "data.dataset_dir=null"]))


def test_cpu_read_stages_compose_with_the_collapse_remedies():
    read = _compose(["experiment=cpu_read"])
    assert (read.preprocess.pipeline, read.preprocess.target_height, read.model.config.patch_size) == ("none", 32, 8)
    assert list(read.preprocess.image_mean) == [1.0, 1.0, 1.0] and read.loss.reading_weight > 0
    assert read.loss.temperature == 0.2 and read.data.name == "openpecha"
    with pytest.raises(ConfigError, match="data.train_manifest"):
        check_config(read)
    # stage 2 starts from the shipped reader and keeps its towers, pixel normalisation and losses
    reader = _compose(["experiment=cpu_reader"])
    real = _compose(["experiment=cpu_read_real"])
    assert real.model.init_from == "lineclip:cpu_reader" and real.model.config == reader.model.config
    assert real.text == reader.text and real.loss == _compose(["experiment=cpu_small"]).loss
    assert real.preprocess == reader.preprocess
    assert real.data.group_batches_by == "page_id" and real.model.backbone_lr_multiplier < 1
    small = OmegaConf.to_container(_compose(["experiment=cpu_small"]))
    small["data"]["group_batches_by"] = "page_id"  # the one thing cpu_read_real adds to cpu_small (and its tags)
    small["logger"]["tags"] = list(real.logger.tags)
    assert small == OmegaConf.to_container(real)
    assert real.optim.lr < reader.optim.lr
    mine = _compose(["experiment=cpu_read_real", "model.init_from=runs/reader"])
    assert mine.model.init_from == "runs/reader"


def test_cpu_reader_pretraining_reads_strips_of_binarised_lines():
    read, reader = _compose(["experiment=cpu_read"]), _compose(["experiment=cpu_reader"])
    assert list(reader.model.config.patch_size) == [32, 4] and reader.preprocess.patch_multiple == 4
    assert reader.loss.reading_frames_per_column == 2 and reader.preprocess.pipeline == "bdrc"
    assert reader.text.max_length == 512 and reader.preprocess.max_width == 512
    # everything else of cpu_read's recipe: the collapse remedies, the optimiser, the text tower
    assert reader.loss.temperature == read.loss.temperature and reader.optim == read.optim
    assert list(reader.preprocess.image_mean) == list(read.preprocess.image_mean)
    assert reader.text.config == read.text.config


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
        (["preprocess.target_height=66"], "preprocess.target_height"),
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
        (["loss.text_bag_weight=-1"], "loss.text_bag_weight"),
        (["loss.bag_levels=[1,0]"], "loss.bag_levels"),
        (["loss.bag_levels=[]"], "loss.bag_levels"),
    ],
)
def test_semantic_checks_name_the_field(overrides, field):
    cfg = _compose(overrides)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        check_config(cfg)


def test_phrase_training_keys_default_off_and_compose():
    cfg = _compose(["data=openpecha"])
    assert cfg.data.text_span.p == 0.0 and cfg.data.group_batches_by is None and cfg.data.min_batch_size == 2
    assert _compose().data.text_span.p == 0.0  # the demo too: whole lines, as its reader was trained
    assert cfg.loss.name == "infonce"
    siglip = _compose(["loss=siglip", "data.text_span.p=0.3", "data.group_batches_by=page_id"])
    check_config(siglip)
    assert siglip.loss.name == "siglip" and siglip.loss.logit_bias == -10.0 and siglip.loss.temperature == 0.1


def _load(path) -> dict:
    """A YAML file as Hydra reads it (OmegaConf: `5e-4` is a float, not a string as in PyYAML)."""
    return OmegaConf.to_container(OmegaConf.load(path)) or {}


def _leaves(node: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in node.items():
        if isinstance(value, dict) and value and key != "config":  # model.config / text.config: one value
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_a_group_option_repeats_no_schema_default(group, option):
    """One home per default: the schema (lineclip/config.py). A group's YAML only sets what differs from it."""
    schema = OmegaConf.to_container(OmegaConf.structured(TrainConfig))[group]
    written = _load(CONF / group / f"{option}.yaml")
    repeated = {k: v for k, v in _leaves(written).items()
                if k not in CHOICE_KEYS and _leaves(schema).get(k, object()) == v}
    assert not repeated, f"{group}/{option}.yaml repeats schema defaults: {repeated}"


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_a_preset_sets_only_what_changes_the_composition(experiment):
    """Each value a preset writes must change the config it would compose to without that value."""
    written = _load(CONF / "experiment" / f"{experiment}.yaml")
    written.pop("defaults", None)
    # A stage-2 preset needs model.init_from from the command line, unless it names its own (cpu_read_real).
    init = [] if "init_from" in (written.get("model") or {}) else ["model.init_from=null"]
    with_preset = OmegaConf.to_container(_compose([f"experiment={experiment}", *init]))
    for dotted, value in _leaves(written).items():
        # The same preset with this one key set back to what its groups and parents would give.
        group_default = _leaves(with_preset)[dotted]
        assert group_default == value  # the preset's own value reached the composed config
        base = _compose_without(experiment, dotted)
        assert _leaves(base)[dotted] != value, f"experiment/{experiment}.yaml sets {dotted}={value}: already so"


def _compose_without(experiment: str, dotted: str) -> dict:
    """The composition of `experiment` with `dotted` removed from the preset (a temp copy of the config tree)."""
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tree = shutil.copytree(CONF, f"{tmp}/conf")
        path = f"{tree}/experiment/{experiment}.yaml"
        node = _load(path)
        *parents, leaf = dotted.split(".")
        parent = node
        for part in parents:
            parent = parent[part]
        del parent[leaf]
        with open(path, "w") as out:
            out.write("# @package _global_\n" + OmegaConf.to_yaml(node))
        from hydra import compose as hydra_compose
        from hydra import initialize_config_dir

        with initialize_config_dir(config_dir=tree, version_base="1.3"):
            cfg = hydra_compose(config_name="train", overrides=[f"experiment={experiment}"])
        return OmegaConf.to_container(cfg)


@pytest.mark.parametrize("command", ["evaluate", "index", "search", "synth", "serve"])
def test_a_command_yaml_holds_no_defaults(command):
    """evaluate/index/search/synth: the schema in the command's module holds every default; the YAML only the
    schema's name, Hydra's settings and the logging override."""
    written = _load(CONF / f"{command}.yaml")
    assert set(written) <= {"defaults", "hydra"}, set(written)
    assert compose(command, ["out_dir=/x"] if command == "synth" else []) is not None


def test_help_lists_hydra_groups_only_and_launch_configs_load_in_accelerate():
    """conf/ holds Hydra configs only: the accelerate launch configs live in launch/ and are valid there."""
    from accelerate.commands.config.config_args import load_config_from_file

    help_text = subprocess.run([sys.executable, "-m", "lineclip.train", "--help"], capture_output=True, text=True,
                               timeout=120).stdout
    groups = help_text.split("== Config groups (group=option) ==")[1].split("== Config (key=value")[0]
    assert "model: cpu_reader, dinov2_base, dinov2_cpu" in groups and "accelerate" not in groups
    launch = CONF.parent / "launch"
    configs = {p.stem: load_config_from_file(str(p)) for p in sorted(launch.glob("*.yaml"))}
    assert configs["cpu_2proc"].num_processes == 2 and configs["multi_node"].num_machines == 2
