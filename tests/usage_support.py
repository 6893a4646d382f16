"""A tiny run trained (through the real CLI) to memorise 8 lines, shared by test_encoder/test_evaluate/test_search.

The 8 lines are the bundled demo's first train lines cropped to their first 250 px (about their first 20
characters), with their transcriptions cut to the first 20 characters without spaces: 60 bytes each, all
Tibetan. So every line falls into one width bucket and one text length (however the trainer groups batches),
each training step is one batch of all 8, and 60 steps memorise them in ~10 s on two idle CPU cores.

The run is trained once per pytest session and cached under the session's base temp dir, so every module
that asks for it gets the same one; tests must not modify it (copy it to change it).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from lineclip.config import asset_dir

N_TRAIN = 8
CROP_WIDTH = 250
# The tiny random towers: for tests of mechanics on the bundled demo, whose default is the shipped reader
TINY = ("model=dinov2_tiny", "text=byt5_tiny")
TRAIN_OVERRIDES = ("optim.lr=1e-3", "optim.warmup_steps=5", "trainer.max_steps=60", "data.batch_size=8",
                   "text.max_length=64", "trainer.checkpoint_every_steps=30", "logger=none")


def _demo_rows(split: str) -> list[dict]:
    return [json.loads(x) for x in (asset_dir("demo") / split / "meta" / "lines.jsonl").read_text().splitlines()]


def _write_split(root: Path, split: str, rows: list[dict]) -> Path:
    (root / split / "meta").mkdir(parents=True, exist_ok=True)
    (root / split / "lines").mkdir(exist_ok=True)
    for row in rows:
        target = root / split / "lines" / Path(row["line_path"]).name
        if not target.exists():
            with Image.open(asset_dir("demo") / row["line_path"]) as image:
                image.crop((0, 0, CROP_WIDTH, image.height)).save(target, quality=90)
        row["line_path"] = f"{split}/lines/{target.name}"
    manifest = root / split / "meta" / "lines.jsonl"
    manifest.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    return manifest


def make_dataset(root: Path) -> dict[str, Path]:
    """OpenPecha layout: `train` (8 lines, distinct texts) and `eval` = those 8 lines + 4 demo eval lines, two of
    which copy the texts of train lines 0 and 1 and two of which share one text with each other."""
    train_rows = _demo_rows("train")[:N_TRAIN]
    for row in train_rows:
        row["text"] = "".join(ch for ch in row["text"] if not ch.isspace())[:20]
        assert len(row["text"].encode("utf-8")) == 60, row["text"]  # below text.max_length=64: never truncated
    train = _write_split(root, "train", [dict(r) for r in train_rows])
    extra = [dict(r) for r in _demo_rows("eval")[:4]]
    extra[0]["text"], extra[1]["text"] = train_rows[0]["text"], train_rows[1]["text"]
    extra[3]["text"] = extra[2]["text"]
    evaluation = _write_split(root, "eval", [dict(r) for r in train_rows] + extra)
    return {"root": root, "train": train, "eval": evaluation}


def train_run(out: Path, dataset: Path, manifest: Path, *overrides: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "lineclip.train", "data=openpecha", f"data.dataset_dir={dataset}",
            f"data.train_manifest={manifest}", f"data.val_manifest={manifest}", "data.num_workers=0",
            "trainer.progress_bar=false", *TRAIN_OVERRIDES, f"hydra.run.dir={out}", *overrides]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "WANDB_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def overfit_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    """(run dir, dataset paths), trained on first use in this session."""
    base = tmp_path_factory.getbasetemp() / "lineclip_overfit"
    dataset = make_dataset(base / "data")
    run = base / "run"
    if not (run / "training_config.json").exists():
        train_run(run, dataset["root"], dataset["train"])
    metrics = json.loads((run / "training_config.json").read_text())["val_metrics"]
    # Everything downstream (own text retrieves own line) relies on the run having memorised its 8 lines.
    assert metrics["val_i2t_r1"] == 1.0 and metrics["val_t2i_r1"] == 1.0, metrics
    return run, dataset


def snapshot(directory: Path) -> set[str]:
    """Every path under a dir (hidden ones too): a command that fails must leave this unchanged."""
    return {str(p.relative_to(directory)) for p in directory.rglob("*")}


def run_cli(module: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m lineclip.<module> args...` as a user runs it."""
    return subprocess.run([sys.executable, "-m", f"lineclip.{module}", *args, "progress=false"], capture_output=True,
                          text=True, timeout=300, cwd=cwd)


def compose_cfg(*overrides: str, config_name: str = "train") -> Any:
    """A config of conf/ (training's by default), composed with overrides as Hydra's command line does: the one
    place tests compose a config (also the `compose_cfg` fixture of conftest.py)."""
    from lineclip.cli import quote_overrides
    from lineclip.config import compose
    from lineclip.search import QUERY_KEYS

    # quoted as the command line quotes them: `query=ཀ` is what a user types
    return compose(config_name, quote_overrides(overrides, QUERY_KEYS if config_name == "search" else ()))


def compose_config(config_name: str, overrides: list[str]) -> Any:
    """A command's config, composed from conf/ with overrides as Hydra's command line does."""
    return compose_cfg(*overrides, "progress=false", config_name=config_name)


def run_capturing_errors(fn: Callable[[Any], Any], cfg: Any) -> tuple[int, list[str]]:
    """Run a command's function on a composed config through the CLI's own error handler: (exit status, the
    error lines logged under `lineclip`)."""
    from lineclip.cli import run_command

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("lineclip")
    logger.addHandler(handler)
    try:
        run_command(fn, cfg)
        status = 0
    except SystemExit as exit_:
        status = int(exit_.code or 0)
    finally:
        logger.removeHandler(handler)
    return status, [r.getMessage() for r in records]


def run_in_process(fn: Callable[[Any], Any], config_name: str, overrides: list[str]) -> tuple[int, str]:
    """Compose a command's config as Hydra does and run it through the CLI's own error handler (much faster than
    a subprocess). Returns (exit status, the error line); fails unless exactly one error line was logged."""

    status, messages = run_capturing_errors(fn, compose_config(config_name, overrides))
    assert len(messages) == 1 and "\n" not in messages[0], messages
    return status, messages[0]
