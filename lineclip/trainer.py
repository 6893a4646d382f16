"""The training loop: one plain accelerate loop, readable top to bottom.

manifest -> LineDataset / BucketBatchSampler -> DualEncoder -> contrastive_loss -> AdamW, and every
`checkpoint_every_steps` a bundle; validation Recall@K every `eval_every_steps` and after the last step;
at the end the final bundle and the corpus embeddings.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast_object_list, set_seed
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import lineclip
from lineclip import artifacts
from lineclip.batch import (
    BucketBatchSampler,
    LineCollator,
    LineDataset,
    TrainTexts,
    count_truncated,
    encode_texts,
    group_keys,
    text_lengths,
    text_padding_fraction,
)
from lineclip.checkpoint import (
    TrainerState,
    claim_run_dir,
    load_training_state,
    resolve_resume,
    rotate_checkpoints,
    save_training_state,
    training_state_dir,
)
from lineclip.config import ConfigError, check_config
from lineclip.galleries import ValidationPlan, setting_name
from lineclip.loss import (
    ContrastiveOutput,
    contrastive_loss,
    gather_across_processes,
    mean_pairwise_cosine,
    sigmoid_loss,
)
from lineclip.manifest import LineRecord, ManifestError, read_manifest
from lineclip.metrics import retrieval_metrics, text_ids
from lineclip.preprocess import LineGeometry, LineImageTransform
from lineclip.reading import bag_loss, reading_loss
from lineclip.towers import (
    DualEncoder,
    Embeddings,
    ProjectionHead,
    build_image_backbone,
    build_image_processor,
    build_text_encoder,
    build_tokenizer,
)
from lineclip.tracking import log_metrics, start_metrics_file, start_tracking

log = logging.getLogger(__name__)

# Above this mean pairwise cosine the batch's embeddings are (nearly) one point: the contrastive loss sits at
# ln B with no gradient to leave it. Warned once a run; logged every log step as train/embedding_cosine.
COLLAPSE_COSINE = 0.99
COLLAPSE_WARNING = ("step %d: embeddings collapsing (mean pairwise cosine image %.3f, text %.3f > 0.99): every "
                    "line looks the same to the model and the loss cannot fall below ln(batch). Usual causes: a "
                    "from-scratch tower at too high an lr or logit scale; see README, Recipes (loss.reading_weight)")


# ---------------------------------------------------------------------------------------------- data


def text_ids_of(records: list[LineRecord]) -> torch.Tensor:
    """One integer per distinct normalised transcription: lines sharing a text are each other's positives."""
    return torch.as_tensor(text_ids([r.text for r in records]), dtype=torch.long)


class ShardedBatches:
    """Whole single-bucket batches dealt round-robin to processes; the list is padded by repeating its first
    batches so every process gets the same count (DDP needs equal step counts; a padded *batch* would
    mix buckets, so pad with whole batches)."""

    def __init__(self, sampler: BucketBatchSampler, rank: int, world_size: int) -> None:
        self.sampler, self.rank, self.world_size = sampler, rank, world_size
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """`skip`: batches of this epoch already consumed before a resume; they are not loaded again."""
        self.sampler.set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        batches = list(self.sampler)
        if self.world_size > 1 and batches:
            batches += batches[: (-len(batches)) % self.world_size]
        return iter(batches[self.rank :: self.world_size][self.skip :])

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.world_size)


def make_loader(dataset: LineDataset, batch_sampler: Any, collate: LineCollator, num_workers: int,
                seed: int = 0) -> DataLoader:
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        # Its own generator: starting an iterator must not draw from the global RNG, or a resumed run's
        # dropout masks would drift from the uninterrupted run's.
        generator=torch.Generator().manual_seed(seed),
    )


# --------------------------------------------------------------------------------------------- model


