"""Typed schema of the Hydra config tree and the semantic checks run before any model is built.

The dataclasses here carry the types and every default, once; the YAML files under `conf/` only choose (a
group's option) and override (presets); `python -m lineclip.train --cfg job` shows the result. `conf/train.yaml`
extends `train_schema`, so a misspelt key or a value of the wrong type fails at composition with Hydra's
own error, and `check_config` catches what types cannot (lr > 0, a known pipeline, a readable manifest).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import math
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from lineclip.errors import LineclipError
from lineclip.ocr import OcrOptions
from lineclip.patches import check_patch_geometry, position_table_problem

log = logging.getLogger("lineclip.config")


@dataclass
class ModelArgs:
    """Options every using command has: which bundle, and how to run it."""

    # A finished run dir, a checkpoint bundle by prefix (run/checkpoint_step_0002400_) or any file of a bundle.
    run_dir: str | None = None
    device: str | None = None  # null: cuda when available, else cpu
    batch_size: int = 32
    num_workers: int = 0  # DataLoader workers decoding line images
    progress: bool = True


@dataclass
class ModelConfig:
    """Image tower: DINOv2 from `name_or_path` (hub id or local dir), or random init from `config`."""

    name: str = "dinov2"
    name_or_path: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    projection_dim: int = 256
    freeze_backbone: bool = False
    backbone_lr_multiplier: float = 1.0
    head_lr_multiplier: float = 1.0
    gradient_checkpointing: bool = False  # both towers: less activation memory for large models, ~30% slower
    attn_implementation: str | None = None  # both towers; None: transformers' default (sdpa), or eager
    # Start both towers, both heads and the logit scale from an earlier run dir or checkpoint bundle.
    init_from: str | None = None
    trust_remote_code: bool = False


@dataclass
class TextConfig:
    """Text tower: the ByT5 *encoder* from `name_or_path`, or random init from `config`."""

    name: str = "byt5"
    name_or_path: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    max_length: int = 512  # in bytes (ByT5 tokens); Tibetan is 3 bytes a character
    freeze: bool = False
    encoder_lr_multiplier: float = 1.0
    head_lr_multiplier: float = 1.0
    trust_remote_code: bool = False


@dataclass
class TextSpanConfig:
    """With probability `p` the text of a training pair is a run of `min_syllables`..`max_syllables` whole
    syllables of its transcription (the image stays the whole line): training for phrase queries."""

    p: float = 0.0
    min_syllables: int = 2
    max_syllables: int = 8


@dataclass
class DataConfig:
    name: str = "demo"
    dataset_dir: str | None = None
    train_manifest: str | None = None
    val_manifest: str | None = None
    batch_size: int = 32
    eval_batch_size: int | None = None  # defaults to batch_size
    num_workers: int = 2
    on_bad_row: str = "skip"  # skip (and count) | error
    max_text_bytes: int | None = 8192  # longer transcriptions are bad rows (text_too_long), not lines
    # Images whose header claims more pixels are never decoded (counted as too_large_image); null: no limit.
    max_image_pixels: int | None = 40_000_000
    augment: bool = False
    # Cut each line image to the share of its width that the (possibly truncated) text still describes.
    crop_to_text: bool = False
    # Batches also share a text-length bucket of this many bytes, so short lines are not padded to long ones.
    # Off by default: on real lines it cut text padding only from 6.8% to 4.6% (no measurable speed-up on an
    # H200, experiments/RESULTS.md) while splitting batches into smaller ones, i.e. fewer negatives.
    text_bucket_bytes: int | None = None
    text_span: TextSpanConfig = field(default_factory=TextSpanConfig)
    # Fill batches with lines of the same page_id / doc_id / collection (or any manifest field), still one width
    # bucket a batch: neighbouring lines of one page are the hard negatives a reader must tell apart.
    group_batches_by: str | None = None
    # A bucket's last batch with fewer lines is dropped (counted): a batch of one line has loss 0 and teaches
    # nothing. Capped at batch_size (batch_size=1 still trains, line by line).
    min_batch_size: int = 2
    # manifest: JSONL manifests (train_manifest, val_manifest) | shards: tar shards written by lineclip.shard
    # (train_shards, val_shards), read without any manifest parse or header scan.
    format: str = "manifest"
    # Keep each manifest's validated lines and image sizes in a line cache file (lineclip.sizes) beside it, so a
    # million-line run starts in seconds the second time; false: parse and scan every time.
    line_cache: bool = True
    # Where the line cache goes; null: beside the manifest, else (read-only there) <run dir>/line_cache/.
    line_cache_dir: str | None = None
    # Processes reading image headers when there is no cache (header parsing is CPU-bound Python); null: all CPUs.
    scan_workers: int | None = None
    # data.format=shards: a shard dir (its shards.json), a shards.json file, or a glob of .tar shards.
    train_shards: str | None = None
    val_shards: str | None = None


@dataclass
class PreprocessConfig:
    pipeline: str = "bdrc"
    target_height: int = 56
    max_width: int = 1024
    width_buckets: list[int] = field(default_factory=lambda: [256, 384, 512, 768, 1024])
    patch_multiple: int = 14
    # Pixel normalisation, (x/255 - mean) / std per channel; null: the image tower's own (ImageNet for DINOv2).
    # Saved in the bundle's preprocessor_config.json, so the Workbench and LineEncoder use the same values.
    image_mean: list[float] | None = None
    image_std: list[float] | None = None


@dataclass
class OptimConfig:
    """AdamW (the only optimizer: conf/optim/adamw.yaml names it) with a linear warmup, then `schedule`."""

    lr: float = 5e-5
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    warmup_steps: int = 1000
    schedule: str = "cosine"  # cosine | linear | constant (after linear warmup)
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0


@dataclass
class LossConfig:
    learnable_temperature: bool = True
    temperature: float = 0.07  # initial value when learnable (CLIP: 1/0.07), fixed value otherwise
    max_logit_scale: float = 100.0
    gather: bool | None = None  # None: gather embeddings across processes whenever world size > 1
    # Auxiliary reading loss (CTC over the image tower's patch columns, lineclip.reading): its weight beside
    # the contrastive loss; 0 turns it off. Training only: the head is not part of any bundle.
    reading_weight: float = 0.0
    reading_frames_per_column: int = 4
    bag_weight: float = 0.0  # which characters occur, predicted from the pooled image token (lineclip.reading)
    # PHOC's pyramid for both bags: at level L the line is cut into L runs and each run's characters are a target
    # ([1]: the whole line's bag; [1, 2, 3]: also where, roughly, each character is)
    bag_levels: list[int] = field(default_factory=lambda: [1])
    text_bag_weight: float = 0.0  # the same bag predicted from the text tower's pooled mean (what it embeds)
    # The logit scale is learnt as a log at optim.lr times this: from a low start (loss.temperature) it would
    # otherwise climb by at most ~lr per step (ln 20 = 3 needs ~3000 steps at lr 1e-3).
    logit_scale_lr_multiplier: float = 1.0
    name: str = "infonce"  # infonce | siglip (pairwise sigmoid loss with a learnable logit bias)
    logit_bias: float = -10.0  # siglip: the bias's initial value


@dataclass
class TrainerConfig:
    epochs: int = 20
    max_steps: int | None = None  # optimizer steps; overrides epochs
    mixed_precision: str = "no"  # no | fp16 | bf16
    seed: int = 42
    gradient_accumulation_steps: int = 1  # sums gradients of several batches; does NOT add negatives
    grad_cache_chunks: int | None = None  # k micro-batches form one contrastive batch (k x more negatives)
    checkpoint_every_steps: int = 2400
    eval_every_steps: int | None = None  # defaults to checkpoint_every_steps, as in the spec
    log_every_steps: int = 10
    export_embeddings: bool = True
    progress_bar: bool = True
    # torch.set_num_threads on a CPU run; null: PyTorch's default (one per core). Small towers on a busy machine
    # run faster on 1: their ops are too small to share, and a thread that waits for a descheduled sibling spins.
    cpu_threads: int | None = None
    compile: bool = False  # torch.compile both towers (shapes are bounded by the width and text buckets)
    resume: str | None = None  # latest | a run dir | a checkpoint_step_XXXXXXX_ bundle
    resume_strict: bool = True  # false: a missing or refused RNG state warns instead of stopping the resume
    overwrite: bool = False  # true: a new run into a dir that holds another run first removes that run's files
    keep_last_checkpoints: int | None = None  # rotate older checkpoints away (final artifacts never)
    max_bad_steps: int = 10  # non-finite losses in a row before the run stops
    # Validation beyond the whole gallery (lineclip.galleries): within-group galleries for each field the val
    # manifest has (val_page_t2i_r1, ...), phrase queries (val_phrase_t2i_r1, ...), and once per run the levels
    # of chance / collection-only / length-only rankers (val_chance_r1, val_page_t2i_length_level_r1, ...).
    val_gallery_by: list[str] = field(default_factory=lambda: ["page_id"])
    val_phrases: bool = True
    val_phrase_seed: int = 0  # the same phrase queries whatever trainer.seed, so runs compare
    val_phrase_syllables: list[int] = field(default_factory=lambda: [2, 8])  # min, max syllables
    # Reference levels, once per run: true (chance / collection-only / length-only: O(N^2) on CPU), false, or a list
    # of chance, collection, length, ocr (Tesseract + text search on the val lines, lineclip.ocr: opt-in, ~0.1-0.4 s
    # of CPU per line and mode on the first run, cached; on the main process, while the others wait)
    val_levels: Any = True
    val_ocr: OcrOptions = field(default_factory=OcrOptions)  # the ocr level's engine, modes, cache and scorers


@dataclass
class LoggerConfig:
    name: str = "wandb"  # wandb | none
    project: str = "lineclip"
    entity: str | None = None
    group: str | None = None  # defaults to the multirun sweep dir's name
    mode: str | None = None  # online | offline | disabled; None: online with credentials, else offline
    tags: list[str] = field(default_factory=list)
    # W&B panels beyond scalars (lineclip.panels; none is built with logger=none). At each validation the table
    # val/retrieval: this many val text queries (one seeded set, the same in every validation and every run of a
    # sweep, so runs compare row by row; 0: no table) with their top-k retrieved line images, scores and hits.
    val_table_queries: int = 16
    val_table_top_k: int = 5
    val_table_seed: int = 0  # not trainer.seed: runs with different seeds still show the same queries
    rank_histograms: bool = True  # val/{t2i,i2t}_rank and _log10_rank: where the correct line ranks
    input_grid_lines: int = 16  # train/inputs, once: lines of the first batch as the towers get them; 0: none
    log_model: bool = False  # the final bundle as a W&B model artifact, training_config.json as its metadata
    log_checkpoints: bool = False  # each checkpoint's bundle too (copied: rotation may delete it before upload)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    text: TextConfig = field(default_factory=TextConfig)
    data: DataConfig = field(default_factory=DataConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    output_dir: str | None = None  # defaults to Hydra's run dir


@dataclass
class ServeConfig(ModelArgs):
    """`python -m lineclip.serve`: a local search page over a run's corpus (lineclip.serve)."""

    corpus: str | None = None  # a lineclip.index dir; default: the run's training corpus
    # Loopback only by default: the page shows the corpus's line images to whoever can reach the port.
    host: str = "127.0.0.1"
    port: int = 8000
    page_size: int = 10  # result rows per page
    # Paging stops at this rank: each page is a fresh top-(page x page_size) search, and a reader rarely looks
    # past a few hundred lines.
    max_results: int = 200
    # Uploads above this are refused (413) before any decoding; real line images are 10-200 kB.
    max_upload_bytes: int = 8_000_000
    # ... and above this many pixels (a 16-bit image's count double, a 32-bit one's four times: the bytes its
    # decoding holds), refused (400) from the header before decoding. A long line at 300 dpi is ~0.1-1 M; a small
    # compressed file can claim 40 M pixels and cost a gigabyte and tens of seconds to decode.
    max_upload_pixels: int = 4_000_000
    # Uploads decoded and embedded at once; more wait their turn, so memory is bounded by this many uploads.
    upload_workers: int = 1
    # Longer queries are refused (400) before encoding; the model reads only text_max_length bytes anyway.
    max_query_chars: int = 2000
    thumb_height: int = 64  # px; result lines are shown at most this tall (the link opens the full image)
    thumb_width: int = 1200
    # Uploaded lines' embeddings kept (by content hash) so that their result pages can be paged.
    upload_cache: int = 32
    nprobe: int | None = None  # ivf corpora: clusters visited (default: as built)
    ef_search: int | None = None  # hnsw corpora


