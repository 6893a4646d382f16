"""One GPU step of the spec's towers, as the trainer takes it, side by side with every candidate memory saver:
DINOv2-base + ByT5-small encoder (random init from their configs: the same FLOPs as the hub weights, which the
GPU machine cannot download), batch 64, bf16, on real Tibetan lines. Peak memory and MFU per variant, one table,
then one line of JSON. Targets (issue 16): peak <= 24 GiB and MFU >= 0.45.

    PYTHONPATH=. python experiments/bench_gpu.py                  # on one GPU: <= 10 minutes (--budget-s 540)
    PYTHONPATH=. python experiments/bench_gpu.py --tiny --no-compile --batch 4 --steps 2   # CPU smoke, ~1 min

What is timed is the trainer's own code: the model from `lineclip.trainer.build_model` (config composed by
Hydra from conf/, `model=dinov2_tiny text=byt5_tiny` with the base sizes put into their `config`), the optimizer,
compilation and accelerate wrapping from `build_optimization`, and per step `train_step` (plain, or with
gradient caching), gradient clipping, the optimizer and scheduler steps, as lineclip.trainer.train's loop does:
a regression in any of them shows here. Lines: the 200 demo lines bundled in the package (real dev lines) through
the real data path (bdrc, width buckets, ByT5 bytes at text.max_length 512), full batches collated once into
memory, so data loading is not what is timed (experiments/bench_data.py measures that).

Variants (all at one contrastive batch of `--batch`):
- eager attention / SDPA (transformers' default) / SDPA restricted to the fused kernels (flash,
  memory-efficient, cuDNN: no math fallback; ByT5's relative position bias is an additive float mask, which
  only the memory-efficient kernel takes, so where no fused kernel can run the row says so);
- activation checkpointing on the text tower, the image tower, both (`model.gradient_checkpointing` is both;
  one tower is applied to the built model here);
- chunked towers: `trainer.grad_cache_chunks` 2 and 4 (gradient caching: the contrastive batch stays 64, the
  towers see micro-batches of 32 / 16, at the price of one extra forward);
- torch.compile (`trainer.compile`, today's fastest), alone and with the savers that measure best eager.
MFU = model FLOPs of the plain step (counted once per batch with torch.utils.flop_counter on the eager model;
recomputation by checkpointing or gradient caching is not counted: it is cost, not work) / step time / the GPU's
dense bf16 peak. Peak memory: torch.cuda.max_memory_allocated over the timed steps (after warm-up and
compilation). Variants run in this order, compiled ones last; any that would start past `--budget-s` is
recorded as skipped, and one that fails (e.g. no fused kernel) is recorded with its error, never losing the table.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.flop_counter import FlopCounterMode

from lineclip.batch import BucketBatchSampler, LineCollator, LineDataset
from lineclip.config import compose
from lineclip.manifest import read_manifest
from lineclip.preprocess import LineGeometry, LineImageTransform
from lineclip.trainer import build_model, build_optimization, train_step

# Random init from configs: conf/model/dinov2_tiny and conf/text/byt5_tiny with these sizes put in.
DINOV2_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                   patch_size=14, image_size=518)
BYT5_SMALL_ENCODER = dict(vocab_size=384, d_model=1472, d_kv=64, num_heads=6, d_ff=3584, num_layers=12,
                          feed_forward_proj="gated-gelu")
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, no sparsity
TARGET_PEAK_GIB, TARGET_MFU = 24.0, 0.45


@dataclass
class Variant:
    name: str
    overrides: list[str] = field(default_factory=list)  # Hydra overrides of the trainer's own options
    checkpoint_towers: tuple[str, ...] = ()  # gradient checkpointing on one tower (the config sets both)
    fused_sdpa_only: bool = False

    @property
    def compiled(self) -> bool:
        return "trainer.compile=true" in self.overrides


VARIANTS = [
    Variant("eager attention", ["model.attn_implementation=eager"]),
    Variant("sdpa"),
    Variant("sdpa, fused kernels only", fused_sdpa_only=True),
    Variant("sdpa, checkpointing text tower", checkpoint_towers=("text_encoder",)),
    Variant("sdpa, checkpointing image tower", checkpoint_towers=("image_backbone",)),
    Variant("sdpa, checkpointing both towers", ["model.gradient_checkpointing=true"]),
    Variant("sdpa, grad cache 2 chunks", ["trainer.grad_cache_chunks=2"]),
    Variant("sdpa, grad cache 4 chunks", ["trainer.grad_cache_chunks=4"]),
    Variant("compiled", ["trainer.compile=true"]),
    Variant("compiled, grad cache 2 chunks", ["trainer.compile=true", "trainer.grad_cache_chunks=2"]),
    Variant("compiled, checkpointing text tower", ["trainer.compile=true"], checkpoint_towers=("text_encoder",)),
]


def sizes(tiny: bool) -> list[str]:
    if tiny:
        return ["model=dinov2_tiny", "text=byt5_tiny", "text.max_length=512"]
    return ["model=dinov2_tiny", "text=byt5_tiny", "model.projection_dim=256", "text.max_length=512",
            *(f"model.config.{k}={v}" for k, v in DINOV2_BASE.items()),
            *(f"text.config.{k}={v}" for k, v in BYT5_SMALL_ENCODER.items())]



def line_batches(batch_size: int, max_length: int, n_batches: int) -> list[dict]:
    """Up to `n_batches` full batches of demo lines (one width bucket each), collated once."""
    demo = Path(str(resources.files("lineclip") / "assets" / "demo"))
    records = []
    for split in ("train", "eval"):
        recs, _ = read_manifest(demo / split / "meta" / "lines.jsonl", demo)
        records += recs
    dataset = LineDataset(records, LineImageTransform("bdrc", LineGeometry()))
    sampler = BucketBatchSampler(dataset.buckets, batch_size, shuffle=True, seed=0)
    batches = [b for b in sampler if len(b) == batch_size][:n_batches]  # full batches: equal work per step
    if not batches:
        raise SystemExit(f"no full batch of {batch_size} demo lines in one width bucket; lower --batch")
    collate = LineCollator(max_length)
    # Every line its own text id (the loss's positives): indices 0..B-1 into `text_ids = arange(B)`.
    return [{**collate([dataset[i] for i in b]), "indices": torch.arange(batch_size)} for b in batches]


def micro_batches(batch: dict, chunks: int | None) -> list[dict]:
    """The trainer's micro-batches of one contrastive batch (grad cache: `chunks` equal parts)."""
    if not chunks:
        return [batch]
    n = len(batch["indices"])
    bounds = [round(i * n / chunks) for i in range(chunks + 1)]
    keys = ("pixel_values", "input_ids", "attention_mask", "indices")
    return [{k: batch[k][lo:hi] for k in keys} for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]


