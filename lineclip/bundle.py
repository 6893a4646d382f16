"""The bundle, in one place: its names, finding one, checking it, writing it and loading it.

A bundle is five entries sharing one prefix (`""` for the final model, `checkpoint_step_0002400_` for a
checkpoint): the image backbone (with its image processor), the image head, the text encoder (with its
tokenizer), the text head and `training_config.json` (preprocessing, the logit scale, the resolved config).
Every entry is first written into a staging dir and renamed into place, with `training_config.json` last: a
bundle whose config file exists is complete, even if the process was killed in the middle of a save.

`resolve_bundle` turns a run dir, a prefix or any entry into a `BundleRef`; `check_bundle` reads its config;
`load_towers` / `load_heads` (training's `model.init_from`) and `load_model` (`LineEncoder`) read its weights
without running code from it; `save_bundle` writes one; `checkpoint_prefix` / `checkpoint_step` are the one
writer and the one parser of a checkpoint's name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from transformers.utils import logging as hf_logging

from lineclip.errors import LineclipError
from lineclip.files import as_write_error, file_sha256, first_line, first_non_regular, remove_staging
from lineclip.patches import patch_hw
from lineclip.reading import READING_HEAD_CONFIG, ReadingHead, load_reading_head
from lineclip.towers import DualEncoder, ProjectionHead, build_image_backbone, build_text_encoder

BACKBONE = "text_hierarchy_vit_backbone"
IMAGE_HEAD = "text_hierarchy_projection_head.pt"
TEXT_ENCODER = "text_hierarchy_clip_text_encoder"
TEXT_HEAD = "text_hierarchy_clip_text_projection_head.pt"
CONFIG = "training_config.json"
BUNDLE_ENTRIES = (BACKBONE, IMAGE_HEAD, TEXT_ENCODER, TEXT_HEAD, CONFIG)
TRAINING_STATE = "training_state"  # a checkpoint's sixth entry (lineclip.checkpoint); never read by a bundle load
# The one spelling of a checkpoint's prefix; `checkpoint_prefix` writes it, `checkpoint_step` parses it.
PREFIX_PATTERN = r"checkpoint_step_\d{7}_"
_PREFIX = re.compile(r"checkpoint_step_(\d{7})_")
SHIPPED_PREFIX = "lineclip:"  # model.init_from=lineclip:cpu_reader names a bundle shipped in the package
REQUIRED_KEYS = ("target_height", "max_width", "width_buckets", "patch_multiple", "image_preprocess_pipeline")


def checkpoint_prefix(step: int) -> str:
    return f"checkpoint_step_{step:07d}_"


def checkpoint_step(name: str) -> int | None:
    """The step of the checkpoint whose prefix `name` starts with (`checkpoint_step_0002400_...` -> 2400)."""
    match = _PREFIX.match(name)
    return int(match[1]) if match else None


class BundleError(LineclipError, ValueError):
    """A run dir or bundle that cannot be loaded; the message is one line naming the path."""


@dataclass(frozen=True)
class BundleRef:
    """Where a bundle lives: its folder and the prefix its five entries share (``""`` for the final one)."""

    directory: Path
    prefix: str

    def path(self, entry: str) -> Path:
        return self.directory / f"{self.prefix}{entry}"

    @property
    def label(self) -> str:
        return str(self.directory / self.prefix) if self.prefix else str(self.directory)


# ------------------------------------------------------------------------------------ finding, checking


def is_complete_bundle(output_dir: str | Path, prefix: str) -> bool:
    return all((Path(output_dir) / f"{prefix}{entry}").exists() for entry in BUNDLE_ENTRIES)


def bundle_prefixes(directory: str | Path) -> list[str]:
    """Prefixes of the complete bundles in a folder (``""`` first, then checkpoints in step order)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [n[: -len(CONFIG)] for n in os.listdir(directory) if n.endswith(CONFIG)]
    return sorted((p for p in found if is_complete_bundle(directory, p)), key=lambda p: (p != "", p))


def shipped_bundle_dir(name: str) -> Path:
    """Where the package keeps a bundle it ships and trained itself (`lineclip:cpu_reader`): assets/readers/."""
    return Path(str(resources.files("lineclip") / "assets" / "readers" / name))


