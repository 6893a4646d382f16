"""Run under `torchrun --standalone --nproc_per_node 2` (gloo, CPU) by tests/test_distributed.py.

    python checks.py train OUT_DIR [hydra overrides...]   # a real training run, then cross-rank checks
    python checks.py grads OUT_DIR                         # 2 x B with gathered negatives vs 1 x 2B
    python checks.py export OUT_DIR                        # the corpus export: per-process parts, merged

Each rank writes OUT_DIR/<mode>_rank<r>.json; the test reads them.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from lineclip.batch import LineCollator, LineDataset
from lineclip.config import asset_dir, compose
from lineclip.data import text_ids_of
from lineclip.loss import contrastive_loss, sigmoid_loss
from lineclip.manifest import read_manifest
from lineclip.metrics import retrieval_metrics
from lineclip.preprocess import IMAGENET_MEAN, IMAGENET_STD, LineGeometry, LineImageTransform
from lineclip.trainer import build_model, grad_cache_step, train

# The tiny random towers (the demo's default is the shipped reader): these checks are about the mechanics
TINY = ["model=dinov2_tiny", "text=byt5_tiny"]


def flat_params(model):
    return torch.cat([p.detach().float().flatten() for p in model.parameters()])


def all_ranks(t):
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return parts


@torch.inference_mode()
def single_process_val_metrics(model, cfg):
    """Embed every val line one at a time in this process alone: the reference for gathered validation."""
    records, _ = read_manifest(cfg.data.val_manifest, cfg.data.dataset_dir)
    geometry = LineGeometry(cfg.preprocess.target_height, cfg.preprocess.max_width,
                            tuple(cfg.preprocess.width_buckets), cfg.preprocess.patch_multiple)
    # the pixel normalisation the run used: the config's (the demo's paper-white one), else the processor's ImageNet
    mean = tuple(cfg.preprocess.image_mean) if cfg.preprocess.image_mean is not None else IMAGENET_MEAN
    std = tuple(cfg.preprocess.image_std) if cfg.preprocess.image_std is not None else IMAGENET_STD
    dataset = LineDataset(records, LineImageTransform(cfg.preprocess.pipeline, geometry, mean, std))
    collate = LineCollator(cfg.text.max_length)
    model.eval()
    images, texts = [], []
    for i in range(len(dataset)):
        batch = collate([dataset[i]])
        out = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"])
        images.append(out.image)
        texts.append(out.text)
    metrics = retrieval_metrics(torch.cat(images), torch.cat(texts), text_ids_of(records))
    return {f"val_{k}": v for k, v in metrics.items()}


def check_train(out_dir: Path, overrides):
    cfg = compose("train", [*TINY, f"output_dir={out_dir / 'run'}", *overrides])
    result = train(cfg)
    params = flat_params(result.model)
    report = {
        "rank": dist.get_rank(),
        "world_size": dist.get_world_size(),
        "trainer_world_size": result.world_size,
        "schedule": result.schedule,
        "checkpoints": result.checkpoint_steps,
        "val_metrics": result.val_metrics,
        "param_count": params.numel(),
        "param_max_abs_diff_across_ranks": max(float((p - params).abs().max()) for p in all_ranks(params)),
        "logit_scale": float(result.model.logit_scale),
    }
    if dist.get_rank() == 0:
        report["single_process_val_metrics"] = single_process_val_metrics(result.model, cfg)
    (out_dir / f"train_rank{dist.get_rank()}.json").write_text(json.dumps(report, indent=2))


def check_grads(out_dir: Path, per_rank: int = 4):
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    accelerator = Accelerator(cpu=True)
    cfg = compose("train", [*TINY, "data.num_workers=0"])
    demo = asset_dir("demo")
    records, _ = read_manifest(demo / "train" / "meta" / "lines.jsonl", demo)
    dataset = LineDataset(records, LineImageTransform("bdrc", LineGeometry()))
    bucket = int(torch.as_tensor(dataset.buckets).mode().values)
    rows = [i for i in range(len(dataset)) if dataset.buckets[i] == bucket][: 2 * per_rank]
    batch = LineCollator(cfg.text.max_length)([dataset[i] for i in rows])
    ids = text_ids_of([records[i] for i in rows])

    def build():
        set_seed(0)
        model, _, _ = build_model(cfg)
        return model.eval()  # no dropout: the two computations must see the same function

    reference = build()
    model = accelerator.prepare(build())
    rank = accelerator.process_index
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    out = model(pixel_values=batch["pixel_values"][mine], input_ids=batch["input_ids"][mine],
                attention_mask=batch["attention_mask"][mine])
    loss = contrastive_loss(out.image, out.text, ids[mine], out.logit_scale, gather=True).loss
    accelerator.backward(loss)
    global_loss = accelerator.reduce(loss.detach(), "mean")
    grads = {n: p.grad.clone() for n, p in accelerator.unwrap_model(model).named_parameters() if p.grad is not None}

    # Reference: one process, one batch of 2B, plain (local) loss.
    ref_out = reference(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                        attention_mask=batch["attention_mask"])
    ref_loss = contrastive_loss(ref_out.image, ref_out.text, ids, ref_out.logit_scale, gather=False).loss
    ref_loss.backward()
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    # Gradient caching on top: each rank's B rows as 2 micro-batches of B/2, one contrastive batch of 2B.
    model.zero_grad(set_to_none=True)
    micro = [{"pixel_values": batch["pixel_values"][rows], "input_ids": batch["input_ids"][rows],
              "attention_mask": batch["attention_mask"][rows], "indices": torch.arange(2 * per_rank)[rows],
              "text_ids": ids[rows]}
             for rows in (slice(mine.start, mine.start + per_rank // 2), slice(mine.start + per_rank // 2, mine.stop))]
    cached = grad_cache_step(accelerator, model, micro, None, gather=True)
    cached_loss = accelerator.reduce(cached.loss.detach(), "mean")
    cached_grads = {n: p.grad.clone() for n, p in accelerator.unwrap_model(model).named_parameters()
                    if p.grad is not None}
    report = {
        "rank": rank,
        "loss_grad_cache": float(cached_loss),
        "grad_cache_max_abs_diff": max(float((cached_grads[n] - ref_grads[n]).abs().max()) for n in ref_grads),
        "loss_2xB": float(global_loss),
        "loss_1x2B": float(ref_loss.detach()),
        "grad_names_equal": sorted(grads) == sorted(ref_grads),
        "n_grads": len(grads),
        "grad_max_abs_diff": max(float((grads[n] - ref_grads[n]).abs().max()) for n in ref_grads),
        "grad_max_abs": max(float(g.abs().max()) for g in ref_grads.values()),
        "logit_scale_grad_diff": float((grads["logit_scale"] - ref_grads["logit_scale"]).abs()),
    }
    report.update(check_siglip_phrase_grads(accelerator, batch, [records[i].text for i in rows], per_rank))
    (out_dir / f"grads_rank{rank}.json").write_text(json.dumps(report, indent=2))


def check_siglip_phrase_grads(accelerator, batch, lines, per_rank):
    """The same comparison for loss=siglip with TrainTexts positives: line 1 (rank 0) also carries line
    2B-1's text (rank 1), so a positive crosses ranks, which only the gathered indices can tell."""
    from accelerate.utils import set_seed

    from lineclip.batch import TrainTexts
    from lineclip.trainer import train_step

    cfg = compose("train", [*TINY, "data.num_workers=0", "loss=siglip"])
    n = 2 * per_rank
    lines = list(lines)
    lines[1] = f"{lines[1]} {lines[n - 1]}"
    texts = TrainTexts(lines)
    positives = texts.positives(range(n))

    def build():
        set_seed(0)
        model, _, _ = build_model(cfg)
        return model.eval()

    reference = build()
    ref_out = reference(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                        attention_mask=batch["attention_mask"])
    ref_loss = sigmoid_loss(ref_out.image, ref_out.text, positives, ref_out.logit_scale, ref_out.logit_bias).loss
    ref_loss.backward()
    ref_grads = {name: p.grad for name, p in reference.named_parameters() if p.grad is not None}

    model = accelerator.prepare(build())
    rank = accelerator.process_index
    mine = slice(rank * per_rank, (rank + 1) * per_rank)

    def micro(rows):
        return {"pixel_values": batch["pixel_values"][rows], "input_ids": batch["input_ids"][rows],
                "attention_mask": batch["attention_mask"][rows], "indices": torch.arange(n)[rows]}

    report = {"siglip_cross_rank_positive": bool(positives[1, n - 1]) and not bool(positives[n - 1, 1])}
    for mode in ("plain", "grad_cache"):
        model.zero_grad(set_to_none=True)
        if mode == "plain":
            result = train_step(accelerator, model, [micro(mine)], texts, gather=True, grad_cache=False)
        else:
            halves = (slice(mine.start, mine.start + per_rank // 2), slice(mine.start + per_rank // 2, mine.stop))
            result = train_step(accelerator, model, [micro(r) for r in halves], texts, gather=True, grad_cache=True)
        grads = {name: p.grad.clone() for name, p in accelerator.unwrap_model(model).named_parameters()
                 if p.grad is not None}
        report[f"siglip_{mode}_loss"] = float(accelerator.reduce(result.loss.detach(), "mean"))
        report[f"siglip_{mode}_names_equal"] = sorted(grads) == sorted(ref_grads)
        report[f"siglip_{mode}_max_abs_diff"] = max(float((grads[k] - ref_grads[k]).abs().max()) for k in ref_grads)
    report["siglip_loss_1x2B"] = float(ref_loss.detach())
    report["siglip_grad_max_abs"] = max(float(g.abs().max()) for g in ref_grads.values())
    return report


def check_export(out_dir: Path, n_lines: int = 13, batch: int = 3):
    """Both processes export 13 demo lines (one broken file among them, three in another width bucket) in
    batches of 3, which deals them unevenly; rank 0 then embeds every line alone as the reference."""
    from dataclasses import replace

    import numpy as np
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from PIL import Image

    from lineclip.validation import embed_dataset, export_corpus

    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    set_seed(0)
    model, _, _ = build_model(compose("train", [*TINY, "data.num_workers=0"]))
    model.eval()
    demo = asset_dir("demo")
    records, _ = read_manifest(demo / "eval" / "meta" / "lines.jsonl", demo)
    records = records[:n_lines]
    files = out_dir / "lines"
    if accelerator.is_main_process:
        files.mkdir(exist_ok=True)
        for i in (1, 4, 9):
            with Image.open(records[i].image_path) as image:
                image.crop((0, 0, 250, image.height)).save(files / f"{i}.png")
        (files / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    accelerator.wait_for_everyone()
    for i in (1, 4, 9):
        records[i] = replace(records[i], image_path=str(files / f"{i}.png"))
    records[6] = replace(records[6], image_path=str(files / "broken.jpg"))
    dataset = LineDataset(records, LineImageTransform("bdrc", LineGeometry()))
    collate = LineCollator(64)

    # The export must never gather rows: spy on the collectives that would.
    calls = {"gather": 0}
    gather, pad = accelerator.gather, accelerator.pad_across_processes

    def counting(fn):
        def wrapper(*args, **kwargs):
            calls["gather"] += 1
            return fn(*args, **kwargs)
        return wrapper

    accelerator.gather, accelerator.pad_across_processes = counting(gather), counting(pad)
    export = export_corpus(accelerator, model, dataset, collate, batch, 0, out_dir / "export")
    gathers_in_export = calls["gather"]
    accelerator.gather, accelerator.pad_across_processes = gather, pad
    gathered = embed_dataset(accelerator, model, dataset, collate, batch, 0, with_text=False)
    report = {"rank": rank, "gathers_in_export": gathers_in_export, "returned": export is not None}
    if accelerator.is_main_process:
        merged = np.load(export.embeddings)
        with torch.inference_mode():
            alone = {i: model.encode_image(collate([dataset[i]])["pixel_values"])[0].numpy()
                     for i in range(len(dataset)) if dataset.buckets[i] != -1}
        reference = np.stack([alone[i] for i in sorted(alone)])
        report.update({
            "indices": export.indices.tolist(),
            "expected_indices": sorted(alone),
            "shape": list(merged.shape),
            "max_abs_diff_vs_alone": float(np.abs(merged - reference).max()),
            "equal_to_gathered": bool(np.array_equal(merged, gathered.image.numpy())),
            "files_left": sorted(p.name for p in (out_dir / "export").iterdir()),
            "n_buckets": len(set(dataset.buckets.tolist()) - {-1}),
        })
    (out_dir / f"export_rank{rank}.json").write_text(json.dumps(report, indent=2))


def check_save_fails(out_dir: Path, overrides):
    """Process 0's checkpoint write fails (a full disk, simulated where the bundle is written): both processes must
    stop with an error, none may wait forever at the barrier after the save."""
    import errno

    import lineclip.checkpoint as checkpoint

    if os.environ["RANK"] == "0":  # torchrun's; the process group starts inside train()
        def full_disk(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        checkpoint.save_bundle = full_disk
    cfg = compose("train", [*TINY, f"output_dir={out_dir / 'run'}", *overrides])
    try:
        train(cfg)
        outcome = {"error": None}
    except Exception as exc:  # what the CLI would print as its one line
        outcome = {"error": type(exc).__name__, "message": str(exc)}
    (out_dir / f"save_fails_rank{dist.get_rank()}.json").write_text(json.dumps(outcome))


if __name__ == "__main__":
    mode, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    if mode == "train":
        check_train(out, sys.argv[3:])
    elif mode == "export":
        check_export(out)
    elif mode == "save_fails":
        check_save_fails(out, sys.argv[3:])
    else:
        check_grads(out)
    dist.barrier()
