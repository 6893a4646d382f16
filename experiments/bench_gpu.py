"""GPU throughput of the spec's towers (DINOv2-base + ByT5-small encoder, random init: same FLOPs as the hub
weights, which the GPU machine cannot download) on real Tibetan lines, bf16, batch 32 and 64, with and without
each speed option. One table, then one line of JSON.

    PYTHONPATH=. python experiments/bench_gpu.py            # on a machine with a GPU, < 5 minutes
    PYTHONPATH=. python experiments/bench_gpu.py --tiny     # the same code path on a CPU, tiny towers

Lines: the demo lines bundled in the package (real dev lines, 56 px high), through the real data path
(bdrc, width buckets, ByT5 bytes at text.max_length 512), collated once into memory so data loading is not
what is timed (experiments/bench_data.py measures that). Needs torch, transformers, pillow, opencv, numpy:
no hydra, no accelerate.

Variants: eager attention vs SDPA; text padding with width-only batches vs width + text-length buckets;
torch.compile; gradient checkpointing. Model FLOP utilisation = FLOPs of one step (counted by
torch.utils.flop_counter on that step) / step time / the GPU's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import time
from importlib import resources
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from lineclip.batch import BucketBatchSampler, LineCollator, LineDataset, text_lengths, text_padding_fraction
from lineclip.loss import contrastive_loss
from lineclip.manifest import read_manifest
from lineclip.preprocess import LineGeometry, LineImageTransform
from lineclip.towers import DualEncoder, build_image_backbone, build_text_encoder

DINOV2_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                   patch_size=14, image_size=518)
BYT5_SMALL_ENCODER = dict(vocab_size=384, d_model=1472, d_kv=64, num_heads=6, d_ff=3584, num_layers=12,
                          feed_forward_proj="gated-gelu")
TINY_VIT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, patch_size=14)
TINY_T5 = dict(vocab_size=384, d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2, feed_forward_proj="gated-gelu")
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, no sparsity


def line_batches(batch_size: int, text_buckets: bool, max_length: int, seed: int = 0) -> tuple[list[dict], float]:
    demo = Path(str(resources.files("lineclip") / "assets" / "demo"))
    records = []
    for split in ("train", "eval"):
        recs, _ = read_manifest(demo / split / "meta" / "lines.jsonl", demo)
        records += recs
    dataset = LineDataset(records, LineImageTransform("bdrc", LineGeometry()))
    lengths = text_lengths((r.text for r in records), max_length)
    sampler = BucketBatchSampler(dataset.buckets, batch_size, shuffle=True, seed=seed,
                                 lengths=lengths if text_buckets else None, text_bucket_bytes=64)
    batches = [b for b in sampler if len(b) == batch_size] or list(sampler)  # full batches: equal work per step
    collate = LineCollator(max_length)
    return [collate([dataset[i] for i in b]) for b in batches], text_padding_fraction(batches, lengths)


def build(tiny: bool, attn: str, checkpointing: bool) -> DualEncoder:
    vit = build_image_backbone(None, TINY_VIT if tiny else DINOV2_BASE, attn_implementation=attn)
    t5 = build_text_encoder(None, TINY_T5 if tiny else BYT5_SMALL_ENCODER, attn_implementation=attn)
    model = DualEncoder(vit, t5, projection_dim=256)
    if checkpointing:
        vit.gradient_checkpointing_enable()
        t5.gradient_checkpointing_enable()
    return model


def run_variant(name: str, batches: list[dict], device: str, tiny: bool, attn: str, compile_: bool,
                checkpointing: bool, steps: int, warmup: int, peak: float | None) -> dict:
    torch.manual_seed(0)
    model = build(tiny, attn, checkpointing).to(device).train()
    if compile_:
        model.image_backbone.compile()
        model.text_encoder.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, fused=device == "cuda")
    data = [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda")

    def step(b: dict) -> None:
        with autocast:
            out = model(pixel_values=b["pixel_values"], input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            loss = contrastive_loss(out.image, out.text, torch.arange(len(b["indices"]), device=device),
                                    out.logit_scale).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for i in range(warmup):  # every batch shape once: compile (if any) happens here
        step(data[i % len(data)])
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    warm_s = time.perf_counter() - t0
    flops = 0
    if not compile_:
        with FlopCounterMode(display=False) as counter:
            step(data[0])
        flops = counter.get_total_flops()
    samples = 0
    t0 = time.perf_counter()
    for i in range(steps):
        b = data[i % len(data)]
        step(b)
        samples += len(b["indices"])
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    step_s = elapsed / steps
    result = {"variant": name, "batch": len(data[0]["indices"]), "samples_per_s": round(samples / elapsed, 1),
              "step_ms": round(1000 * step_s, 1), "warmup_s": round(warm_s, 1),
              "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None}
    if flops and peak:
        # FLOPs of batch 0; the timed batches share its shape class (same width bucket and text length +/- 64)
        result["tflops_per_step"] = round(flops / 1e12, 2)
        result["mfu"] = round(flops / step_s / peak, 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="tiny towers (a CPU check of the code path)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batches", default="32,64")
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in gpu), None)
    steps = 3 if args.tiny else args.steps
    rows = []
    variants = []
    for batch_size in (int(b) for b in args.batches.split(",")):
        width_only, pad_w = line_batches(batch_size, text_buckets=False, max_length=512)
        with_text, pad_t = line_batches(batch_size, text_buckets=True, max_length=512)
        variants += [
            ("eager attention, width buckets", width_only, "eager", False, False, pad_w),
            ("sdpa, width buckets", width_only, "sdpa", False, False, pad_w),
            ("sdpa, width+text buckets", with_text, "sdpa", False, False, pad_t),
            ("sdpa, width+text, grad checkpointing", with_text, "sdpa", False, True, pad_t),
        ]
    if not args.no_compile:  # last: its compile time is the least predictable, and the table must not wait on it
        variants.append(("sdpa, width+text, torch.compile", with_text, "sdpa", True, False, pad_t))
    for name, data, attn, compile_, ckpt, pad in variants:
        t0 = time.perf_counter()
        try:
            row = run_variant(name, data, device, args.tiny, attn, compile_, ckpt, steps,
                              warmup=min(len(data), 8 if compile_ else 2), peak=peak)
        except Exception as exc:  # one variant failing (e.g. compile) must not lose the table
            row = {"variant": name, "batch": len(data[0]["indices"]), "error": f"{type(exc).__name__}: {exc}"[:200]}
        row["text_padding"] = round(pad, 3)
        rows.append(row)
        print(json.dumps(row), f"({time.perf_counter() - t0:.0f} s)", flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    print(f"\n{gpu}, bf16, DINOv2-base + ByT5-small encoder (random init), text.max_length 512")
    print("| variant | batch | samples/s | step ms | MFU | text padding | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['batch']} | {r.get('samples_per_s', r.get('error'))} | {r.get('step_ms', '')} "
              f"| {r.get('mfu', '')} | {r['text_padding']} | {r.get('peak_mem_gb', '')} |")
    best = max((r for r in rows if "samples_per_s" in r), key=lambda r: r["samples_per_s"], default={})
    base = next((r for r in rows if r["variant"].startswith("eager") and r["batch"] == best.get("batch")), {})
    print(json.dumps({"bench": "gpu", "device": gpu, "best_variant": best.get("variant"),
                      "best_samples_per_s": best.get("samples_per_s"), "best_mfu": best.get("mfu"),
                      "speedup_vs_eager_width_only": round(best["samples_per_s"] / base["samples_per_s"], 2)
                      if best and base.get("samples_per_s") else None, "rows": rows}))


if __name__ == "__main__":
    main()