def resolve_bundle(path: str | Path) -> BundleRef:
    """Turn a run dir, a bundle prefix, one file of a bundle or `lineclip:NAME` (a bundle this package ships,
    see `shipped_bundle_dir`) into a ``BundleRef`` (not yet checked)."""
    if str(path).startswith(SHIPPED_PREFIX):
        return BundleRef(shipped_bundle_dir(str(path)[len(SHIPPED_PREFIX):]), "")
    p = Path(os.path.expanduser(str(path))).absolute()
    if p.is_dir() and (p / CONFIG).exists():
        return BundleRef(p, "")  # a run dir with its final bundle
    # An entry name is matched longest first so that no shorter entry name wins on a common suffix.
    for entry in sorted(BUNDLE_ENTRIES, key=len, reverse=True):
        if p.name.endswith(entry):
            return BundleRef(p.parent, p.name[: -len(entry)])
    for prefix in bundle_prefixes(p.parent):
        if prefix and p.name.startswith(prefix):  # something else of a checkpoint, e.g. its training_state/
            return BundleRef(p.parent, prefix)
    if p.is_dir():
        return BundleRef(p, "")  # a run dir without a final bundle: check_bundle lists its checkpoints
    prefix = p.name
    if _PREFIX.fullmatch(f"{prefix}_"):
        prefix += "_"  # `checkpoint_step_0000002` names the bundle as well as its prefix does
    return BundleRef(p.parent, prefix)


def check_bundle(ref: BundleRef) -> dict[str, Any]:
    """Raise BundleError (one line) unless all five entries exist under one prefix; return the training config."""
    if not ref.directory.is_dir():
        raise BundleError(f"run dir {ref.directory} does not exist")
    missing = [entry for entry in BUNDLE_ENTRIES if not ref.path(entry).exists()]
    if missing:
        names = os.listdir(ref.directory)
        elsewhere = sorted(n for n in names for e in missing if n.endswith(e) and n != f"{ref.prefix}{e}")
        complete = bundle_prefixes(ref.directory)
        if len(missing) == len(BUNDLE_ENTRIES) and ref.prefix and not any(n.startswith(ref.prefix) for n in names):
            msg = f"{ref.label} does not exist (neither a run dir nor a bundle prefix)"
        elif len(missing) == len(BUNDLE_ENTRIES):
            msg = f"no lineclip bundle at {ref.label}"
            if complete:
                msg += "; bundles there: " + ", ".join(repr(p) if p else "'' (final)" for p in complete)
                if "" not in complete:
                    msg += f" (pass e.g. {ref.directory / complete[-1]})"
        else:
            msg = f"incomplete bundle at {ref.label}: missing {', '.join(missing)}"
            if elsewhere:
                shown = ", ".join(elsewhere[:3]) + (f" and {len(elsewhere) - 3} more" if len(elsewhere) > 3 else "")
                msg += f"; found {shown} instead (every file of one bundle must share one prefix: '{ref.prefix}')"
        if any(n.startswith(".staging_") for n in names):
            msg += "; a .staging_* folder is there: training may still be running or was interrupted"
        raise BundleError(msg)
    odd = first_non_regular([ref.path(entry) for entry in BUNDLE_ENTRIES])
    if odd is not None:
        raise BundleError(f"bundle {ref.label}: {odd} is not a regular file (a FIFO or a device?); refusing to read it")
    config_path = ref.path(CONFIG)
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: JSON nested 100,000 deep
        raise BundleError(f"cannot read {config_path}: {first_line(exc)}") from None
    if not isinstance(config, dict) or config.get("mode") != "line_clip":
        raise BundleError(f"{config_path} is not a line_clip training config (mode={config.get('mode')!r})"
                          if isinstance(config, dict) else f"{config_path} does not hold a JSON object")
    absent = [key for key in REQUIRED_KEYS if key not in config]
    if absent:
        raise BundleError(f"{config_path} lacks {', '.join(absent)}")
    check_embedding_config(config, config_path)
    return config


# Far above any real line (a 70 px high, 65536 px wide line; 64 KiB of text), far below what would allocate
# gigabytes per image or text: a training_config.json past these was not written by a training run.
MAX_SIDE = 65_536
MAX_TEXT_LENGTH = 65_536
# The training config key each of a bundle's top-level geometry keys was written from (bundle.workbench_keys).
_RESOLVED = {"target_height": ("preprocess", "target_height"), "max_width": ("preprocess", "max_width"),
             "width_buckets": ("preprocess", "width_buckets"), "patch_multiple": ("preprocess", "patch_multiple"),
             "image_preprocess_pipeline": ("preprocess", "pipeline"), "text_max_length": ("text", "max_length")}