def register_configs() -> None:
    """Store the schemas and the `${lineclip_asset:NAME}` resolver (the package's bundled data dirs)."""
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
    if not OmegaConf.has_resolver("lineclip_asset"):
        OmegaConf.register_new_resolver("lineclip_asset", lambda name: str(asset_dir(name)))


def compose(config_name: str = "train", overrides: Sequence[str] = (), return_hydra_config: bool = False) -> DictConfig:
    """A command's config (train, evaluate, index, search, synth) composed from the config tree with overrides, as
    its command line does, through Hydra's compose API: what tests, benchmarks and experiments use."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    if config_name != "train":
        importlib.import_module(f"lineclip.{config_name}")  # stores the command's schema
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides),
                             return_hydra_config=return_hydra_config)


def conf_dir() -> Path:
    """The config tree: `conf/` of a source checkout, or the copy shipped inside an installed wheel."""
    checkout = Path(__file__).resolve().parent.parent / "conf"
    return checkout if checkout.is_dir() else Path(str(resources.files("lineclip") / "conf"))


def asset_dir(name: str) -> Path:
    """A data dir bundled with the package (e.g. the demo dataset), wherever the package is installed."""
    return Path(str(resources.files("lineclip") / "assets" / name))


class ConfigError(LineclipError, ValueError):
    """A composed config that types alone cannot reject; the message names the field."""


_CHOICES = {
    "trainer.mixed_precision": ("no", "fp16", "bf16"),
    "optim.schedule": ("cosine", "linear", "constant"),
    "data.format": ("manifest", "shards"),
    "loss.name": ("infonce", "siglip"),
    "logger.name": ("wandb", "none"),
    "model.attn_implementation": (None, "sdpa", "eager", "flash_attention_2"),
}


def _get(cfg: DictConfig, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def _finite(cfg: DictConfig, key: str) -> float:
    value = _get(cfg, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value}")
    return float(value)


def _check_numbers(cfg: DictConfig) -> None:
    """What types let through but would fail (or silently misbehave) only once the model is built or trained."""
    for key in ("optim.lr", "optim.eps", "loss.max_logit_scale", "loss.temperature"):
        if not _finite(cfg, key) > 0:
            raise ConfigError(f"{key} must be > 0, got {_get(cfg, key)}")
    if not _finite(cfg, "optim.weight_decay") >= 0:
        raise ConfigError(f"optim.weight_decay must be >= 0, got {cfg.optim.weight_decay}")
    if not 0 <= _finite(cfg, "optim.min_lr_ratio") <= 1:
        raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {cfg.optim.min_lr_ratio}")
    if cfg.optim.grad_clip is not None and not _finite(cfg, "optim.grad_clip") >= 0:
        raise ConfigError(f"optim.grad_clip must be >= 0 (0 or null: no clipping), got {cfg.optim.grad_clip}")
    betas = list(cfg.optim.betas)
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1
                                  for b in betas):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {betas}")
    for key in ("model.backbone_lr_multiplier", "model.head_lr_multiplier", "text.encoder_lr_multiplier",
                "text.head_lr_multiplier"):
        if not _finite(cfg, key) >= 0:
            raise ConfigError(f"{key} must be >= 0, got {_get(cfg, key)}")
    if cfg.trainer.log_every_steps < 1:
        raise ConfigError(f"trainer.log_every_steps must be >= 1, got {cfg.trainer.log_every_steps}")
    if cfg.trainer.seed < 0:
        raise ConfigError(f"trainer.seed must be >= 0, got {cfg.trainer.seed}")
    if any(b < 1 for b in cfg.preprocess.width_buckets):
        raise ConfigError(f"preprocess.width_buckets must be positive, got {list(cfg.preprocess.width_buckets)}")
    if cfg.data.max_image_pixels is not None and cfg.data.max_image_pixels < 1:
        raise ConfigError(f"data.max_image_pixels must be > 0 or null, got {cfg.data.max_image_pixels}")
    for key in ("logger.val_table_queries", "logger.input_grid_lines"):
        if _get(cfg, key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {_get(cfg, key)}")
    if cfg.trainer.overwrite and cfg.trainer.resume:
        raise ConfigError("trainer.resume and trainer.overwrite=true contradict each other: give one")


# The documented OpenPecha / BDRC layout under data.dataset_dir (README, Training on your own manifests).
LAYOUT_MANIFESTS = {"train_manifest": ("train",), "val_manifest": ("eval", "val")}


def command_line_keys() -> set[str]:
    """The keys this run's command line set (Hydra's task overrides: `data.val_manifest=null` gives
    "data.val_manifest"); empty outside a Hydra app."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return set()
    return {override.split("=", 1)[0].lstrip("+~") for override in HydraConfig.get().overrides.task}