def build_model(cfg: DictConfig) -> tuple[DualEncoder, Any, Any]:
    """The towers from `model`/`text` (hub id, local dir or random init), or, with `model.init_from`, both towers,
    both heads and the logit scale of an earlier run (the spec's pretraining before domain adaptation)."""
    image_path, text_path = cfg.model.name_or_path, cfg.text.name_or_path
    init = None
    if cfg.model.init_from:
        from lineclip.encoder import check_bundle, resolve_bundle

        init = resolve_bundle(cfg.model.init_from)
        init_config = check_bundle(init)
        image_path, text_path = str(init.path(artifacts.BACKBONE)), str(init.path(artifacts.TEXT_ENCODER))
    attn = cfg.model.attn_implementation
    try:
        image_backbone = build_image_backbone(image_path, dict(cfg.model.config), cfg.model.trust_remote_code, attn)
        text_encoder = build_text_encoder(text_path, dict(cfg.text.config), cfg.text.trust_remote_code, attn)
    except Exception as exc:  # noqa: BLE001 - a damaged bundle of model.init_from: one line, not a traceback
        if init is None:
            raise
        from lineclip.encoder import BundleError

        first = (str(exc).strip().splitlines() or [""])[0]
        raise BundleError(f"model.init_from={cfg.model.init_from}: cannot load its towers: {type(exc).__name__}: "
                          f"{first}") from None
    patch = image_backbone.config.patch_size
    if patch != cfg.preprocess.patch_multiple:
        raise ConfigError(
            f"preprocess.patch_multiple={cfg.preprocess.patch_multiple} but the image tower's patch is {patch}")
    model = DualEncoder(
        image_backbone,
        text_encoder,
        projection_dim=cfg.model.projection_dim,
        temperature=cfg.loss.temperature,
        learnable_temperature=cfg.loss.learnable_temperature,
        max_logit_scale=cfg.loss.max_logit_scale,
        reading_frames_per_column=cfg.loss.reading_frames_per_column if cfg.loss.reading_weight > 0 else None,
        reading_bag=cfg.loss.bag_weight > 0,
        logit_bias=cfg.loss.logit_bias if cfg.loss.name == "siglip" else None,
    )
    if init is not None:
        from lineclip.encoder import BundleError

        for attr, entry in (("image_head", artifacts.IMAGE_HEAD), ("text_head", artifacts.TEXT_HEAD)):
            try:  # weights_only=True: a head that would need code to unpickle is refused, in one line
                setattr(model, attr, ProjectionHead.load(init.path(entry)))
            except Exception as exc:  # noqa: BLE001 - UnpicklingError, KeyError, RuntimeError, OSError ...
                first = (str(exc).strip().splitlines() or [""])[0]
                raise BundleError(f"model.init_from: cannot load {init.path(entry)}: {type(exc).__name__}: "
                                  f"{first}") from None
        if model.image_head.output_dim != cfg.model.projection_dim:
            raise ConfigError(f"model.init_from={cfg.model.init_from} has projection_dim "
                              f"{model.image_head.output_dim}; the config asks for {cfg.model.projection_dim}")
        if cfg.loss.learnable_temperature and init_config.get("logit_scale"):
            model.logit_scale.data.fill_(math.log(init_config["logit_scale"]))
        log.info("model.init_from: towers, heads and logit scale from %s", init.label)
    if cfg.model.freeze_backbone:
        model.image_backbone.requires_grad_(False)
    if cfg.text.freeze:
        model.text_encoder.requires_grad_(False)
    if cfg.model.gradient_checkpointing:
        model.image_backbone.gradient_checkpointing_enable()
        model.text_encoder.gradient_checkpointing_enable()
    processor = build_image_processor(image_path, cfg.preprocess.target_height)
    if cfg.preprocess.image_mean is not None:
        processor.image_mean = list(cfg.preprocess.image_mean)
    if cfg.preprocess.image_std is not None:
        processor.image_std = list(cfg.preprocess.image_std)
    return model, processor, build_tokenizer(text_path)