def check_embedding_config(config: dict[str, Any], path: Path) -> None:
    """The keys of a bundle's training_config.json that decide what an embedding is, checked as lineclip.config
    checks a training config (types, positive sizes, a known pipeline, target_height a multiple of the patch,
    non-empty ascending buckets), within MAX_SIDE / MAX_TEXT_LENGTH, and equal to the resolved config the run
    recorded beside them (`config`), where it did: an edited copy of one of them is refused in one line."""
    from lineclip.preprocess import PIPELINES

    def is_size(value: Any, most: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= most

    def refuse(message: str) -> BundleError:
        return BundleError(f"{path}: {message}")

    for key in ("target_height", "max_width", "patch_multiple"):
        if not is_size(config[key], MAX_SIDE):
            raise refuse(f"{key} must be an integer in 1..{MAX_SIDE}, got {config[key]!r:.40}")
    if config["target_height"] % config["patch_multiple"]:
        raise refuse(f"target_height {config['target_height']} is not a multiple of patch_multiple "
                     f"{config['patch_multiple']}")
    buckets = config["width_buckets"]
    if not (isinstance(buckets, list) and buckets and all(is_size(b, MAX_SIDE) for b in buckets)
            and buckets == sorted(buckets)):
        raise refuse(f"width_buckets must be a non-empty ascending list of integers in 1..{MAX_SIDE}, got "
                     f"{buckets!r:.60}")
    if config["image_preprocess_pipeline"] not in PIPELINES:
        raise refuse(f"image_preprocess_pipeline {config['image_preprocess_pipeline']!r:.40} is not one of "
                     f"{', '.join(PIPELINES)}")
    if "text_max_length" in config and not is_size(config["text_max_length"], MAX_TEXT_LENGTH):
        raise refuse(f"text_max_length must be an integer in 1..{MAX_TEXT_LENGTH}, got "
                     f"{config['text_max_length']!r:.40}")
    resolved = config.get("config")
    for key, (group, name) in _RESOLVED.items():
        section = resolved.get(group) if isinstance(resolved, dict) else None
        if key in config and isinstance(section, dict) and name in section and section[name] != config[key]:
            raise refuse(f"{key} {config[key]!r:.40} differs from the run's own config {group}.{name} "
                         f"{section[name]!r:.40} (an edited file?)")


def heads_fingerprint(directory: str | Path, prefix: str = "") -> str:
    """A short hash of a bundle's two projection heads only: the fingerprint corpora recorded before `FINGERPRINT`
    (16 hex digits, no version), still accepted for them (`fingerprint_matches`)."""
    digest = hashlib.sha256()
    for entry in (IMAGE_HEAD, TEXT_HEAD):
        digest.update((Path(directory) / f"{prefix}{entry}").read_bytes())
    return digest.hexdigest()[:16]


FINGERPRINT = "v2"  # the prefix of fingerprints that cover every file of both towers, both heads and the geometry
# The keys of training_config.json that change what an embedding is (preprocessing geometry, the text cut).
EMBEDDING_KEYS = ("target_height", "max_width", "width_buckets", "patch_multiple", "image_preprocess_pipeline",
                  "text_max_length")




def _fingerprint(directory: Path, prefix: str, config: dict[str, Any]) -> str:
    """A hash of the hashes of every file that shapes an embedding: all files of the backbone dir (weights, config,
    preprocessor_config.json's mean/std) and of the text encoder dir, both heads, and the EMBEDDING_KEYS of the
    training config. Two bundles with equal fingerprints embed alike; replacing any one of these files (a
    checkpoint's backbone put beside the final heads) changes it."""
    lines = []
    for entry in (BACKBONE, TEXT_ENCODER, IMAGE_HEAD, TEXT_HEAD):
        root = directory / f"{prefix}{entry}"
        files = sorted(p for p in root.rglob("*") if not p.is_dir()) if root.is_dir() else [root]
        for path in files:
            name = entry if path == root else f"{entry}/{path.relative_to(root).as_posix()}"
            lines.append(f"{name}\t{file_sha256(path) if path.is_file() else 'not a regular file'}")
    lines.append(json.dumps({k: config.get(k) for k in EMBEDDING_KEYS}, sort_keys=True))
    return f"{FINGERPRINT}:" + hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()[:32]


def model_fingerprint(ref: BundleRef, config: dict[str, Any] | None = None) -> str:
    """The fingerprint of the bundle at `ref` (`config`: its training config, read if not given), as a corpus
    records the model that embedded it."""
    return _fingerprint(ref.directory, ref.prefix, check_bundle(ref) if config is None else config)


def reading_head_beside(ref: BundleRef) -> tuple[ReadingHead | None, str]:
    """The CTC reading head saved in the bundle's folder (lineclip.reading.save_reading_head), if it was trained with
    this bundle: (head, ""); (None, "") when there is none; (None, why) when one is there but refused."""
    if not (ref.directory / READING_HEAD_CONFIG).exists():
        return None, ""
    return load_reading_head(ref.directory, model_fingerprint(ref))


def fingerprint_matches(recorded: str, ref: BundleRef, current: str | None = None) -> bool:
    """Whether a corpus's recorded fingerprint is the bundle's. A corpus written before FINGERPRINT recorded the
    heads only: it is compared on those, with a warning that the towers were not checked (rebuild it to have
    them checked). `current`: the bundle's model_fingerprint, if already computed."""
    if recorded.startswith(f"{FINGERPRINT}:"):
        return recorded == (current or model_fingerprint(ref))
    import logging

    logging.getLogger(__name__).warning(
        "the corpus records an older fingerprint of the projection heads only: the towers and preprocessing of "
        "%s are not checked against it (rebuild the corpus with lineclip.index to have them checked)", ref.label)
    return recorded == heads_fingerprint(ref.directory, ref.prefix)


@contextlib.contextmanager
def quiet_hf_progress():
    """No transformers progress bars inside (a shard bar per save breaks the training bar; a "Loading weights"
    bar per tower is noise in a CLI's output); restored as they were."""
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()


# ---------------------------------------------------------------------------------------------- loading


def load_towers(ref: BundleRef, image_config: dict[str, Any] | None = None, text_config: dict[str, Any] | None = None,
                trust_remote_code: bool = False, attn_implementation: str | None = None) -> tuple[Any, Any]:
    """The image backbone and text encoder of a checked bundle (safetensors; no code of the bundle runs unless
    `trust_remote_code`). BundleError names the entry that failed."""
    what = BACKBONE
    try:
        with quiet_hf_progress():
            backbone = build_image_backbone(str(ref.path(what)), dict(image_config or {}), trust_remote_code,
                                            attn_implementation)
            what = TEXT_ENCODER
            text_encoder = build_text_encoder(str(ref.path(what)), dict(text_config or {}), trust_remote_code,
                                              attn_implementation)
    except Exception as exc:  # noqa: BLE001 - whatever a damaged file raises (safetensors, JSON, OSError, ...)
        raise BundleError(f"cannot load {ref.path(what)}: {first_line(exc)}") from None
    return backbone, text_encoder


def load_heads(ref: BundleRef) -> tuple[ProjectionHead, ProjectionHead]:
    """The image and text projection heads (weights_only=True: a head that would need code to unpickle is
    refused, in one line)."""
    heads = []
    for entry in (IMAGE_HEAD, TEXT_HEAD):
        try:
            heads.append(ProjectionHead.load(ref.path(entry)))
        except Exception as exc:  # noqa: BLE001 - UnpicklingError, KeyError, RuntimeError, OSError ...
            raise BundleError(f"cannot load {ref.path(entry)}: {first_line(exc)}") from None
    return heads[0], heads[1]


def load_model(ref: BundleRef, patch_multiple: int) -> DualEncoder:
    """The bundle's towers and heads as one inference DualEncoder, checked to fit together and the config's
    `patch_multiple`."""
    backbone, text_encoder = load_towers(ref)
    image_head, text_head = load_heads(ref)
    if image_head.input_dim != backbone.config.hidden_size or text_head.input_dim != text_encoder.config.d_model:
        raise BundleError(f"bundle {ref.label}: a projection head does not fit its tower (image head in "
                          f"{image_head.input_dim} vs backbone {backbone.config.hidden_size}, text head in "
                          f"{text_head.input_dim} vs encoder {text_encoder.config.d_model})")
    if image_head.output_dim != text_head.output_dim:
        raise BundleError(f"bundle {ref.label}: image head gives {image_head.output_dim} dims, text head "
                          f"{text_head.output_dim}")
    if patch_hw(backbone.config.patch_size)[1] != patch_multiple:
        raise BundleError(f"bundle {ref.label}: patch_multiple={patch_multiple} in training_config.json "
                          f"but the backbone's patch is {backbone.config.patch_size}")
    model = DualEncoder(backbone, text_encoder, projection_dim=image_head.output_dim)
    model.image_head, model.text_head = image_head, text_head
    return model


# ---------------------------------------------------------------------------------------------- writing


def workbench_keys(cfg: Any) -> dict[str, Any]:
    """The keys the PechaBridge Workbench reads to find a bundle and rebuild its preprocessing."""
    pre = cfg.preprocess
    return {
        "mode": "line_clip",
        "target_height": int(pre.target_height),
        "max_width": int(pre.max_width),
        "patch_multiple": int(pre.patch_multiple),
        "width_buckets": [int(b) for b in pre.width_buckets],
        "image_preprocess_pipeline": str(pre.pipeline),
        "image_preprocess_pb": pre.pipeline == "pb",
        "image_preprocess_bdrc": pre.pipeline == "bdrc",
        "text_max_length": int(cfg.text.max_length),
        "projection_dim": int(cfg.model.projection_dim),
    }


def staging_dir(output_dir: str | Path, prefix: str, reset: bool = False) -> Path:
    """Where a bundle is assembled before its entries are renamed into place."""
    staging = Path(output_dir) / f".staging_{prefix or 'final'}"
    if reset:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    return staging


def save_bundle(
    output_dir: str | Path,
    prefix: str,
    model: DualEncoder,
    image_processor: Any,
    tokenizer: Any,
    training_config: dict[str, Any],
    extra_entries: tuple[str, ...] = (),
    corpus: dict[str, Any] | None = None,
) -> None:
    """Write one complete bundle. `model` must be the unwrapped module (accelerator.unwrap_model).

    `extra_entries` were already written into `staging_dir(output_dir, prefix)` by the caller (the training
    state; for the final bundle the corpus embeddings and data report); they are renamed into place with the
    rest, before the config. The old config goes first, so a failure half-way leaves no bundle that looks
    complete (and no old model beside new embeddings). `corpus`: recorded in the config as `corpus`, with the
    fingerprint of the heads written here (the model that embedded the staged corpus)."""
    output_dir = Path(output_dir)
    staging = staging_dir(output_dir, prefix, reset=not extra_entries)
    try:
        _save_bundle(output_dir, prefix, staging, model, image_processor, tokenizer, training_config, extra_entries,
                     corpus)
    except BaseException as exc:
        remove_staging(staging)  # a full disk leaves no half-written staging dir behind
        error = as_write_error(exc, f"the {prefix or 'final '}bundle in {output_dir}")
        if error is None:
            raise
        raise error from exc


def _save_bundle(output_dir: Path, prefix: str, staging: Path, model: DualEncoder, image_processor: Any,
                 tokenizer: Any, training_config: dict[str, Any], extra_entries: tuple[str, ...],
                 corpus: dict[str, Any] | None) -> None:
    with quiet_hf_progress():
        model.image_backbone.save_pretrained(staging / BACKBONE)
        image_processor.save_pretrained(staging / BACKBONE)
        model.image_head.save(staging / IMAGE_HEAD)
        model.text_encoder.save_pretrained(staging / TEXT_ENCODER)
        tokenizer.save_pretrained(staging / TEXT_ENCODER)
        model.text_head.save(staging / TEXT_HEAD)
    if corpus is not None or not prefix:
        # The final bundle says whether the run dir's corpus is its own: None (not exported) or the fingerprint.
        training_config = {**training_config, "corpus": None if corpus is None else {
            **corpus, "fingerprint": _fingerprint(staging, "", training_config)}}
    (staging / CONFIG).write_text(json.dumps(training_config, indent=2, ensure_ascii=False, default=str))
    (output_dir / f"{prefix}{CONFIG}").unlink(missing_ok=True)  # the old bundle stops looking complete first
    for entry in (*extra_entries, *BUNDLE_ENTRIES):  # config last: its presence marks the bundle complete
        target = output_dir / f"{prefix}{entry}"
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        (staging / entry).rename(target)
    staging.rmdir()