def manifests_from_layout(cfg: DictConfig, given: Collection[str] = ()) -> dict[str, str]:
    """Set `data.train_manifest` / `data.val_manifest` that are not given to `<dataset_dir>/<split>/meta/lines.jsonl`
    where that file exists (train; eval, else val), so `data=openpecha data.dataset_dir=D` is enough for a dataset
    in the documented layout. Returns what was set, for the log; explicit values are never replaced, an explicit
    null included (`given`, e.g. command_line_keys(): `data.val_manifest=null` means no validation)."""
    found: dict[str, str] = {}
    if cfg.data.format != "manifest" or not cfg.data.dataset_dir:
        return found
    for key, splits in LAYOUT_MANIFESTS.items():
        if cfg.data[key] or f"data.{key}" in given:
            continue
        for split in splits:
            path = Path(cfg.data.dataset_dir) / split / "meta" / "lines.jsonl"
            if path.is_file():
                cfg.data[key] = found[f"data.{key}"] = str(path)
                break
    return found


def check_config(cfg: DictConfig) -> None:
    """Fail fast, before any model is built, with a one-line reason naming the field."""
    from lineclip.manifest import ON_BAD_ROW_CHOICES
    from lineclip.preprocess import PIPELINES  # here, not at import: it pulls in torch (seconds per CLI start)

    choices = {"preprocess.pipeline": PIPELINES, "data.on_bad_row": ON_BAD_ROW_CHOICES, **_CHOICES}
    for key, allowed in choices.items():
        if _get(cfg, key) not in allowed:
            raise ConfigError(f"{key}={_get(cfg, key)!r} is not one of {', '.join(allowed)}")
    positive = ["optim.lr", "loss.logit_scale_lr_multiplier", "data.batch_size", "preprocess.target_height",
                "preprocess.max_width",
                "preprocess.patch_multiple", "text.max_length", "model.projection_dim",
                "trainer.gradient_accumulation_steps", "trainer.checkpoint_every_steps", "loss.temperature",
                "data.min_batch_size", "logger.val_table_top_k"]
    for key in positive:
        if not _get(cfg, key) > 0:
            raise ConfigError(f"{key} must be > 0, got {_get(cfg, key)}")
    for key in ["trainer.max_steps", "trainer.eval_every_steps", "data.eval_batch_size",
                "trainer.keep_last_checkpoints", "data.max_text_bytes", "trainer.max_bad_steps",
                "data.text_bucket_bytes", "data.scan_workers", "trainer.cpu_threads"]:
        value = _get(cfg, key)
        if value is not None and value <= 0:
            raise ConfigError(f"{key} must be > 0 or null, got {value}")
    weights = [cfg.loss.reading_weight, cfg.loss.bag_weight, cfg.loss.text_bag_weight]
    if not all(w >= 0 for w in weights) or cfg.loss.reading_frames_per_column < 1:
        raise ConfigError(f"loss.reading_weight, loss.bag_weight and loss.text_bag_weight must be >= 0 and "
                          f"loss.reading_frames_per_column >= 1, got {weights}, {cfg.loss.reading_frames_per_column}")
    if not cfg.loss.bag_levels or min(cfg.loss.bag_levels) < 1:
        raise ConfigError(f"loss.bag_levels must be a non-empty list of levels >= 1, got {list(cfg.loss.bag_levels)}")
    if cfg.trainer.grad_cache_chunks is not None:
        if cfg.trainer.grad_cache_chunks < 2:
            raise ConfigError(f"trainer.grad_cache_chunks must be >= 2 or null, got {cfg.trainer.grad_cache_chunks}")
        if cfg.trainer.gradient_accumulation_steps != 1:
            raise ConfigError("trainer.grad_cache_chunks and trainer.gradient_accumulation_steps > 1 don't combine")
    span = cfg.data.text_span
    if not 0.0 <= span.p <= 1.0:
        raise ConfigError(f"data.text_span.p must be in [0, 1], got {span.p}")
    if not 1 <= span.min_syllables <= span.max_syllables:
        raise ConfigError("data.text_span needs 1 <= min_syllables <= max_syllables, got "
                          f"{span.min_syllables} and {span.max_syllables}")
    from lineclip.galleries import level_names

    try:
        val_levels = level_names(cfg.trainer.val_levels)
    except ValueError as exc:
        raise ConfigError(f"trainer.val_levels: {exc}") from None
    if "ocr" in val_levels and not cfg.trainer.val_ocr.modes:
        raise ConfigError("trainer.val_ocr.modes must name at least one page segmentation mode")
    syllables = list(cfg.trainer.val_phrase_syllables)
    if len(syllables) != 2 or not 1 <= syllables[0] <= syllables[1]:
        raise ConfigError(f"trainer.val_phrase_syllables must be [min, max] with 1 <= min <= max, got {syllables}")
    _check_numbers(cfg)
    if cfg.trainer.epochs <= 0 and cfg.trainer.max_steps is None:
        raise ConfigError(f"trainer.epochs must be > 0 when trainer.max_steps is null, got {cfg.trainer.epochs}")
    if cfg.optim.weight_decay < 0 or cfg.optim.warmup_steps < 0 or cfg.data.num_workers < 0:
        raise ConfigError("optim.weight_decay, optim.warmup_steps and data.num_workers must be >= 0")
    for key in ["preprocess.image_mean", "preprocess.image_std"]:
        value = _get(cfg, key)
        if value is not None and (len(value) != 3 or not all(math.isfinite(v) for v in value)):
            raise ConfigError(f"{key} must be null or 3 finite numbers, got {list(value)}")
    if cfg.preprocess.image_std is not None and min(cfg.preprocess.image_std) <= 0:
        raise ConfigError(f"preprocess.image_std must be > 0, got {list(cfg.preprocess.image_std)}")
    patch = cfg.preprocess.patch_multiple
    if cfg.preprocess.target_height % patch:
        raise ConfigError(
            f"preprocess.target_height={cfg.preprocess.target_height} is not a multiple of "
            f"preprocess.patch_multiple={patch} (the bottom rows would never be seen)"
        )
    if not cfg.preprocess.width_buckets or sorted(cfg.preprocess.width_buckets) != list(cfg.preprocess.width_buckets):
        raise ConfigError("preprocess.width_buckets must be a non-empty ascending list")
    model_patch = cfg.model.config.get("patch_size") if cfg.model.name_or_path is None else None
    if model_patch is not None:
        try:
            check_patch_geometry(model_patch, cfg.preprocess.target_height, patch, "model.config.patch_size",
                                 importlib.metadata.version("transformers"))
        except ValueError as err:
            raise ConfigError(str(err)) from None
        problem = position_table_problem(cfg.model.config.get("image_size", 224), model_patch,
                                         cfg.preprocess.target_height, cfg.preprocess.max_width)
        if problem is not None and problem[1]:
            raise ConfigError(problem[0])
        if problem is not None:
            log.warning("%s", problem[0])
    if cfg.model.name_or_path is None and not cfg.model.config:
        raise ConfigError("model.name_or_path is null and model.config is empty: nothing to build the image tower from")
    if cfg.text.name_or_path is None and not cfg.text.config:
        raise ConfigError("text.name_or_path is null and text.config is empty: nothing to build the text tower from")
    shards = cfg.data.format == "shards"
    if shards and not cfg.data.train_shards:
        raise ConfigError("data.format=shards needs data.train_shards (a dir written by lineclip.shard, its "
                          "shards.json, or a glob of .tar shards)")
    for key in [] if shards else ["data.train_manifest", "data.val_manifest"]:
        value = _get(cfg, key)
        if key == "data.train_manifest" and not value:
            raise ConfigError("data.train_manifest is required (e.g. data=openpecha data.train_manifest=..., or "
                              "data.dataset_dir=D holding D/train/meta/lines.jsonl)")
        if value and not os.access(value, os.R_OK):
            raise ConfigError(f"{key}={value} is not a readable file")
    if cfg.data.dataset_dir and not Path(cfg.data.dataset_dir).is_dir():
        raise ConfigError(f"data.dataset_dir={cfg.data.dataset_dir} is not a directory")
    shipped = str(cfg.model.init_from or "").startswith("lineclip:")  # bundle.SHIPPED_PREFIX, checked on load
    if cfg.model.init_from and not shipped and not Path(cfg.model.init_from).parent.is_dir():
        raise ConfigError(f"model.init_from={cfg.model.init_from}: no such run dir or bundle")