def param_groups(model: DualEncoder, cfg: DictConfig) -> list[dict[str, Any]]:
    """No weight decay on biases, norms and the logit scale (1-d tensors); lr multipliers per tower/head."""
    multipliers = {
        "image_backbone.": cfg.model.backbone_lr_multiplier,
        "image_head.": cfg.model.head_lr_multiplier,
        "text_encoder.": cfg.text.encoder_lr_multiplier,
        "text_head.": cfg.text.head_lr_multiplier,
        "reading_head.": cfg.model.head_lr_multiplier,
        "bag_head.": cfg.model.head_lr_multiplier,
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


# ---------------------------------------------------------------------------------------- embedding


@dataclass
class EmbeddedLines:
    image: torch.Tensor  # [N, D] float32, rows for the dataset indices below, in ascending index order
    text: torch.Tensor
    indices: torch.Tensor
    n_corrupt: int


@torch.inference_mode()
def embed_dataset(
    accelerator: Accelerator, model: torch.nn.Module, dataset: LineDataset, collate: LineCollator,
    batch_size: int, num_workers: int, with_text: bool = True,
) -> EmbeddedLines:
    """Embed every readable line once across all processes (batches dealt round-robin, never padded with
    repeats), then gather so every process holds all rows in dataset order."""
    sampler = BucketBatchSampler(dataset.buckets, batch_size, shuffle=False)
    batches = list(sampler)[accelerator.process_index :: accelerator.num_processes]
    loader = make_loader(dataset, batches, collate, num_workers)
    was_training = model.training
    model.eval()
    images, texts, indices, n_corrupt = [], [], [], 0
    for batch in loader:
        n_corrupt += batch["n_corrupt"]
        if len(batch["indices"]) == 0:
            continue
        out = model(
            pixel_values=batch["pixel_values"].to(accelerator.device, non_blocking=True),
            input_ids=batch["input_ids"].to(accelerator.device) if with_text else None,
            attention_mask=batch["attention_mask"].to(accelerator.device) if with_text else None,
        )
        images.append(out.image.float())
        if with_text:
            texts.append(out.text.float())
        indices.append(batch["indices"].to(accelerator.device))
    model.train(was_training)
    dim = accelerator.unwrap_model(model).image_head.output_dim
    empty = torch.empty(0, dim, device=accelerator.device)
    image = torch.cat(images) if images else empty
    text = torch.cat(texts) if texts else empty
    index = torch.cat(indices) if indices else torch.empty(0, dtype=torch.long, device=accelerator.device)
    # Ranks hold different counts: pad to the longest with index -1, gather, drop the padding, sort.
    image, text, index = (accelerator.pad_across_processes(t, dim=0, pad_index=-1) for t in (image, text, index))
    image, text, index = accelerator.gather((image, text, index))
    keep = index >= 0
    order = torch.argsort(index[keep])
    n_corrupt_total = int(accelerator.reduce(torch.tensor(n_corrupt, device=accelerator.device), "sum"))
    return EmbeddedLines(
        image=image[keep][order].cpu(),
        text=text[keep][order].cpu() if with_text else torch.empty(0),
        indices=index[keep][order].cpu(),
        n_corrupt=n_corrupt_total,
    )


@torch.inference_mode()
def embed_texts(accelerator: Accelerator, model: torch.nn.Module, texts: list[str], cfg: DictConfig) -> torch.Tensor:
    """[len(texts), D] float32 text embeddings on the CPU, computed on every process alike (the unwrapped model:
    no collective, so processes need not agree on anything)."""
    raw = accelerator.unwrap_model(model)
    was_training = raw.training
    raw.eval()
    out = torch.empty(len(texts), raw.image_head.output_dim)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i].encode("utf-8")))  # similar lengths together
    size = eval_batch_size(cfg)
    for start in range(0, len(order), size):
        rows = order[start : start + size]
        input_ids, attention_mask, _ = encode_texts([texts[i] for i in rows], cfg.text.max_length)
        with accelerator.autocast():
            emb = raw.encode_text(input_ids.to(accelerator.device), attention_mask.to(accelerator.device))
        out[rows] = emb.float().cpu()
    raw.train(was_training)
    return out


def validation_plan(records: list[LineRecord], cfg: DictConfig) -> ValidationPlan:
    """What validation scores besides the whole gallery (trainer.val_gallery_by, trainer.val_phrases)."""
    low, high = cfg.trainer.val_phrase_syllables
    plan = ValidationPlan.build(records, list(cfg.trainer.val_gallery_by), cfg.trainer.val_phrases,
                                cfg.trainer.val_phrase_seed, low, high, levels=cfg.trainer.val_levels)
    skipped = [key for key in cfg.trainer.val_gallery_by if setting_name(key) not in plan.groups]
    if skipped:
        log.info("validation: no val line has %s; no within-group metrics for it", ", ".join(skipped))
    return plan


def validate(accelerator, model, dataset, collate, text_ids, cfg,
             plan: ValidationPlan | None = None) -> dict[str, float]:
    """Whole-gallery Recall@K/MRR (`val_t2i_r1`, ...) and, with a plan, within-group (`val_page_t2i_r1`, ...)
    and phrase-query (`val_phrase_t2i_r1`, ...) metrics. The plan's reference levels (`plan.levels()`, for the
    lines actually embedded) are computed on the first call and kept in `plan.embedded_levels`."""
    emb = embed_dataset(accelerator, model, dataset, collate, eval_batch_size(cfg), cfg.data.num_workers)
    metrics = retrieval_metrics(emb.image, emb.text, text_ids[emb.indices])
    if plan is not None:
        lines = plan.restrict(emb.indices.numpy())
        phrase_emb = embed_texts(accelerator, model, lines.phrases, cfg) if lines.phrases else None
        metrics.update(lines.metrics(emb.image, emb.text, phrase_emb))
        if cfg.trainer.val_levels:
            plan.embedded_levels = {f"val_{k}": v for k, v in lines.levels().items()}
    return {f"val_{k}": v for k, v in metrics.items()}


