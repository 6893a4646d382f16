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
import importlib
import logging
import os
import re
import shlex
import sys
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lineclip.config import ModelArgs, conf_dir  # noqa: F401 - ModelArgs: importable here as before
from lineclip.errors import LineclipError
from lineclip.progress import Progress, duration  # noqa: F401 - importable here as before

log = logging.getLogger("lineclip")


class UsageError(LineclipError, ValueError):
    """A command-line option that cannot work; the message is one line naming it."""


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


# Hydra's flags that take the next word as their value; `--info` takes one of _INFO_VALUES, or none.
_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                     "--config-dir", "-cd", "--experimental-rerun"}
_INFO_VALUES = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}


def split_value(args: Sequence[str]) -> str | None:
    """One line for words of the command line that are no `key=value` (nor a flag or its value), else None.

    Such a word is nearly always the rest of a value the shell split at a space (`query=སངས་རྒྱས། ཆོས།`,
    `query_wylie=bkra shis`), which Hydra reports as `LexerNoViableAltException` or `missing EQUAL`: this says
    to quote it, with the whole value quoted as it was meant."""
    previous, last_override = "", None
    words: list[str] = []
    for arg in [*args, "--"]:
        flag_value = previous in _FLAGS_WITH_VALUE or (previous in ("--info", "-i") and arg in _INFO_VALUES)
        previous = arg
        if flag_value:
            continue
        stray = not arg.startswith(("-", "~")) and _OVERRIDE.fullmatch(arg) is None
        if stray:
            words.append(arg)
            continue
        if words:
            break
        last_override = _OVERRIDE.fullmatch(arg)
    if not words:
        return None
    if last_override is None:
        return (f"'{words[0]}' is not key=value: quote a value that has spaces, e.g. query='སངས་རྒྱས། ཆོས།'; "
                "--help lists the options")
    key = f"{last_override['prefix']}{last_override['key']}"
    whole = " ".join([last_override["value"], *words])
    return (f"'{words[0]}' is not key=value: the shell split the value of {key} at a space; quote the whole value: "
            f"{key}={shlex.quote(whole)}")


def command_help(name: str) -> str:
    """The `--help` header of `lineclip.<name>`: what the command does and how it is called, from the first
    paragraph of its module's docstring (`usage`: what it does), the one place that says it."""
    module = importlib.import_module(f"lineclip.{name}")
    first = " ".join((module.__doc__ or "").strip().split("\n\n")[0].split())
    usage, sep, what = first.partition("`: ")
    if not sep:
        usage, what = "", first
    text = f"lineclip.{name}: {what[:1].upper()}{what[1:]}"
    if usage:
        text += f"\n\nUsage: {usage.replace('`', '')}"
    return text.replace("$", "$$") + "\n"  # Hydra fills the help template with string.Template


def _training_groups() -> set[str]:
    return {p.name for p in conf_dir().iterdir() if p.is_dir() and p.name != "hydra"}


def unknown_option(config_name: str, args: Sequence[str]) -> str | None:
    """One line for the first override whose key the command's schema does not have, else None.

    Hydra's own message for it ("Could not override 'model'. To append to your config use +model=...") sends
    a user of `lineclip.evaluate ... model=dinov2_base` the wrong way: `+model=` only fails later. Keys under a
    field typed as a free dict (model.config.*), `hydra.*`, and explicit `+key=` / `++key=` are left to Hydra."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    try:
        schema = ConfigStore.instance().load(f"{config_name}_schema.yaml").node
    except Exception:  # noqa: BLE001 - a command without a stored schema: nothing to check against
        return None
    groups = _training_groups()
    for arg in args:
        match = _OVERRIDE.fullmatch(arg)
        if match is None or match["prefix"] or match["key"].split(".")[0] == "hydra" or "/" in match["key"]:
            continue
        key = match["key"].split("@")[0]
        if config_name == "train" and key in groups:
            continue  # a group choice: Hydra names the options when one is misspelt
        node: Any = schema
        for depth, part in enumerate(key.split(".")):
            if not isinstance(node, DictConfig) or node._is_none() or OmegaConf.get_type(node) is dict:
                break
            if part not in node.keys():  # (`in node` is False for a mandatory ??? field such as synth's out_dir)
                parent = ".".join(key.split(".")[:depth])
                known = ", ".join(sorted(str(k) for k in node.keys()))
                where = f"options of {parent}" if parent else "its options"
                hint = ""
                if config_name != "train" and key.split(".")[0] in groups:
                    hint = (f" (training's config group '{key.split('.')[0]}' does not apply: the model and its "
                            "settings come from the bundle given by run_dir=)")
                return f"lineclip.{config_name} has no option '{key}'{hint}; {where}: {known}; --help describes them"
            node = node._get_node(part)
    return None


def hydra_command(config_name: str, free_text: Collection[str] = ()) -> Callable[[Callable[[DictConfig], Any]],
                                                                                  Callable[..., Any]]:
    """`@hydra.main` for a lineclip command (config `conf/<config_name>.yaml`), with the command line passed
    through `quote_overrides` first: the one place where every command reads its overrides."""
    import hydra


    if not OmegaConf.has_resolver("lineclip_help"):
        OmegaConf.register_new_resolver("lineclip_help", command_help)

    def decorate(task: Callable[[DictConfig], Any]) -> Callable[..., Any]:
        @functools.wraps(task)
        def started(cfg: DictConfig) -> Any:
            # A sign of life before the heavy imports (PyTorch, transformers, FAISS): tens of seconds on a busy
            # machine, during which a command would otherwise print nothing at all.
            log.info("lineclip.%s: starting (loading PyTorch and the model libraries)", config_name)
            return task(cfg)

        hydra_main = hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name=config_name)(started)

        @functools.wraps(task)
        def main(cfg_passthrough: DictConfig | None = None) -> Any:
            completing = {"-sc", "--shell-completion"} & set(sys.argv[1:])  # Hydra's own words follow
            if cfg_passthrough is None and not completing:  # run from the command line: Hydra parses sys.argv
                args = quote_overrides(sys.argv[1:], free_text)
                unknown = split_value(sys.argv[1:]) or unknown_option(config_name, args)
                if unknown is not None:
                    print(f"error: {unknown}", file=sys.stderr)
                    sys.exit(2)
                sys.argv[1:] = args
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
    `log.error` line and exit status 2. Every lineclip one-line error derives from LineclipError (UsageError,
    ConfigError, ManifestError, BundleError, ImageReadError, DeviceError, CorpusError, OutputPathError,
    CheckpointError, ResumeError, TrainingDiverged), so this list names none of the modules that raise them."""
    return (LineclipError, OmegaConfBaseException)


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
