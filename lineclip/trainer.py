"""The training loop: one plain accelerate loop, readable top to bottom.

`train` reads setup -> loop -> finish: `setup_run` (accelerator, run dir, resume point), `load_lines` and
`build_data` (lineclip.data), `build_model`, `build_optimization` (AdamW, schedule), a `Checkpointer`
(lineclip.checkpoint: the TrainerState, checkpoints, SIGTERM); then the loop (`train_step` per optimizer step,
`skip_step` when its loss is not finite, `StepLog` for what a step shows and validation Recall@K every
`eval_every_steps` via lineclip.validation, a bundle every `checkpoint_every_steps`); at the end `finish`: the
final bundle and the corpus embeddings.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast_object_list, set_seed
from omegaconf import DictConfig, OmegaConf

import lineclip
from lineclip import artifacts, bundle
from lineclip.batch import TrainTexts
from lineclip.bundle import BundleError, BundleRef, check_bundle, resolve_bundle
from lineclip.checkpoint import (
    Checkpointer,
    ResumeError,
    TrainerState,
    TrainingDiverged,
    claim_run_dir,
    lock_run_dir,
    release_run_dirs,
    resolve_resume,
)
from lineclip.config import ConfigError, check_config, command_line_keys, manifests_from_layout
from lineclip.data import TrainData, build_data, load_lines
from lineclip.files import first_line, usable_cpus
from lineclip.galleries import ValidationPlan
from lineclip.lines import LineTable
from lineclip.loss import (
    ContrastiveOutput,
    contrastive_loss,
    gather_across_processes,
    mean_pairwise_cosine,
    sigmoid_loss,
)
from lineclip.manifest import ManifestError
from lineclip.patches import check_patch_geometry, position_table_problem
from lineclip.progress import Progress
from lineclip.reading import (
    NO_READING,
    READING_HEAD_CONFIG,
    ReadingWeights,
    bag_loss,
    byte_texts,
    reading_loss,
    reading_targets,
)
from lineclip.towers import (
    DualEncoder,
    Embeddings,
    build_image_backbone,
    build_image_processor,
    build_text_encoder,
    build_tokenizer,
)
from lineclip.tracking import RunPanels, Throughput, finish_tracking, log_metrics, start_metrics_file, start_tracking
from lineclip.validation import eval_batch_size, export_corpus, validate

log = logging.getLogger(__name__)

# Above this mean pairwise cosine the batch's embeddings are (nearly) one point: the contrastive loss sits at
# ln B with no gradient to leave it. Warned once a run, when COLLAPSE_STEPS steps in a row are above it: one batch
# of look-alike lines is not a collapse (a random-init tower already gives 0.97-0.98, and the demo's one batch
# of near-identical lines an epoch reached 0.990 with its backbone frozen). Logged as train/embedding_cosine.
COLLAPSE_COSINE = 0.99
COLLAPSE_STEPS = 5
COLLAPSE_WARNING = ("step %d: embeddings collapsing (mean pairwise cosine image %.3f, text %.3f > 0.99 for "
                    f"{COLLAPSE_STEPS} steps in a row): every line looks the same to the model and the loss cannot "
                    "fall below ln(batch). Usual causes: a from-scratch tower at too high an lr or logit scale; see "
                    "README, Recipes (loss.reading_weight)")


class CollapseWatch:
    """`update(cosine)` once a step: True once, on the COLLAPSE_STEPS-th step in a row above COLLAPSE_COSINE."""

    def __init__(self) -> None:
        self.run, self.warned = 0, False

    def update(self, cosine: float) -> bool:
        self.run = self.run + 1 if cosine > COLLAPSE_COSINE else 0
        if self.run >= COLLAPSE_STEPS and not self.warned:
            self.warned = True
            return True
        return False


# --------------------------------------------------------------------------------------------- model


def config_not_used(wanted: dict[str, Any], loaded: Any) -> str:
    """The keys of a composed tower config that a loaded tower's config contradicts, as `key=wanted (tower's)`."""
    def plain(value: Any) -> Any:
        return list(value) if isinstance(value, tuple) else value

    return ", ".join(f"{k}={v} ({plain(getattr(loaded, k))})" for k, v in wanted.items()
                     if hasattr(loaded, k) and plain(getattr(loaded, k)) != plain(v))


def build_model(cfg: DictConfig) -> tuple[DualEncoder, Any, Any]:
    """The towers from `model`/`text` (hub id, local dir or random init), or, with `model.init_from`, both towers,
    both heads and the logit scale of an earlier run (the spec's pretraining before domain adaptation)."""
    image_path, text_path = cfg.model.name_or_path, cfg.text.name_or_path
    attn = cfg.model.attn_implementation
    init = resolve_bundle(cfg.model.init_from) if cfg.model.init_from else None
    if init is None:
        # Plain containers: transformers' strict config fields refuse an OmegaConf list (a strip's patch_size).
        image_config, text_config = (OmegaConf.to_container(c, resolve=True)
                                     for c in (cfg.model.config, cfg.text.config))
        image_backbone = build_image_backbone(image_path, image_config, cfg.model.trust_remote_code, attn)
        text_encoder = build_text_encoder(text_path, text_config, cfg.text.trust_remote_code, attn)
    else:
        init_config = check_bundle(init)
        image_path, text_path = str(init.path(bundle.BACKBONE)), str(init.path(bundle.TEXT_ENCODER))
        try:
            image_backbone, text_encoder = bundle.load_towers(init, cfg.model.config, cfg.text.config,
                                                              cfg.model.trust_remote_code, attn)
        except BundleError as err:
            raise BundleError(f"model.init_from={cfg.model.init_from}: {err}") from None
        for key, wanted, tower in (("model.config", cfg.model.config, image_backbone),
                                   ("text.config", cfg.text.config, text_encoder)):
            unused = config_not_used(OmegaConf.to_container(wanted, resolve=True), tower.config)
            if unused:
                log.warning("model.init_from: the towers are the bundle's; %s differs from them and is not used "
                            "(%s): choose the bundle's tower or drop init_from", key, unused)
    try:
        check_patch_geometry(image_backbone.config.patch_size, cfg.preprocess.target_height,
                             cfg.preprocess.patch_multiple, "the image tower's patch_size")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    problem = position_table_problem(image_backbone.config.image_size, image_backbone.config.patch_size,
                                     cfg.preprocess.target_height, cfg.preprocess.max_width)
    if problem is not None and (init is not None or image_path):  # a random-init tower was checked in the config
        log.warning("%s", problem[0])
    model = DualEncoder(
        image_backbone,
        text_encoder,
        projection_dim=cfg.model.projection_dim,
        temperature=cfg.loss.temperature,
        learnable_temperature=cfg.loss.learnable_temperature,
        max_logit_scale=cfg.loss.max_logit_scale,
        reading_frames_per_column=cfg.loss.reading_frames_per_column if cfg.loss.reading_weight > 0 else None,
        reading_bag=cfg.loss.bag_weight > 0,
        text_bag=cfg.loss.text_bag_weight > 0,
        bag_parts=sum(cfg.loss.bag_levels),
        logit_bias=cfg.loss.logit_bias if cfg.loss.name == "siglip" else None,
    )
    if init is not None:
        # Loaded after the model is built, as before: the fresh heads' draws keep the global RNG stream (and so
        # the reading heads' init and every dropout mask) where a run with init_from has always had it.
        try:
            model.image_head, model.text_head = bundle.load_heads(init)
        except BundleError as err:
            raise BundleError(f"model.init_from: {err}") from None
        if model.image_head.output_dim != cfg.model.projection_dim:
            raise ConfigError(f"model.init_from={cfg.model.init_from} has projection_dim "
                              f"{model.image_head.output_dim}; the config asks for {cfg.model.projection_dim}")
        if cfg.loss.learnable_temperature and init_config.get("logit_scale"):
            model.logit_scale.data.fill_(math.log(init_config["logit_scale"]))
        log.info("model.init_from: towers, heads and logit scale from %s", init.label)
        _init_reading_head(model, init)
    if cfg.model.freeze_backbone:
        model.image_backbone.requires_grad_(False)
    if cfg.text.freeze:
        model.text_encoder.requires_grad_(False)
    if cfg.model.gradient_checkpointing:
        model.image_backbone.gradient_checkpointing_enable()
        model.text_encoder.gradient_checkpointing_enable()
    # A bundle's (or a hub id's) tokenizer or processor that is damaged, foreign (BertTokenizer) or not JSON:
    # transformers raises anything from ValueError to JSONDecodeError; one line naming the dir.
    where = f"model.init_from={cfg.model.init_from}: " if init is not None else ""
    error = BundleError if init is not None else ConfigError
    try:
        processor = build_image_processor(image_path, cfg.preprocess.target_height)
    except Exception as exc:  # noqa: BLE001
        raise error(f"{where}cannot load the image processor of {image_path}: {first_line(exc)}") from None
    try:
        tokenizer = build_tokenizer(text_path)
    except Exception as exc:  # noqa: BLE001
        raise error(f"{where}cannot load the tokenizer of {text_path}: {first_line(exc)}") from None
    if cfg.preprocess.image_mean is not None:
        processor.image_mean = list(cfg.preprocess.image_mean)
    if cfg.preprocess.image_std is not None:
        processor.image_std = list(cfg.preprocess.image_std)
    return model, processor, tokenizer


def _init_reading_head(model: DualEncoder, init: BundleRef) -> None:
    """Start the CTC reading head from the one saved beside the init bundle (lineclip.reading.save_reading_head),
    when it was trained with that bundle and has this run's frames per column: a stage 2 from a reader that
    restarted its head would first spend its steps relearning what the tower already reads."""
    # A head is saved beside a run's final bundle only (prefix ""), never beside its checkpoints.
    if model.reading_head is None or init.prefix:
        return
    head, why = bundle.reading_head_beside(init)
    if head is None and not why:
        return
    if head is None or head.frames_per_column != model.reading_head.frames_per_column:
        log.warning("model.init_from: reading head starts fresh: %s",
                    why or f"the saved head has {head.frames_per_column} frames per column, the run "
                           f"{model.reading_head.frames_per_column} (loss.reading_frames_per_column)")
        return
    model.reading_head.load_state_dict(head.state_dict())
    log.info("model.init_from: reading head from %s", init.directory / READING_HEAD_CONFIG)


def param_groups(model: DualEncoder, cfg: DictConfig) -> list[dict[str, Any]]:
    """No weight decay on biases, norms and the logit scale (1-d tensors); lr multipliers per tower/head."""
    multipliers = {
        "image_backbone.": cfg.model.backbone_lr_multiplier,
        "image_head.": cfg.model.head_lr_multiplier,
        "text_encoder.": cfg.text.encoder_lr_multiplier,
        "text_head.": cfg.text.head_lr_multiplier,
        "reading_head.": cfg.model.head_lr_multiplier,
        "bag_head.": cfg.model.head_lr_multiplier,
        "text_bag_head.": cfg.text.head_lr_multiplier,
        "logit_scale": cfg.loss.logit_scale_lr_multiplier,
        "logit_bias": 1.0,
    }
    groups: dict[tuple[float, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        mult = next(m for prefix, m in multipliers.items() if name.startswith(prefix))
        decay = param.ndim >= 2
        groups.setdefault((mult, decay), []).append(param)
    return [
        {"params": ps, "lr": cfg.optim.lr * mult, "weight_decay": cfg.optim.weight_decay if decay else 0.0}
        for (mult, decay), ps in groups.items()
    ]


def lr_lambda(warmup: int, total: int, schedule: str, min_ratio: float):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "cosine":
            return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        if schedule == "linear":
            return min_ratio + (1 - min_ratio) * (1 - progress)
        return 1.0

    return factor


@dataclass
class Optimization:
    """The optimizer, its lr scheduler and the step schedule they follow (counted from this process's share of
    the batches), and how a step's contrastive batch is formed."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    total_steps: int
    steps_per_epoch: int
    warmup: int
    micro_per_step: int  # micro-batches per optimizer step (grad-cache chunks or accumulation steps)
    gather: bool  # negatives from all processes' batches
    grad_cache: int
    eval_every: int
    checkpoint_every: int

    @property
    def schedule(self) -> dict[str, int]:
        return {"steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
                "warmup_steps": self.warmup, "eval_every_steps": self.eval_every,
                "checkpoint_every_steps": self.checkpoint_every, "micro_batches_per_step": self.micro_per_step,
                "progress_bar_total": self.total_steps}


def build_optimization(cfg: DictConfig, model: DualEncoder, accelerator: Accelerator,
                       batches_per_epoch: int) -> tuple[torch.nn.Module, Optimization]:
    """AdamW over `param_groups`, the towers compiled if asked, both prepared by accelerate (the returned model
    is the wrapped one), and the warmup + decay schedule for `batches_per_epoch` per-process batches."""
    world = accelerator.num_processes
    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                  eps=cfg.optim.eps)
    if cfg.trainer.compile:
        # In place (nn.Module.compile), so state_dict keys and save_pretrained stay as they are.
        model.image_backbone.compile()
        model.text_encoder.compile()
    model, optimizer = accelerator.prepare(model, optimizer)
    gather = cfg.loss.gather if cfg.loss.gather is not None else world > 1
    grad_cache = cfg.trainer.grad_cache_chunks
    # Step counts from the *sharded* per-process batch count, so warmup and totals are right on N processes.
    micro_per_step = grad_cache or cfg.trainer.gradient_accumulation_steps
    steps_per_epoch = max(1, batches_per_epoch // micro_per_step)
    total_steps = cfg.trainer.max_steps or steps_per_epoch * cfg.trainer.epochs
    warmup = cfg.optim.warmup_steps
    if warmup >= total_steps:
        warmup = max(1, total_steps // 10)
        log.warning("optim.warmup_steps=%d is not below the run's %d steps; warming up for %d steps instead",
                    cfg.optim.warmup_steps, total_steps, warmup)
    # Not passed to accelerator.prepare (that would step it once per process per step); the training state
    # carries it (lineclip.checkpoint).
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(warmup, total_steps, cfg.optim.schedule, cfg.optim.min_lr_ratio))
    eval_every = cfg.trainer.eval_every_steps or cfg.trainer.checkpoint_every_steps
    return model, Optimization(optimizer, scheduler, total_steps, steps_per_epoch, warmup, micro_per_step, gather,
                               grad_cache, eval_every, cfg.trainer.checkpoint_every_steps)


# -------------------------------------------------------------------------------------------- train


@dataclass
class TrainResult:
    output_dir: Path
    val_metrics: dict[str, float]
    schedule: dict[str, int]  # steps_per_epoch, total_steps, warmup_steps, eval/checkpoint intervals
    checkpoint_steps: list[int]
    world_size: int
    model: DualEncoder  # unwrapped, on the training device
    interrupted: bool = False  # stopped by SIGTERM after writing a checkpoint: resume with trainer.resume=latest
    bad_steps: int = 0
    val_history: list[dict[str, float]] | None = None

    @property
    def objective(self) -> float:
        """What sweeps maximise: the final validation text->image Recall@1."""
        return float(self.val_metrics.get("val_t2i_r1", float("nan")))


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    keys = ("pixel_values", "input_ids", "attention_mask")
    return {k: batch[k].to(device, non_blocking=True) for k in keys}


@dataclass
class StepOutput:
    """What one optimizer step's forward reports: the contrastive loss (what the loop checks for finiteness
    and logs as train/loss), the weighted reading losses when on, and how spread out the batch's embeddings are."""

    contrastive: ContrastiveOutput
    reading: torch.Tensor | None
    image_cosine: torch.Tensor
    text_cosine: torch.Tensor

    @property
    def loss(self) -> torch.Tensor:
        return self.contrastive.loss


def _reading_term(out: Embeddings, batch: dict[str, Any], weights: ReadingWeights) -> torch.Tensor | None:
    """The weighted auxiliary reading losses (CTC over patch columns, the bags of characters of either tower), or
    None when off."""
    terms = []
    if out.reading_logits is not None:
        terms.append(weights.ctc * reading_loss(out.reading_logits, batch["reading_targets"],
                                                batch["reading_lengths"]))
    if out.bag_logits is not None:
        terms.append(weights.bag * bag_loss(out.bag_logits, batch["reading_targets"], batch["reading_lengths"],
                                            weights.bag_levels))
    if out.text_bag_logits is not None:
        # the text the text tower saw: a phrase where data.text_span cut one, not the line the image shows
        targets, lengths = reading_targets(byte_texts(batch["input_ids"], batch["attention_mask"]))
        terms.append(weights.text_bag * bag_loss(out.text_bag_logits, targets, lengths, weights.bag_levels))
    return torch.stack(terms).sum() if terms else None


def batch_positives(texts: TrainTexts | None, batches: list[dict[str, Any]], gather: bool,
                    device: torch.device) -> torch.Tensor:
    """What the loss takes as positives for the lines of `batches` (this process's part of the contrastive batch):
    without TrainTexts the collator's `text_ids` (identical transcriptions are positives); with TrainTexts the
    [N, N] matrix of the whole batch, built from every process's indices (gathered in rank order, the order in
    which the loss gathers the embeddings)."""
    if texts is None:
        return torch.cat([b["text_ids"] for b in batches]).to(device)
    indices = torch.cat([b["indices"] for b in batches])
    if gather:
        indices = gather_across_processes(indices.to(device))[0]
    return texts.positives(indices.cpu()).to(device)


def pair_loss(image: torch.Tensor, text: torch.Tensor, positives: torch.Tensor, scale: torch.Tensor,
              bias: torch.Tensor | None, gather: bool) -> ContrastiveOutput:
    """InfoNCE, or the sigmoid loss for a model with a logit bias (loss=siglip)."""
    if bias is None:
        return contrastive_loss(image, text, positives, scale, gather=gather)
    return sigmoid_loss(image, text, positives, scale, bias, gather=gather)


def grad_cache_step(accelerator: Accelerator, model: torch.nn.Module, batches: list[dict[str, Any]],
                    train_texts: TrainTexts | None, gather: bool,
                    reading_weights: ReadingWeights = NO_READING) -> StepOutput:
    """One contrastive batch of k micro-batches in the memory of one (gradient caching, Gao et al. 2021):
    embed all k without a graph, take the loss over all k*m pairs and its gradient w.r.t. the embeddings,
    then re-run each micro-batch with a graph and push those cached gradients through the towers. The
    reading loss is per line, so it is simply added on the re-run."""
    device = accelerator.device
    raw = accelerator.unwrap_model(model)
    rng_states, images, texts = [], [], []
    with torch.no_grad(), accelerator.autocast():
        for batch in batches:
            rng_states.append(torch.get_rng_state())  # the re-run must see the same dropout masks
            out = raw(**to_device(batch, device))
            images.append(out.image)
            texts.append(out.text)
    image = torch.cat(images).requires_grad_(True)
    text = torch.cat(texts).requires_grad_(True)
    scale = raw.scale().detach().requires_grad_(True)
    bias = raw.logit_bias.detach().clone().requires_grad_(True) if raw.logit_bias is not None else None
    positives = batch_positives(train_texts, batches, gather, device)
    result = pair_loss(image, text, positives, scale, bias, gather)
    result.loss.backward()
    start, readings = 0, []
    for i, batch in enumerate(batches):
        rows = slice(start, start + len(batch["indices"]))
        start = rows.stop
        torch.set_rng_state(rng_states[i])
        # Gradients are all-reduced once, on the last micro-batch.
        sync = contextlib.nullcontext() if i == len(batches) - 1 else accelerator.no_sync(model)
        with sync:
            out = model(**to_device(batch, device))
            surrogate = ((out.image * image.grad[rows]).sum() + (out.text * text.grad[rows]).sum()
                         + out.logit_scale * scale.grad / len(batches))
            if bias is not None:
                surrogate = surrogate + out.logit_bias * bias.grad / len(batches)
            reading = _reading_term(out, batch, reading_weights)
            if reading is not None:
                surrogate = surrogate + reading / len(batches)
                readings.append(reading.detach())
            accelerator.backward(surrogate)
    return StepOutput(result, torch.stack(readings).mean() if readings else None,
                      mean_pairwise_cosine(image.detach()), mean_pairwise_cosine(text.detach()))


def train_step(accelerator: Accelerator, model: torch.nn.Module, micro_batches: list[dict[str, Any]],
               train_texts: TrainTexts | None, gather: bool, grad_cache: bool,
               reading_weights: ReadingWeights = NO_READING) -> StepOutput:
    """Forward and backward of one optimizer step (no optimizer call): gradient caching turns the micro-batches
    into one contrastive batch; otherwise their gradients are summed (accumulation: no extra negatives).
    `train_texts`: None (positives: the batches' own text_ids), or the TrainTexts that say which are positives."""
    if grad_cache:
        return grad_cache_step(accelerator, model, micro_batches, train_texts, gather, reading_weights)
    for i, batch in enumerate(micro_batches):
        # All-reduce once, on the last micro-batch.
        sync = contextlib.nullcontext() if i == len(micro_batches) - 1 else accelerator.no_sync(model)
        with sync:
            out = model(**to_device(batch, accelerator.device))
            positives = batch_positives(train_texts, [batch], gather, accelerator.device)
            result = pair_loss(out.image, out.text, positives, out.logit_scale, out.logit_bias, gather)
            reading = _reading_term(out, batch, reading_weights)
            total = result.loss if reading is None else result.loss + reading
            # Always backward, even a non-finite loss: every process must join the all-reduce; the caller
            # then skips the step on all of them.
            accelerator.backward(total / len(micro_batches))
    return StepOutput(result, None if reading is None else reading.detach(),
                      mean_pairwise_cosine(out.image.detach()), mean_pairwise_cosine(out.text.detach()))


def logit_bias_log(model: DualEncoder) -> dict[str, float]:
    return {} if model.logit_bias is None else {"train/logit_bias": model.logit_bias.item()}


def any_rank(accelerator: Accelerator, *flags: bool) -> list[bool]:
    """Each flag, true if it is true on any process (one small all-reduce for all of them)."""
    if accelerator.num_processes == 1:
        return list(flags)
    summed = accelerator.reduce(torch.tensor([int(f) for f in flags], device=accelerator.device), "sum")
    return [bool(v > 0) for v in summed.tolist()]


# How launchers tell a process the number of processes: torchrun (and accelerate's torchrun path), then MPI's.
_WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def launched_world_size() -> int:
    """The number of processes the launcher started; a launch that asked for more but started one is refused.

    `accelerate launch --num_processes 2` without `--multi_gpu` (or a config whose distributed_type is MULTI_CPU)
    starts ONE process through its "simple" launcher, which expects mpirun to start the rest; it still sets
    MASTER_ADDR (only when more than one process was asked for) and ACCELERATE_USE_CPU, but no world size. That
    process would train alone while the user believes two gather each other's negatives."""
    for var in _WORLD_SIZE_VARS:
        if os.environ.get(var):
            return int(os.environ[var])
    if "ACCELERATE_USE_CPU" in os.environ and "MASTER_ADDR" in os.environ:
        raise ConfigError("accelerate launch asked for several processes but started one (without --multi_gpu it "
                          "expects mpirun to start the others): on CPUs use --config_file launch/cpu_2proc.yaml, "
                          "on GPUs --multi_gpu or launch/single_node_multi_gpu.yaml, or torchrun "
                          "(README, Multi-GPU)")
    return 1


def setup_run(cfg: DictConfig) -> tuple[Accelerator, Path, Path | None]:
    """The accelerator (checked against the launcher), the run dir every process writes to, claimed for this run,
    and the training state to resume from (None: a fresh start). Seeds every generator."""
    for key, path in manifests_from_layout(cfg, command_line_keys()).items():
        log.info("%s: %s (the layout under data.dataset_dir)", key, path)
    if cfg.data.num_workers > usable_cpus():  # more would only contend (and PyTorch warns about each loader)
        log.info("data.num_workers=%d is more than the %d CPUs this process may use: %d loader workers",
                 cfg.data.num_workers, usable_cpus(), usable_cpus())
        cfg.data.num_workers = usable_cpus()
    check_config(cfg)
    launched_world = launched_world_size()
    accelerator = Accelerator(
        # Without this, accelerate treats torchrun workers on a CPU-only machine as N independent runs.
        cpu=launched_world > 1 and not torch.cuda.is_available(),
        mixed_precision=cfg.trainer.mixed_precision,
        log_with="wandb" if cfg.logger.name == "wandb" else None,
    )
    if accelerator.num_processes != launched_world:
        raise ConfigError(f"launched with WORLD_SIZE={launched_world} but accelerate set up "
                          f"{accelerator.num_processes} process(es): the processes would train separate models")
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise ConfigError(f"{accelerator.distributed_type} is not supported: lineclip trains with DDP "
                          "(see README, Multi-GPU)")
    # Under `accelerate launch`, every process composes its own Hydra run dir (timestamps can differ by a
    # second): all of them write where the main process says.
    output_dir = Path(broadcast_object_list([str(cfg.output_dir or "outputs/run")])[0])
    output_dir.mkdir(parents=True, exist_ok=True)
    # The main process claims the dir (a flock held for the run's life) before anything in it is read; every
    # process learns whether it did, so that none is left waiting for a main process that stopped.
    refused = None
    if accelerator.is_main_process:
        try:
            lock_run_dir(output_dir)
        except ResumeError as exc:
            refused = str(exc)
    refused = broadcast_object_list([refused])[0]
    if refused is not None:
        raise ResumeError(refused)
    resume_from = resolve_resume(cfg.trainer.resume, output_dir) if cfg.trainer.resume else None
    claim_run_dir(output_dir, cfg.trainer.resume, resume_from, cfg.trainer.overwrite, accelerator.is_main_process)
    # Only now: a refused run must not overwrite the record of the run it found. A resume writes it once its
    # training state is accepted (train), since the state may still be refused.
    if accelerator.is_main_process and resume_from is None:
        artifacts.write_launch_record(output_dir, cfg)
        log.info("run dir: %s", output_dir.resolve())  # the one place a run says where everything goes
    accelerator.wait_for_everyone()
    if cfg.trainer.cpu_threads and accelerator.device.type == "cpu":
        torch.set_num_threads(cfg.trainer.cpu_threads)
    set_seed(cfg.trainer.seed)
    return accelerator, output_dir, resume_from


def process_age() -> float | None:
    """Seconds since this process started (/proc; None where there is none)."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            started = int(stat.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
            return float(uptime.read().split()[0]) - started
    except (OSError, ValueError, IndexError):
        return None


class StartupClock:
    """Where the time to the first batch goes, phase by phase (the "start-up phases" line of train.log): the
    imports before `train` (from the process start), then each lap; lineclip.sizes adds its own phases (parse,
    header scan, cache write or read) into `phases`, and they are not counted again in the lap around them."""

    def __init__(self) -> None:
        age = process_age()
        self.phases: dict[str, float] = {"imports": age} if age is not None else {}
        self.own = set(self.phases)
        self.inner = 0.0  # seconds of the phases added by others so far
        self.last = time.perf_counter()
        self.resident: dict[str, int] = {"imports": resident_mb()}

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        inner = sum(seconds for name, seconds in self.phases.items() if name not in self.own)
        self.phases[phase] = self.phases.get(phase, 0.0) + (now - self.last) - (inner - self.inner)
        self.own.add(phase)
        self.inner, self.last = inner, now
        self.resident[phase] = resident_mb()

    def summary(self) -> str:
        parts = [f"{name}={seconds:.1f}" for name, seconds in self.phases.items()]
        age = process_age()
        if age is not None:
            parts.append(f"total={age:.1f}")
        memory = ", ".join(f"{name}={mb}" for name, mb in self.resident.items() if mb >= 0)
        return f"start-up phases (s): {', '.join(parts)}\nresident MB after each phase: {memory}; " \
               f"peak {resident_mb('VmHWM')}"


def resident_mb(field: str = "VmRSS") -> int:
    """This process's resident set (or its peak, VmHWM) in MB from /proc; -1 where there is none."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError):
        pass
    return -1


def train(cfg: DictConfig) -> TrainResult:
    """Train one run into `cfg.output_dir` (Hydra's run dir): setup, the loop, the final artifacts. The run dir's
    claim (setup_run) is released when the run ends, however it ends."""
    try:
        return _train(cfg)
    finally:
        release_run_dirs()


def _train(cfg: DictConfig) -> TrainResult:
    # ---- setup: run dir, data, model, optimizer and schedule, checkpointer, tracking
    startup = StartupClock()
    accelerator, output_dir, resume_from = setup_run(cfg)
    startup.lap("run setup")
    world = accelerator.num_processes
    train_records, val_records, data_report = load_lines(cfg, output_dir, accelerator.is_main_process,
                                                         accelerator.wait_for_everyone, timings=startup.phases)
    startup.lap("other line checks")
    model, image_processor, tokenizer = build_model(cfg)
    startup.lap("model build")
    data = build_data(cfg, train_records, val_records, data_report, image_processor, accelerator.process_index,
                      world)
    startup.lap("bucketing")
    model, opt = build_optimization(cfg, model, accelerator, len(data.sampler))
    total_steps = opt.total_steps
    checkpointer = Checkpointer(cfg, accelerator, output_dir, model, opt.optimizer, opt.scheduler, image_processor,
                                tokenizer, len(train_records), run_info(cfg, world, opt), data_report)
    if resume_from is not None:
        checkpointer.resume(resume_from, len(data.sampler))
        if accelerator.is_main_process:  # only once the state is accepted: a refused resume leaves the run's record
            artifacts.write_launch_record(output_dir, cfg)
    state = checkpointer.state
    start_tracking(accelerator, cfg, output_dir, resuming=resume_from is not None)
    panels = RunPanels(accelerator, cfg, output_dir, data, resuming=resume_from is not None)
    if accelerator.is_main_process:
        start_metrics_file(output_dir, state.step)
    log.info("%d train lines, %d val lines; %d processes x batch %d (x%d micro-batches a step); %d steps "
             "(%d per epoch), warmup %d; negatives: %s", len(train_records), len(val_records), world,
             cfg.data.batch_size, opt.micro_per_step, total_steps, opt.steps_per_epoch, opt.warmup,
             "global batch (gathered)" if opt.gather else "local batch")
    startup.lap("optimizer and tracking")

    # ---- the loop: one optimizer step per opt.micro_per_step readable batches; validation, checkpoints on schedule
    shown = StepLog(accelerator, cfg, output_dir, model, total_steps, state.step)
    pending: list[dict[str, Any]] = []  # micro-batches of the current grad-cache step
    bad_in_a_row, interrupted = 0, False
    reading_weights = ReadingWeights.from_loss(cfg.loss)
    model.train()
    with checkpointer.stop_on_sigterm():
        while state.step < total_steps and not interrupted:
            data.sampler.set_epoch(state.epoch, skip=state.batches_done_in_epoch)
            data.train_texts.set_epoch(state.epoch)
            whole_epoch, readable_batches = state.batches_done_in_epoch == 0, 0
            for batch in shown.throughput.batches(data.loader):
                if startup is not None:  # the loader's workers started and the first batch decoded
                    startup.lap("first batch")
                    log.info("%s", startup.summary())
                    startup = None
                state.batches_done_in_epoch += 1
                if not readable(batch, accelerator, checkpointer, train_records, cfg.data.on_bad_row):
                    continue
                readable_batches += 1
                shown.throughput.samples += len(batch["indices"]) * world
                pending.append(data.train_texts.encode(batch, cfg.text.max_length))
                panels.log_inputs(pending[-1], state.step)
                if len(pending) < opt.micro_per_step:
                    continue
                result = train_step(accelerator, model, pending, data.train_texts, opt.gather,
                                    grad_cache=bool(opt.grad_cache),
                                    reading_weights=reading_weights)
                pending = []
                # A non-finite loss (on any process) skips the whole step; too many in a row stop the run.
                non_finite, stop_now = any_rank(accelerator, not torch.isfinite(result.loss).item(),
                                                checkpointer.stop_requested)
                if non_finite:
                    bad_in_a_row = skip_step(opt, state, bad_in_a_row + 1, cfg.trainer.max_bad_steps)
                    continue
                bad_in_a_row = 0
                optimizer_step(accelerator, model, opt, cfg.optim.grad_clip)
                state.step += 1
                step = state.step
                shown.step(step, result, opt.scheduler.get_last_lr()[0], state)
                if data.val_set is not None and (step % opt.eval_every == 0 or step == total_steps):
                    shown.validation(step, result.loss.item(), state, data, panels, data_report)
                if step < total_steps and (step % cfg.trainer.checkpoint_every_steps == 0 or stop_now):
                    checkpointer.save()
                    panels.log_bundle(bundle.checkpoint_prefix(step), step)
                if stop_now and step < total_steps:
                    log.warning("SIGTERM: stopped at step %d after writing %s; continue with trainer.resume=latest",
                                step, bundle.checkpoint_prefix(step))
                    interrupted = True
                    break
                if step >= total_steps:
                    break
            else:  # the epoch ran out
                next_epoch(state, whole_epoch and readable_batches == 0, checkpointer, len(train_records))
        shown.bar.close()

    # ---- finish: the final bundle with the corpus embeddings and the data report
    finish(cfg, accelerator, model, data, checkpointer, panels, data_report, output_dir, interrupted)
    return TrainResult(output_dir, state.val_metrics, opt.schedule, state.checkpoints, world,
                       accelerator.unwrap_model(model), interrupted=interrupted, bad_steps=state.bad_steps,
                       val_history=state.val_history)


def run_info(cfg: DictConfig, world: int, opt: Optimization) -> dict[str, Any]:
    """What the run's bundles record of how it was run (batch sizes as the loss saw them, seed, schedule)."""
    return {
        "world_size": world,
        "global_batch_size": cfg.data.batch_size * world * opt.micro_per_step,
        "contrastive_batch_size": cfg.data.batch_size * (world if opt.gather else 1) * (opt.grad_cache or 1),
        "seed": cfg.trainer.seed,
        "lineclip_version": lineclip.__version__,
        "schedule": opt.schedule,
    }


def readable(batch: dict[str, Any], accelerator: Accelerator, checkpointer: Checkpointer, records: LineTable,
             on_bad_row: str) -> bool:
    """Counts the batch's corrupt images (data.on_bad_row=error: stops at the first); False when no process has a
    readable image in it: all processes skip it together (DDP needs matching steps)."""
    checkpointer.corrupt[batch["corrupt_indices"]] = True
    if batch["corrupt_indices"] and on_bad_row == "error":
        record = records[batch["corrupt_indices"][0]]
        raise ManifestError(f"{record.source}: corrupt_image ({record.image_path})")
    return not any_rank(accelerator, len(batch["indices"]) == 0)[0]


def skip_step(opt: Optimization, state: TrainerState, bad_in_a_row: int, max_bad_steps: int) -> int:
    """A step with a non-finite loss: its gradients dropped and counted; `max_bad_steps` in a row end the run
    (TrainingDiverged). Returns the count in a row (`bad_in_a_row`, this one included)."""
    opt.optimizer.zero_grad(set_to_none=True)
    state.bad_steps += 1
    log.warning("non-finite loss at step %d: step skipped (%d in a row)", state.step + 1, bad_in_a_row)
    if bad_in_a_row >= max_bad_steps:
        raise TrainingDiverged(
            f"{bad_in_a_row} non-finite losses in a row at step {state.step + 1} "
            f"(trainer.max_bad_steps={max_bad_steps}); last good checkpoint: "
            f"{state.checkpoints[-1] if state.checkpoints else 'none'}. Lower optim.lr or try bf16")
    return bad_in_a_row


def optimizer_step(accelerator: Accelerator, model: torch.nn.Module, opt: Optimization, grad_clip: float) -> None:
    if grad_clip:
        accelerator.clip_grad_norm_(model.parameters(), grad_clip)
    opt.optimizer.step()
    opt.optimizer.zero_grad(set_to_none=True)
    opt.scheduler.step()


def next_epoch(state: TrainerState, nothing_read: bool, checkpointer: Checkpointer, n_lines: int) -> None:
    """The epoch ran out: on to the next, unless a whole epoch had no image that decodes (epochs would spin)."""
    if nothing_read:
        n_corrupt = len(checkpointer.sync_corrupt())  # a collective: every process is here
        raise ManifestError(f"epoch {state.epoch} had no line image that decodes ({n_corrupt} of "
                            f"{n_lines} train lines are corrupt_image): nothing to train on")
    state.epoch += 1
    state.batches_done_in_epoch = 0


class StepLog:
    """What the loop shows of each optimizer step: the bar (or its log lines) and its postfix, the collapse
    warning (once a run), the train/* metrics every trainer.log_every_steps; and each validation's results."""

    def __init__(self, accelerator: Accelerator, cfg: DictConfig, output_dir: Path, model: torch.nn.Module,
                 total_steps: int, step: int) -> None:
        # A bar on a terminal, log lines every 10% otherwise; and after the first logged steps, the time to go.
        self.bar = Progress(total_steps, initial=step, desc="train", unit="step",
                            enabled=accelerator.is_main_process and cfg.trainer.progress_bar,
                            first_at=cfg.trainer.log_every_steps)
        self.throughput = Throughput(step)
        self.accelerator, self.cfg, self.output_dir, self.model = accelerator, cfg, output_dir, model
        self.total_steps = total_steps
        self.postfix: dict[str, str] = {}
        self.collapse = CollapseWatch()

    def step(self, step: int, result: StepOutput, lr: float, state: TrainerState) -> None:
        self.bar.update(1)
        contrastive = result.contrastive
        self.postfix.update(loss=f"{result.loss.item():.3f}", i2t=f"{contrastive.i2t_accuracy.item():.2f}",
                            t2i=f"{contrastive.t2i_accuracy.item():.2f}", lr=f"{lr:.2e}")
        if result.reading is not None:
            self.postfix["read"] = f"{result.reading.item():.2f}"
        cosine = max(result.image_cosine.item(), result.text_cosine.item())
        if self.collapse.update(cosine):
            log.warning(COLLAPSE_WARNING, step, result.image_cosine.item(), result.text_cosine.item())
        self.bar.set_postfix(self.postfix, refresh=False)
        if step % self.cfg.trainer.log_every_steps == 0 or step == self.total_steps:
            model = self.accelerator.unwrap_model(self.model)
            log_metrics(self.accelerator, self.output_dir, {
                "train/loss": result.loss.item(), "train/i2t": contrastive.i2t_accuracy.item(),
                "train/t2i": contrastive.t2i_accuracy.item(), "train/lr": lr,
                "train/embedding_cosine": cosine, "train/embedding_cosine_image": result.image_cosine.item(),
                "train/embedding_cosine_text": result.text_cosine.item(),
                **({"train/reading_loss": result.reading.item()} if result.reading is not None else {}),
                "train/logit_scale": model.scale().item(), **logit_bias_log(model),
                "train/epoch": state.epoch, "train/bad_steps": state.bad_steps,
                **self.throughput.metrics(step)}, step)

    def validation(self, step: int, loss: float, state: TrainerState, data: TrainData, panels: RunPanels,
                   data_report: dict[str, Any]) -> None:
        """Validation Recall@K (lineclip.validation) into the state's history, the log, the metrics and the bar."""
        state.val_metrics = validate(self.accelerator, self.model, data.val_set, data.collate, data.val_ids, self.cfg,
                                     data.val_plan, on_ranked=panels.validation(step))
        state.val_history.append({"step": step, "train_loss": loss, **state.val_metrics})
        log_validation(step, self.total_steps, loss, state.val_metrics, data.val_plan)
        # The levels (chance, collection-only, length-only) are constants: logged with every validation, so that
        # W&B draws them next to the curves, but kept once (data_report), not in val_history.
        data_report["val_levels"] = data.val_plan.embedded_levels
        log_metrics(self.accelerator, self.output_dir, {**state.val_metrics, **data.val_plan.embedded_levels}, step)
        self.postfix.update({"vi2t@1": f"{state.val_metrics['val_i2t_r1']:.3f}",
                             "vt2i@1": f"{state.val_metrics['val_t2i_r1']:.3f}"})
        self.bar.set_postfix(self.postfix)


def finish(cfg: DictConfig, accelerator: Accelerator, model: torch.nn.Module, data: TrainData,
           checkpointer: Checkpointer, panels: RunPanels, data_report: dict[str, Any], output_dir: Path,
           interrupted: bool) -> None:
    """The run's end: the corrupt images counted; unless stopped by SIGTERM, the corpus embeddings (exported by
    every process, merged by the main one) and the final bundle; then the trackers closed."""
    state, train_records = checkpointer.state, data.train_records
    state.corrupt_indices = checkpointer.sync_corrupt()
    if state.corrupt_indices:
        log.warning("skipped %d corrupt line images while training", len(state.corrupt_indices))
    if not interrupted:
        corpus = None
        if cfg.trainer.export_embeddings:  # each process writes its rows; the main process merges them
            corpus = export_corpus(accelerator, model, data.corpus(), data.collate, eval_batch_size(cfg),
                                   cfg.data.num_workers, output_dir / artifacts.CORPUS_EXPORT,
                                   progress=cfg.trainer.progress_bar)
            if corpus is not None:
                data_report["export_skipped_images"] = len(train_records) - len(corpus.indices)
        checkpointer.save_final(corpus, train_records)
        panels.log_bundle("", state.step)
        if accelerator.is_main_process:
            log.info("done: the bundle, corpus and logs are in %s (use it as run_dir= of evaluate, index, search, "
                     "serve)", output_dir.resolve())
    panels.close()
    finish_tracking(accelerator)


def log_validation(step: int, total_steps: int, loss: float, m: dict[str, float], plan: ValidationPlan) -> None:
    log.info("step %d/%d: loss %.3f; val t2i R@1/5/10 %.3f/%.3f/%.3f, i2t %.3f/%.3f/%.3f%s", step,
             total_steps, loss, m["val_t2i_r1"], m["val_t2i_r5"], m["val_t2i_r10"],
             m["val_i2t_r1"], m["val_i2t_r5"], m["val_i2t_r10"],
             "".join(f"; {name} t2i R@1/10 {m[f'val_{name}_t2i_r1']:.3f}/{m[f'val_{name}_t2i_r10']:.3f}"
                     for name in [*plan.groups, "phrase"] if f"val_{name}_t2i_r1" in m)
             + (f"; reading CER {m['val_cer']:.3f}, read+match t2i R@1/10 {m['val_read_t2i_r1']:.3f}/"
                f"{m['val_read_t2i_r10']:.3f}" if "val_cer" in m else ""))