def eval_batch_size(cfg: DictConfig) -> int:
    return cfg.data.eval_batch_size or cfg.data.batch_size


# -------------------------------------------------------------------------------------------- train


def load_lines(cfg: DictConfig) -> tuple[list[LineRecord], list[LineRecord], dict[str, Any]]:
    def read(path: str):
        return read_manifest(path, cfg.data.dataset_dir, cfg.data.on_bad_row, cfg.data.max_text_bytes)

    train_records, train_report = read(cfg.data.train_manifest)
    val_records, report = [], {"train": train_report.to_dict()}
    if cfg.data.val_manifest:
        val_records, val_report = read(cfg.data.val_manifest)
        report["val"] = val_report.to_dict()
    truncated = count_truncated((r.text for r in train_records), cfg.text.max_length)
    report["train_truncated_texts"] = truncated
    report["train_truncated_share"] = truncated / max(1, len(train_records))
    if truncated:
        log.warning("text: %d of %d train transcriptions exceed text.max_length=%d bytes and are truncated",
                    truncated, len(train_records), cfg.text.max_length)
    return train_records, val_records, report


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


class TrainingDiverged(RuntimeError):
    """Too many non-finite losses in a row; the last good checkpoint is kept."""


def image_problems(dataset: LineDataset, cfg: DictConfig, split: str) -> dict[str, int]:
    """Count the lines whose image headers are unreadable or empty; in error mode, stop at the first."""
    counts = {"unreadable_image": 0, "empty_image": 0, "too_large_image": 0}
    for index, kind in sorted(dataset.image_problems.items()):
        if cfg.data.on_bad_row == "error":
            record = dataset.records[index]
            raise ManifestError(f"{record.source}: {kind} ({record.image_path})")
        counts[kind] += 1
    if any(counts.values()):
        log.warning("%s: skipping %s", split, ", ".join(f"{k}={v}" for k, v in counts.items() if v))
    return counts


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


def _reading_term(out: Embeddings, batch: dict[str, Any], weights: tuple[float, float]) -> torch.Tensor | None:
    """The weighted auxiliary reading losses (CTC over patch columns, bag of characters), or None when off."""
    terms = []
    if out.reading_logits is not None:
        terms.append(weights[0] * reading_loss(out.reading_logits, batch["reading_targets"],
                                               batch["reading_lengths"]))
    if out.bag_logits is not None:
        terms.append(weights[1] * bag_loss(out.bag_logits, batch["reading_targets"], batch["reading_lengths"]))
    return torch.stack(terms).sum() if terms else None


def batch_positives(text_ids: torch.Tensor | TrainTexts, indices: torch.Tensor, gather: bool,
                    device: torch.device) -> torch.Tensor:
    """What the loss takes as positives for the lines `indices` (this process's part of the contrastive batch):
    their text ids, or with TrainTexts the [N, N] matrix of the whole batch, built from every process's
    indices (gathered in rank order, the order in which the loss gathers the embeddings)."""
    if isinstance(text_ids, torch.Tensor):
        return text_ids[indices].to(device)
    if gather:
        indices = gather_across_processes(indices.to(device))[0]
    return text_ids.positives(indices.cpu()).to(device)


def pair_loss(image: torch.Tensor, text: torch.Tensor, positives: torch.Tensor, scale: torch.Tensor,
              bias: torch.Tensor | None, gather: bool) -> ContrastiveOutput:
    """InfoNCE, or the sigmoid loss for a model with a logit bias (loss=siglip)."""
    if bias is None:
        return contrastive_loss(image, text, positives, scale, gather=gather)
    return sigmoid_loss(image, text, positives, scale, bias, gather=gather)