def model_flops(cfg, data: list[dict], accelerator: Accelerator) -> list[int]:
    """FLOPs of one plain step (forward + backward, no recomputation) per batch, on the eager-attention model."""
    torch.manual_seed(0)
    model, _, _ = build_model(cfg)
    model.to(accelerator.device).train()
    ids = torch.arange(len(data[0]["indices"]))
    out = []
    for batch in data:
        # under autocast, as a prepared model runs: the same FLOPs as fp32, half the activation memory
        with FlopCounterMode(display=False) as counter, accelerator.autocast():
            train_step(accelerator, model, [batch], ids, gather=False, grad_cache=False)
        model.zero_grad(set_to_none=True)
        out.append(counter.get_total_flops())
    del model
    return out


def run_variant(variant: Variant, base: list[str], data: list[dict], accelerator: Accelerator, steps: int,
                warmup: int) -> dict:
    cfg = compose("train", [*base, *variant.overrides])
    torch.manual_seed(0)
    model, _, _ = build_model(cfg)
    for tower in variant.checkpoint_towers:
        getattr(model, tower).gradient_checkpointing_enable()
    model.to(accelerator.device)
    model, opt = build_optimization(cfg, model, accelerator, batches_per_epoch=steps + warmup)
    model.train()
    ids = torch.arange(len(data[0]["indices"]))
    chunks = cfg.trainer.grad_cache_chunks
    sdpa = contextlib.nullcontext
    if variant.fused_sdpa_only:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def sdpa():
            return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                SDPBackend.CUDNN_ATTENTION])

    def step(batch: dict) -> None:
        # lineclip.trainer.train's loop body, minus logging: train_step, the finite check's .item(), clipping,
        # the optimizer and the schedule.
        with sdpa():
            result = train_step(accelerator, model, micro_batches(batch, chunks), ids, gather=False,
                                grad_cache=bool(chunks))
        torch.isfinite(result.loss).item()
        accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or 1.0)
        opt.optimizer.step()
        opt.optimizer.zero_grad(set_to_none=True)
        opt.scheduler.step()

    cuda = accelerator.device.type == "cuda"
    t0 = time.perf_counter()
    for i in range(max(warmup, len(data) if variant.compiled else warmup)):  # every shape once when compiled
        step(data[i % len(data)])
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(steps):
        step(data[i % len(data)])
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    return {"elapsed_s": elapsed, "batches": [i % len(data) for i in range(steps)], "warmup_s": round(warm_s, 1),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="tiny towers: a CPU check of the code path")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--n-batches", type=int, default=2, help="distinct batches (shapes) cycled through")
    parser.add_argument("--budget-s", type=float, default=540, help="no variant starts after this many seconds")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--only", default="", help="variant names separated by ';' (default: all)")
    args = parser.parse_args()
    started = time.perf_counter()
    cuda = torch.cuda.is_available()
    accelerator = Accelerator(cpu=not cuda, mixed_precision="bf16" if cuda else "no")
    gpu = torch.cuda.get_device_name() if cuda else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in gpu), None)
    base = [*sizes(args.tiny), f"data.batch_size={args.batch}", "optim.grad_clip=1.0", "optim.warmup_steps=1",
            f"trainer.mixed_precision={'bf16' if cuda else 'no'}", "logger=none"]
    data = line_batches(args.batch, 512, args.n_batches)
    data = [{k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in b.items()} for b in data]
    flops = model_flops(compose("train", [*base, "model.attn_implementation=eager"]), data, accelerator)
    variants = [v for v in VARIANTS if not (args.no_compile and v.compiled)]
    if args.only:
        variants = [v for v in variants if v.name in args.only.split(";")]
    rows = []
    took = {False: 30.0, True: 150.0}  # seconds a variant is expected to take (eager, compiled): the longest seen
    for variant in variants:
        row = {"variant": variant.name, "batch": args.batch}
        if time.perf_counter() - started + took[variant.compiled] > args.budget_s:
            row["skipped"] = f"would end past the time budget of {args.budget_s:.0f} s"
            rows.append(row)
            print(json.dumps(row), flush=True)
            continue
        t0 = time.perf_counter()
        try:
            timing = run_variant(variant, base, data, accelerator, args.steps, warmup=2)
            step_s = timing["elapsed_s"] / args.steps
            work = sum(flops[i] for i in timing["batches"])
            row.update({"samples_per_s": round(args.batch * args.steps / timing["elapsed_s"], 1),
                        "step_ms": round(1000 * step_s, 1), "peak_gib": timing["peak_gib"],
                        "tflops_per_step": round(work / args.steps / 1e12, 4), "warmup_s": timing["warmup_s"]})
            if peak:
                row["mfu"] = round(work / timing["elapsed_s"] / peak, 3)
                row["meets_targets"] = bool(row["peak_gib"] <= TARGET_PEAK_GIB and row["mfu"] >= TARGET_MFU)
        except Exception as exc:  # one variant failing (no fused kernel, compile) must not lose the table
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        finally:  # what the variant held (accelerate keeps references to prepared models) goes before the next
            accelerator.free_memory()
            torch._dynamo.reset()
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        row["seconds"] = round(time.perf_counter() - t0, 1)
        took[variant.compiled] = max(took[variant.compiled], row["seconds"])
        rows.append(row)
        print(json.dumps(row), flush=True)

    print(f"\n{gpu}, {'bf16' if cuda else 'fp32'}, {'tiny towers' if args.tiny else 'DINOv2-base + ByT5-small'}"
          f" (random init), batch {args.batch}, text.max_length 512")
    print("| variant | samples/s | step ms | MFU | peak GiB | meets targets |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r.get('samples_per_s', r.get('error', r.get('skipped')))} | "
              f"{r.get('step_ms', '')} | {r.get('mfu', '')} | {r.get('peak_gib', '')} | {r.get('meets_targets', '')} |")
    measured = [r for r in rows if "samples_per_s" in r]
    best = max(measured, key=lambda r: r["samples_per_s"], default={})
    eager = next((r for r in measured if r["variant"] == "eager attention"), {})
    print(json.dumps({
        "bench": "gpu", "device": gpu, "batch": args.batch, "tiny": args.tiny,
        "targets": {"peak_gib": TARGET_PEAK_GIB, "mfu": TARGET_MFU},
        "best_variant": best.get("variant"), "best_samples_per_s": best.get("samples_per_s"),
        "best_mfu": best.get("mfu"), "best_peak_gib": best.get("peak_gib"),
        "speedup_vs_eager": round(best["samples_per_s"] / eager["samples_per_s"], 2)
        if best and eager.get("samples_per_s") else None,
        "meeting_targets": [r["variant"] for r in measured if r.get("meets_targets")],
        "total_s": round(time.perf_counter() - started, 1), "rows": rows}))


if __name__ == "__main__":
    main()
