"""What the commands that *use* a trained model share: their common options, one-line failures and
all-or-nothing writes.

`lineclip.evaluate`, `lineclip.index` and `lineclip.search` are Hydra entry points like `lineclip.train`, but
they leave nothing behind except their declared outputs: their primary configs set `hydra.run.dir: .`, no
`.hydra/` subdir and console-only logging (`conf/hydra/job_logging/lineclip_console.yaml`).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

log = logging.getLogger("lineclip")


class UsageError(ValueError):
    """A command-line option that cannot work; the message is one line naming it."""


@dataclass
class ModelArgs:
    """Options every using command has: which bundle, and how to run it."""

    # A finished run dir, a checkpoint bundle by prefix (run/checkpoint_step_0002400_) or any file of a bundle.
    run_dir: str | None = None
    device: str | None = None  # null: cuda when available, else cpu
    batch_size: int = 32
    num_workers: int = 0  # DataLoader workers decoding line images
    progress: bool = True


def check_manifest_args(cfg: DictConfig) -> None:
    from lineclip.manifest import ON_BAD_ROW_CHOICES

    if not cfg.manifest:
        raise UsageError("manifest=... is required (a JSONL line manifest)")
    if cfg.on_bad_row not in ON_BAD_ROW_CHOICES:
        raise UsageError(f"on_bad_row={cfg.on_bad_row!r} is not one of {', '.join(ON_BAD_ROW_CHOICES)}")
    if cfg.text_batch_size < 1:
        raise UsageError(f"text_batch_size must be >= 1, got {cfg.text_batch_size}")


def check_model_args(cfg: DictConfig) -> None:
    if not cfg.run_dir:
        raise UsageError("run_dir=... is required (a run dir, or a checkpoint bundle: run/checkpoint_step_0002400_)")
    if cfg.batch_size < 1 or cfg.num_workers < 0:
        raise UsageError(f"batch_size must be >= 1 and num_workers >= 0, got {cfg.batch_size} and {cfg.num_workers}")


def one_line_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean bad input, not a bug (for every command, training included): reported as one
    `log.error` line and exit status 2."""
    from lineclip.artifacts import OutputPathError
    from lineclip.bundle import BundleError
    from lineclip.checkpoint import CheckpointError, ResumeError, TrainingDiverged
    from lineclip.config import ConfigError
    from lineclip.corpus import CorpusError
    from lineclip.encoder import DeviceError, ImageReadError
    from lineclip.manifest import ManifestError

    return (UsageError, ConfigError, ManifestError, BundleError, ImageReadError, DeviceError, CorpusError,
            OutputPathError, CheckpointError, ResumeError, TrainingDiverged, OmegaConfBaseException)


def run_command(fn: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Run `fn(cfg)`; bad input or an I/O error ends the process with one error line and exit status 2, not a
    traceback."""
    try:
        return fn(cfg)
    except one_line_errors() as err:
        log.error("%s", " ".join(str(err).split()))
        sys.exit(2)
    except OSError as err:  # the environment (disk full, read-only dir, a file gone), not a bug
        log.error("%s", " ".join(f"{type(err).__name__}: {err}".split()))
        sys.exit(2)


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """A temporary path beside `target` that is renamed onto it only when the block succeeds, so a failed or
    killed command never leaves a half-written output (and never clobbers an older good one)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp: its 0600 mode would stick to a report meant to be shared; the pid keeps runs apart.
    tmp = target.parent / f".{target.name}.{os.getpid()}.tmp"
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(target: str | Path, text: str) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)