def grad_cache_step(accelerator: Accelerator, model: torch.nn.Module, batches: list[dict[str, Any]],
                    text_ids: torch.Tensor | TrainTexts, gather: bool,
                    reading_weights: tuple[float, float] = (0.0, 0.0)) -> StepOutput:
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
    positives = batch_positives(text_ids, torch.cat([b["indices"] for b in batches]), gather, device)
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
               text_ids: torch.Tensor | TrainTexts, gather: bool, grad_cache: bool,
               reading_weights: tuple[float, float] = (0.0, 0.0)) -> StepOutput:
    """Forward and backward of one optimizer step (no optimizer call): gradient caching turns the micro-batches
    into one contrastive batch; otherwise their gradients are summed (accumulation: no extra negatives).
    `text_ids`: per dataset index, the id of its text (identical texts are positives), or a TrainTexts."""
    if grad_cache:
        return grad_cache_step(accelerator, model, micro_batches, text_ids, gather, reading_weights)
    for i, batch in enumerate(micro_batches):
        # All-reduce once, on the last micro-batch.
        sync = contextlib.nullcontext() if i == len(micro_batches) - 1 else accelerator.no_sync(model)
        with sync:
            out = model(**to_device(batch, accelerator.device))
            positives = batch_positives(text_ids, batch["indices"], gather, accelerator.device)
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


