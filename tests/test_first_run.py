"""The first hour of a new user: the demo run's defaults, `--help`, command-line mistakes, the dataset layout,
progress in a log. (The launch config that really starts two processes: tests/test_distributed.py.)"""

import contextlib
import importlib
import io
import json
import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from lineclip.cli import Progress, UsageError, split_value, unknown_option
from lineclip.config import ConfigError, asset_dir, check_config, command_line_keys, compose, manifests_from_layout

COMMANDS = ["train", "evaluate", "index", "search", "serve", "synth", "shard"]
TRAINING_GROUPS = ["data", "experiment", "hparams_search", "logger", "loss", "model", "optim", "preprocess", "text"]


def run_main(command: str, *args: str) -> tuple[int, str, str]:
    """`python -m lineclip.<command> args...` in this process: exit status, stdout, stderr."""
    module = importlib.import_module(f"lineclip.{command}")
    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = [f"lineclip/{command}.py", *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            module.main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("command", COMMANDS)
def test_help_says_what_the_command_does_and_lists_only_its_own_options(command):
    code, out, _ = run_main(command, "--help")
    assert code == 0
    assert "powered by Hydra" not in out
    first = out.splitlines()[0]
    docstring = importlib.import_module(f"lineclip.{command}").__doc__
    # the header is the module docstring's own description, and the usage line names the command
    assert first.startswith(f"lineclip.{command}: ") and first[len(f"lineclip.{command}: "):][:20].lower() in \
        " ".join(docstring.split()).lower()
    assert f"Usage: python -m lineclip.{command}" in out
    listed = [line.split(":")[0] for line in out.splitlines() if line.split(":")[0] in TRAINING_GROUPS]
    if command == "train":
        assert "== Config groups" in out and sorted(set(listed)) == TRAINING_GROUPS
        assert "data: demo, openpecha" in out
    else:
        assert "== Config groups" not in out and not listed  # training's groups are not this command's
        assert "run_dir: null" in out or command in ("synth", "shard")


def test_a_training_group_given_to_evaluate_is_one_line_without_the_plus_hint():
    code, _, err = run_main("evaluate", "run_dir=R", "manifest=M", "model=dinov2_base")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "no option 'model'" in err and "run_dir=" in err and "+model" not in err
    assert "Could not override" not in err
    # the same check, directly: nested keys of the schema, free dicts, explicit appends, hydra.*
    assert "no option 'eval.gallery'" in unknown_option("evaluate", ["eval.gallery=page_id"])
    assert unknown_option("evaluate", ["eval.gallery_by=page_id", "hydra.run.dir=x", "+extra=1"]) is None
    assert "no option 'optim.lrr'" in unknown_option("train", ["optim.lrr=1e-4"])
    assert unknown_option("train", ["model=dinov2_base", "experiment=cpu_small", "model.config.hidden_size=8"]) is None


@pytest.mark.parametrize("args,expected", [
    (["run_dir=R", "query=སངས་རྒྱས།", "ཆོས།"], "query='སངས་རྒྱས། ཆོས།'"),
    (["run_dir=R", "query_wylie=bkra", "shis", "top_k=3"], "query_wylie='bkra shis'"),
])
def test_a_value_split_by_the_shell_says_quote_it(args, expected):
    code, _, err = run_main("search", *args)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "quote" in err and expected in err
    assert "LexerNoViableAltException" not in err and "missing EQUAL" not in err


def test_flags_and_their_values_are_not_split_values():
    assert split_value(["--cfg", "job", "-m", "optim.lr=1e-4,5e-5", "--info", "defaults", "~logger"]) is None
    assert "hydra.run.dir='runs/my run'" in split_value(["hydra.run.dir=runs/my", "run"])


def test_cli_search_refuses_a_query_without_tibetan_script_as_the_page_does(compose_cfg):
    from lineclip.search import query_text

    with pytest.raises(UsageError, match="no Tibetan script.*query_wylie"):
        query_text(compose_cfg("run_dir=R", "query=hello", config_name="search"))
    assert query_text(compose_cfg("run_dir=R", "query='བཀྲ་ཤིས'", config_name="search")) == ("བཀྲ་ཤིས", None)


def test_dataset_dir_in_the_documented_layout_is_enough(compose_cfg, tmp_path):
    demo = asset_dir("demo")
    for split in ("train", "eval"):
        (tmp_path / split / "meta").mkdir(parents=True)
        rows = (demo / split / "meta" / "lines.jsonl").read_text()
        (tmp_path / split / "meta" / "lines.jsonl").write_text(rows)
        os.symlink(demo / split / "lines", tmp_path / split / "lines")
    cfg = compose_cfg("data=openpecha", f"data.dataset_dir={tmp_path}")
    with pytest.raises(ConfigError, match="data.dataset_dir=D holding D/train/meta/lines.jsonl"):
        check_config(compose_cfg("data=openpecha"))
    assert manifests_from_layout(cfg) == {"data.train_manifest": str(tmp_path / "train/meta/lines.jsonl"),
                                          "data.val_manifest": str(tmp_path / "eval/meta/lines.jsonl")}
    check_config(cfg)
    # an explicit manifest is never replaced
    given = compose_cfg("data=openpecha", f"data.dataset_dir={tmp_path}", f"data.val_manifest={tmp_path}/x.jsonl")
    assert list(manifests_from_layout(given)) == ["data.train_manifest"]
    assert given.data.val_manifest == f"{tmp_path}/x.jsonl"


def test_a_manifest_set_to_null_on_the_command_line_is_not_filled_from_the_layout(compose_cfg):
    """`data.val_manifest=null` (issue 25's command) means no validation, even where the layout has an eval split."""
    from hydra.core.hydra_config import HydraConfig

    demo = asset_dir("demo")
    overrides = ["data=openpecha", f"data.dataset_dir={demo}", "data.val_manifest=null"]
    HydraConfig.instance().set_config(compose("train", overrides, return_hydra_config=True))
    try:
        given = command_line_keys()
    finally:
        HydraConfig.instance().cfg = None
    assert given == {"data", "data.dataset_dir", "data.val_manifest"} and command_line_keys() == set()
    cfg = compose_cfg(*overrides)
    assert manifests_from_layout(cfg, given) == {"data.train_manifest": str(demo / "train/meta/lines.jsonl")}
    assert cfg.data.val_manifest is None
    # not given: filled as before
    filled = manifests_from_layout(compose_cfg(*overrides[:2]))
    assert filled["data.val_manifest"] == str(demo / "eval/meta/lines.jsonl")


def test_the_quickstart_reading_command_trains_the_shipped_reader_on_the_demo(compose_cfg):
    """The README's second Quickstart command, as written there: cpu_small from the reader on the bundled demo."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("The laptop recipe for your own lines")[1].split("```bash\n")[1].split("```")[0]
    argv = shlex.split(block.replace("\\\n", " "))
    assert argv[:4] == ["python", "-m", "lineclip.train", "experiment=cpu_small"]
    cfg = compose_cfg(*argv[3:])
    demo = asset_dir("demo")
    assert manifests_from_layout(cfg) == {"data.train_manifest": str(demo / "train/meta/lines.jsonl"),
                                          "data.val_manifest": str(demo / "eval/meta/lines.jsonl")}
    check_config(cfg)
    assert cfg.model.init_from == "lineclip:cpu_reader" and cfg.trainer.export_embeddings


def test_the_demo_defaults_cause_no_warning(compose_cfg):
    """What made the demo warn: every text cut at 256 bytes, a warmup longer than the run, one validation only,
    the random towers' collapse (tiny towers chosen on the command line keep the remedies). Checked against the
    demo data itself."""
    cfg = compose_cfg()
    for split in ("train", "eval"):
        rows = (asset_dir("demo") / split / "meta" / "lines.jsonl").read_text().splitlines()
        longest = max(len(json.loads(row)["text"].encode("utf-8")) for row in rows)
        assert longest + 1 <= cfg.text.max_length  # + </s>: no transcription is cut (train, validation, search)
    n_train = len((asset_dir("demo") / "train" / "meta" / "lines.jsonl").read_text().splitlines())
    min_steps = cfg.trainer.epochs * (n_train // cfg.data.batch_size)
    assert cfg.optim.warmup_steps < min_steps
    assert 2 * cfg.trainer.eval_every_steps <= min_steps  # validated more than once: W&B draws curves
    # the demo trains the shipped reader, its image tower at a third of the lr; random towers chosen instead get
    # the collapse remedies of conf/experiment/cpu_read.yaml, and none of it outside the demo
    assert cfg.model.init_from == "lineclip:cpu_reader" and cfg.model.backbone_lr_multiplier == 0.3
    tiny = compose_cfg("model=dinov2_tiny", "text=byt5_tiny")
    for demo in (cfg, tiny):
        assert list(demo.preprocess.image_mean) == [1.0, 1.0, 1.0] and demo.loss.temperature == 0.2
    assert tiny.model.init_from is None
    real = compose_cfg("data=openpecha")
    assert real.text.max_length == 256 and real.optim.warmup_steps == 1000 and real.preprocess.image_mean is None


def test_progress_in_a_log_is_a_line_every_tenth_with_the_time_to_go(caplog):
    logger = logging.getLogger("lineclip.test_progress")
    with caplog.at_level(logging.INFO, logger=logger.name):
        # under pytest stderr is no terminal: no bar, log lines instead
        with Progress(50, desc="train", unit="step", first_at=3, logger=logger) as bar:
            assert bar.bar.disable
            for _ in range(50):
                bar.update(1)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("train: 3/50 steps (6%)") and "to go" in lines[0]
    assert [line.split()[1] for line in lines[1:]] == [f"{k}/50" for k in range(5, 51, 5)]
    assert "to go" not in lines[-1]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=logger.name), Progress(50, desc="x", unit="step", enabled=False,
                                                                        first_at=3, logger=logger) as bar:
        bar.update(50)
    assert not caplog.records


@pytest.mark.slow
def test_the_quickstart_demo_run_prints_its_run_dir_and_no_warning(tmp_path):
    """`python -m lineclip.train`, as a new user runs it: no W&B credentials, nothing overridden but the dir;
    it ends with a model that finds lines."""
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), NETRC=str(tmp_path / "no_netrc"), WANDB_SILENT="true",
               PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    proc = subprocess.run([sys.executable, "-m", "lineclip.train", f"hydra.run.dir={run}"], capture_output=True,
                          text=True, timeout=1800, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = proc.stdout + proc.stderr
    log_file = (run / "train.log").read_text()
    assert "WARNING" not in logged and "WARNING" not in log_file, [
        line for line in logged.splitlines() if "WARNING" in line]
    assert f"run dir: {run.resolve()}" in log_file and f"are in {run.resolve()}" in log_file
    assert "logging offline" in log_file  # said once, as information
    assert "to go" in log_file  # the ETA after the first logged steps
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    validations = [r for r in rows if "val_t2i_r1" in r]
    assert len(validations) >= 2
    # it adapts the reader the package ships, so its search finds real matches: among the 40 eval lines the typed
    # line is in the top 10 at least twice as often as chance (10/40), and the reading head reads
    assert validations[-1]["val_t2i_r10"] >= 0.5 and validations[-1]["val_cer"] < 0.8


def test_console_scripts_are_the_commands_and_complete_with_hydra(monkeypatch):
    import tomllib

    scripts = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"][
        "scripts"]
    assert scripts == {f"lineclip-{c}": f"lineclip.{c}:main" for c in COMMANDS}
    # Hydra's bash completion asks the installed executable itself: `lineclip-train -sc query=bash`
    monkeypatch.setenv("COMP_LINE", "lineclip-train model=dinov2_")
    monkeypatch.setenv("COMP_POINT", "29")
    module = importlib.import_module("lineclip.train")
    out = io.StringIO()
    monkeypatch.setattr(sys, "argv", ["lineclip-train", "-sc", "query=bash"])
    with contextlib.redirect_stdout(out):
        module.main()
    assert "model=dinov2_base" in out.getvalue().split() and "model=dinov2_tiny" in out.getvalue().split()


def test_a_sweep_run_is_named_with_its_lr_and_batch(compose_cfg):
    from lineclip.tracking import sweep_run_name

    cfg = compose_cfg("optim.lr=5e-5", "data.batch_size=32")
    assert sweep_run_name("10-21-42/3", cfg) == "10-21-42/3 lr=5e-05 batch=32"
