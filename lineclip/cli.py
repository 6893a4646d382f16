"""What the commands that *use* a trained model share: their common options, one-line failures and
all-or-nothing writes.

`lineclip.evaluate`, `lineclip.index` and `lineclip.search` are Hydra entry points like `lineclip.train`, but
they leave nothing behind except their declared outputs: their primary configs set `hydra.run.dir: .`, no
`.hydra/` subdir and console-only logging (`conf/hydra/job_logging/lineclip_console.yaml`).

Every command's entry point is `@hydra_command(config_name, free_text=...)`: Hydra's own `@hydra.main`, after the
command line's overrides have been made readable to Hydra's override grammar (`quote_overrides`), so that a query is
typed as a person types it: `query=བཀྲ་ཤིས་བདེ་ལེགས`, `query='སངས་རྒྱས། ཆོས།'`, `query_wylie="'jam dpal"`.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
from collections.abc import Callable, Collection, Iterator, Sequence
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


# ------------------------------------------------------------------------------------ the command line

# `key=value`, `+key=value`, `++key=value` (Hydra's override forms that set a value; `~key` deletes one).
_OVERRIDE = re.compile(r"(?P<prefix>\+{0,2})(?P<key>[A-Za-z_][\w.\-/@]*)=(?P<value>.*)", re.DOTALL)
# What makes a value a list, dict, sweep or function call in Hydra's grammar: such a value is never quoted
# unless its key is free text, so `a=[x,y]` and `-m lr=1,2` keep their meaning.
_STRUCTURE = set("[]{}(),'\"\\")


@functools.lru_cache(maxsize=1)
def _override_parser() -> Any:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create()


def _parses(override: str) -> Any:
    """The override's value as Hydra reads it, or None when Hydra's lexer or parser rejects it."""
    from hydra.errors import HydraException

    try:
        return _override_parser().parse_override(override)
    except HydraException:
        return None


def hydra_quote(text: str) -> str:
    """`text` as one single-quoted Hydra value that reads back as exactly `text`: in Hydra's quoted strings a
    quote is escaped with a backslash, and so are the backslashes just before a quote or the closing quote;
    `${` is escaped for OmegaConf, so free text is never taken for an interpolation."""
    # OmegaConf first: `\${` is a literal `${`, and backslashes before it are doubled (`\\${`: `\` + `${`).
    escaped = re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", text)
    escaped = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", escaped)
    escaped = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, escaped)
    return f"'{escaped}'"


def quote_overrides(args: Sequence[str], free_text: Collection[str] = ()) -> list[str]:
    """The command-line arguments with the values Hydra would misread quoted, everything else unchanged.

    - A free-text key's value (`query=...`) is always taken literally: quoted, unless it already is one quoted
      Hydra string (`'query="..."'`, the form Hydra itself needs) or the word null. So spaces, shad, commas,
      brackets and apostrophes (Wylie's a-chung: `'jam`) are all part of the query.
    - Any other value that Hydra's lexer rejects only because of its characters (Tibetan or any non-ASCII
      text, e.g. a path `manifest=/data/བོད/lines.jsonl`) is quoted when it has no list/sweep syntax.
    Options (`-m`, `--cfg job`, ...) and overrides Hydra already reads pass through untouched.
    """
    out = []
    for arg in args:
        match = _OVERRIDE.fullmatch(arg)
        if match is None:
            out.append(arg)
            continue
        prefix, key, value = match["prefix"], match["key"], match["value"]
        if key in free_text:
            parsed = _parses(arg)
            already = value == "null" or (parsed is not None and value[:1] in "'\""
                                          and isinstance(parsed.value(), str) and not parsed.is_sweep_override())
            out.append(arg if already else f"{prefix}{key}={hydra_quote(value)}")
        elif not value.isascii() and not _STRUCTURE & set(value) and _parses(arg) is None:
            out.append(f"{prefix}{key}={hydra_quote(value)}")
        else:
            out.append(arg)
    return out


def hydra_command(config_name: str, free_text: Collection[str] = ()) -> Callable[[Callable[[DictConfig], Any]],
                                                                                  Callable[..., Any]]:
    """`@hydra.main` for a lineclip command (config `conf/<config_name>.yaml`), with the command line passed
    through `quote_overrides` first: the one place where every command reads its overrides."""
    import hydra

    from lineclip.config import conf_dir  # here: lineclip.config imports this module for ModelArgs

    def decorate(task: Callable[[DictConfig], Any]) -> Callable[..., Any]:
        hydra_main = hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name=config_name)(task)

        @functools.wraps(task)
        def main(cfg_passthrough: DictConfig | None = None) -> Any:
            if cfg_passthrough is None:  # run from the command line: Hydra parses sys.argv
                sys.argv[1:] = quote_overrides(sys.argv[1:], free_text)
            return hydra_main(cfg_passthrough)

        return main

    return decorate


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