def train(cfg: DictConfig) -> TrainResult:
    """Train one run into `cfg.output_dir` (Hydra's run dir)."""
    check_config(cfg)
    launched_world = int(os.environ.get("WORLD_SIZE", "1"))
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
    resume_from = resolve_resume(cfg.trainer.resume, output_dir) if cfg.trainer.resume else None
    claim_run_dir(output_dir, cfg.trainer.resume, resume_from, cfg.trainer.overwrite, accelerator.is_main_process)
    accelerator.wait_for_everyone()
    set_seed(cfg.trainer.seed)
    rank, world = accelerator.process_index, accelerator.num_processes

    # ---- data
    train_records, val_records, data_report = load_lines(cfg)
    model, image_processor, tokenizer = build_model(cfg)
    geometry = LineGeometry(cfg.preprocess.target_height, cfg.preprocess.max_width,
                            tuple(cfg.preprocess.width_buckets), cfg.preprocess.patch_multiple)
    mean, std = tuple(image_processor.image_mean), tuple(image_processor.image_std)
    crop = cfg.text.max_length if cfg.data.crop_to_text else None
    pixels = cfg.data.max_image_pixels or 0  # null: no limit of lineclip's own
    train_set = LineDataset(train_records, LineImageTransform(cfg.preprocess.pipeline, geometry, mean, std,
                                                              augment=cfg.data.augment), crop_to_text_bytes=crop,
                            max_image_pixels=pixels)
    eval_transform = LineImageTransform(cfg.preprocess.pipeline, geometry, mean, std, augment=False)
    data_report["train"]["skipped"].update(image_problems(train_set, cfg, "train"))
    val_set = LineDataset(val_records, eval_transform, crop_to_text_bytes=crop,
                          max_image_pixels=pixels) if val_records else None
    if val_set is not None:
        data_report["val"]["skipped"].update(image_problems(val_set, cfg, "val"))
    collate = LineCollator(cfg.text.max_length, reading=cfg.loss.reading_weight > 0 or cfg.loss.bag_weight > 0)
    span = cfg.data.text_span
    # With crop_to_text the image shows only the text that fits text.max_length: phrases come from that part.
    shown = [r.text.encode()[: cfg.text.max_length - 1].decode(errors="ignore") if crop else r.text
             for r in train_records]
    train_texts = TrainTexts(shown, span.p, span.min_syllables, span.max_syllables, cfg.trainer.seed)
    val_ids = text_ids_of(val_records) if val_records else None
    val_plan = validation_plan(val_records, cfg) if val_records else None
    text_lengths_ = text_lengths((r.text for r in train_records), cfg.text.max_length)
    groups = None
    if cfg.data.group_batches_by:
        groups = group_keys(train_records, cfg.data.group_batches_by)
        if (groups < 0).all():
            raise ConfigError(f"data.group_batches_by={cfg.data.group_batches_by}: no train line has that field")
    bucketed = BucketBatchSampler(train_set.buckets, cfg.data.batch_size, shuffle=True, seed=cfg.trainer.seed,
                                  lengths=text_lengths_ if cfg.data.text_bucket_bytes else None,
                                  text_bucket_bytes=cfg.data.text_bucket_bytes or 64, groups=groups,
                                  min_batch_size=min(cfg.data.min_batch_size, cfg.data.batch_size))
    data_report["train_lines_dropped_per_epoch"] = bucketed.n_dropped
    if bucketed.n_dropped:
        log.info("data.min_batch_size=%d: %d lines an epoch fall in bucket tails that small and are left out "
                 "(shuffled: mostly different ones each epoch)", cfg.data.min_batch_size, bucketed.n_dropped)
    data_report["text_padding_fraction"] = text_padding_fraction(list(bucketed), text_lengths_)
    log.info("text padding: %.1f%% of the text positions of an epoch", 100 * data_report["text_padding_fraction"])
    sampler = ShardedBatches(bucketed, rank, world)
    loader = make_loader(train_set, sampler, collate, cfg.data.num_workers, cfg.trainer.seed)

    # ---- model, optimizer, schedule
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
    steps_per_epoch = max(1, len(sampler) // micro_per_step)
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
    schedule = {"steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "warmup_steps": warmup,
                "eval_every_steps": eval_every, "checkpoint_every_steps": cfg.trainer.checkpoint_every_steps,
                "micro_batches_per_step": micro_per_step, "progress_bar_total": total_steps}

    state = TrainerState()
    if resume_from is not None:
        # model, optimizer, scheduler, scaler, this process's RNG: no pickle (lineclip.checkpoint)
        state = load_training_state(resume_from, accelerator, model, optimizer, scheduler,
                                    strict=cfg.trainer.resume_strict, n_lines=len(train_records))
        log.info("resumed from %s at step %d (epoch %d, batch %d of it)", resume_from.name, state.step,
                 state.epoch, state.batches_done_in_epoch)
    start_tracking(accelerator, cfg, output_dir, resuming=resume_from is not None)
    if accelerator.is_main_process:
        start_metrics_file(output_dir, state.step)
    log.info("%d train lines, %d val lines; %d processes x batch %d (x%d micro-batches a step); %d steps "
             "(%d per epoch), warmup %d; negatives: %s", len(train_records), len(val_records), world,
             cfg.data.batch_size, micro_per_step, total_steps, steps_per_epoch, warmup,
             "global batch (gathered)" if gather else "local batch")

    corrupt = torch.zeros(len(train_records), dtype=torch.bool)
    corrupt[state.corrupt_indices] = True

    def training_config(step: int) -> dict[str, Any]:
        return {
            **artifacts.workbench_keys(cfg),
            **{k: state.val_metrics.get(k) for k in ("val_i2t_r1", "val_t2i_r1")},
            "val_metrics": state.val_metrics,
            "val_history": state.val_history,
            "global_step": step,
            "world_size": world,
            "global_batch_size": cfg.data.batch_size * world * micro_per_step,
            "contrastive_batch_size": cfg.data.batch_size * (world if gather else 1) * (grad_cache or 1),
            "seed": cfg.trainer.seed,
            "lineclip_version": lineclip.__version__,
            "schedule": schedule,
            "bad_steps_skipped": state.bad_steps,
            "logit_scale": float(accelerator.unwrap_model(model).scale().detach()),
            "crop_to_text": bool(cfg.data.crop_to_text),
            "data_report": {**data_report, "corrupt_images_skipped": len(state.corrupt_indices)},
            "config": OmegaConf.to_container(cfg, resolve=True),
        }

    def save_checkpoint() -> None:
        """The bundle and the training state under one prefix, renamed into place config-last."""
        prefix = artifacts.checkpoint_prefix(state.step)
        state.checkpoints = sorted({*state.checkpoints, state.step})
        state.corrupt_indices = sync_corrupt()
        if accelerator.is_main_process:
            artifacts.staging_dir(output_dir, prefix, reset=True)
        accelerator.wait_for_everyone()
        staging = artifacts.staging_dir(output_dir, prefix)
        try:
            # every process writes its RNG state
            save_training_state(training_state_dir(staging), accelerator, model, optimizer, scheduler)
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                state.save(training_state_dir(staging))
                artifacts.save_bundle(output_dir, prefix, accelerator.unwrap_model(model), image_processor,
                                      tokenizer, training_config(state.step),
                                      extra_entries=(training_state_dir(staging).name,))
                if cfg.trainer.keep_last_checkpoints:
                    rotate_checkpoints(output_dir, cfg.trainer.keep_last_checkpoints)
        except BaseException as exc:
            if accelerator.is_main_process:  # a full disk leaves no half-written staging dir behind
                artifacts.remove_staging(staging)
            error = artifacts.as_write_error(exc, f"checkpoint {prefix} in {output_dir}")
            if error is None:
                raise
            raise error from exc
        accelerator.wait_for_everyone()

    def sync_corrupt() -> list[int]:
        merged = accelerator.reduce(corrupt.to(accelerator.device, torch.int32), "max") if world > 1 else corrupt
        return torch.nonzero(merged.cpu()).flatten().tolist()

    # SIGTERM (SLURM pre-emption, spot VMs): finish the step in flight, checkpoint, exit cleanly.
    stop_requested = False

    def request_stop(signum, frame):  # noqa: ARG001
        nonlocal stop_requested
        stop_requested = True

    previous_handler = signal.signal(signal.SIGTERM, request_stop)

    # ---- the loop
    bar = tqdm(total=total_steps, initial=state.step, desc="train",
               disable=not (accelerator.is_main_process and cfg.trainer.progress_bar))
    postfix: dict[str, str] = {}
    pending: list[dict[str, Any]] = []  # micro-batches of the current grad-cache step
    bad_in_a_row, interrupted, collapse_warned = 0, False, False
    t_last, samples_since = time.perf_counter(), 0
    model.train()
    while state.step < total_steps and not interrupted:
        sampler.set_epoch(state.epoch, skip=state.batches_done_in_epoch)
        train_texts.set_epoch(state.epoch)
        for batch in loader:
            state.batches_done_in_epoch += 1
            corrupt[batch["corrupt_indices"]] = True
            if batch["corrupt_indices"] and cfg.data.on_bad_row == "error":
                record = train_records[batch["corrupt_indices"][0]]
                raise ManifestError(f"{record.source}: corrupt_image ({record.image_path})")
            # A batch whose every image was corrupt: all processes skip it together (DDP needs matching steps).
            if any_rank(accelerator, len(batch["indices"]) == 0)[0]:
                continue
            samples_since += len(batch["indices"]) * world
            pending.append(train_texts.encode(batch, cfg.text.max_length))
            if len(pending) < micro_per_step:
                continue
            result = train_step(accelerator, model, pending, train_texts, gather, grad_cache=bool(grad_cache),
                                reading_weights=(cfg.loss.reading_weight, cfg.loss.bag_weight))
            pending = []
            # A non-finite loss (on any process) skips the whole step; too many in a row stop the run.
            non_finite, stop_now = any_rank(accelerator, not torch.isfinite(result.loss).item(), stop_requested)
            if non_finite:
                optimizer.zero_grad(set_to_none=True)
                state.bad_steps += 1
                bad_in_a_row += 1
                log.warning("non-finite loss at step %d: step skipped (%d in a row)", state.step + 1, bad_in_a_row)
                if bad_in_a_row >= cfg.trainer.max_bad_steps:
                    raise TrainingDiverged(
                        f"{bad_in_a_row} non-finite losses in a row at step {state.step + 1} "
                        f"(trainer.max_bad_steps={cfg.trainer.max_bad_steps}); last good checkpoint: "
                        f"{state.checkpoints[-1] if state.checkpoints else 'none'}. Lower optim.lr or try bf16")
                continue
            bad_in_a_row = 0
            if cfg.optim.grad_clip:
                accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            state.step += 1
            step = state.step
            bar.update(1)
            lr = scheduler.get_last_lr()[0]
            contrastive = result.contrastive
            postfix.update(loss=f"{result.loss.item():.3f}", i2t=f"{contrastive.i2t_accuracy.item():.2f}",
                           t2i=f"{contrastive.t2i_accuracy.item():.2f}", lr=f"{lr:.2e}")
            if result.reading is not None:
                postfix["read"] = f"{result.reading.item():.2f}"
            cosine = max(result.image_cosine.item(), result.text_cosine.item())
            if cosine > COLLAPSE_COSINE and not collapse_warned:
                collapse_warned = True
                log.warning(COLLAPSE_WARNING, step, result.image_cosine.item(), result.text_cosine.item())
            bar.set_postfix(postfix, refresh=False)
            if step % cfg.trainer.log_every_steps == 0 or step == total_steps:
                now = time.perf_counter()
                log_metrics(accelerator, output_dir, {
                    "train/loss": result.loss.item(), "train/i2t": contrastive.i2t_accuracy.item(),
                    "train/t2i": contrastive.t2i_accuracy.item(), "train/lr": lr,
                    "train/embedding_cosine": cosine, "train/embedding_cosine_image": result.image_cosine.item(),
                    "train/embedding_cosine_text": result.text_cosine.item(),
                    **({"train/reading_loss": result.reading.item()} if result.reading is not None else {}),
                    "train/logit_scale": accelerator.unwrap_model(model).scale().item(),
                    **logit_bias_log(accelerator.unwrap_model(model)),
                    "train/epoch": state.epoch, "train/bad_steps": state.bad_steps,
                    "train/samples_per_s": samples_since / max(now - t_last, 1e-9)}, step)
                t_last, samples_since = now, 0
            if val_set is not None and (step % eval_every == 0 or step == total_steps):
                state.val_metrics = validate(accelerator, model, val_set, collate, val_ids, cfg, val_plan)
                state.val_history.append({"step": step, "train_loss": result.loss.item(), **state.val_metrics})
                m = state.val_metrics
                log.info("step %d/%d: loss %.3f; val t2i R@1/5/10 %.3f/%.3f/%.3f, i2t %.3f/%.3f/%.3f%s", step,
                         total_steps, result.loss.item(), m["val_t2i_r1"], m["val_t2i_r5"], m["val_t2i_r10"],
                         m["val_i2t_r1"], m["val_i2t_r5"], m["val_i2t_r10"],
                         "".join(f"; {name} t2i R@1/10 {m[f'val_{name}_t2i_r1']:.3f}/{m[f'val_{name}_t2i_r10']:.3f}"
                                 for name in [*val_plan.groups, "phrase"] if f"val_{name}_t2i_r1" in m))
                # The levels (chance, collection-only, length-only) are constants: logged with every validation,
                # so that W&B draws them next to the curves, but kept once (data_report), not in val_history.
                data_report["val_levels"] = val_plan.embedded_levels
                log_metrics(accelerator, output_dir, {**state.val_metrics, **val_plan.embedded_levels}, step)
                postfix.update({"vi2t@1": f"{state.val_metrics['val_i2t_r1']:.3f}",
                                "vt2i@1": f"{state.val_metrics['val_t2i_r1']:.3f}"})
                bar.set_postfix(postfix)
            if step < total_steps and (step % cfg.trainer.checkpoint_every_steps == 0 or stop_now):
                save_checkpoint()
            if stop_now and step < total_steps:
                log.warning("SIGTERM: stopped at step %d after writing %s; continue with trainer.resume=latest",
                            step, artifacts.checkpoint_prefix(step))
                interrupted = True
                break
            if step >= total_steps:
                break
        else:  # the epoch ran out
            state.epoch += 1
            state.batches_done_in_epoch = 0
    bar.close()
    signal.signal(signal.SIGTERM, previous_handler)

    state.corrupt_indices = sync_corrupt()
    if state.corrupt_indices:
        log.warning("skipped %d corrupt line images while training", len(state.corrupt_indices))
    if not interrupted:
        emb = None
        if cfg.trainer.export_embeddings:
            corpus = LineDataset(train_records, eval_transform, max_image_pixels=pixels)
            emb = embed_dataset(accelerator, model, corpus, collate, eval_batch_size(cfg), cfg.data.num_workers,
                                with_text=False)
            data_report["export_skipped_images"] = len(train_records) - len(emb.indices)
        if accelerator.is_main_process:
            # Corpus, data report and bundle are staged together and renamed in config-last: all or nothing.
            staging = artifacts.staging_dir(output_dir, "", reset=True)
            extra, corpus_info = [artifacts.DATA_REPORT], None
            try:
                if emb is not None:
                    kept = [train_records[i] for i in emb.indices.tolist()]
                    artifacts.save_corpus_embeddings(staging, emb.image.numpy(), kept)
                    extra += [artifacts.EMBEDDINGS, artifacts.EMBEDDINGS_META]
                    corpus_info = {"n_lines": len(kept)}
                (staging / artifacts.DATA_REPORT).write_text(json.dumps(
                    {**data_report, "corrupt_images_skipped": len(state.corrupt_indices),
                     "bad_steps_skipped": state.bad_steps}, indent=2, ensure_ascii=False))
            except BaseException as exc:
                artifacts.remove_staging(staging)
                error = artifacts.as_write_error(exc, f"the final corpus in {output_dir}")
                if error is None:
                    raise
                raise error from exc
            artifacts.save_bundle(output_dir, "", accelerator.unwrap_model(model), image_processor, tokenizer,
                                  training_config(state.step), extra_entries=tuple(extra), corpus=corpus_info)
        accelerator.wait_for_everyone()
    for tracker in accelerator.trackers:  # not end_training(): that also tears down the process group,
        tracker.finish()                  # which the caller (a test, a sweep) may still need
    return TrainResult(output_dir, state.val_metrics, schedule, state.checkpoints, world,
                       accelerator.unwrap_model(model), interrupted=interrupted, bad_steps=state.bad_steps,
                       val_history=state.val_history)
