"""lineclip's training step vs a bare PyTorch loop: same towers, same pre-built tensors in memory, no logging,
no data loading. What it measures is lineclip's own overhead per optimizer step (accelerate's wrapper and
autocast context, the cross-process flags, gradient clipping, the scheduler, the .item() calls the progress
bar needs), i.e. whether the trainer spends its time on the two towers.

    python experiments/bench_train.py [--quick] [--steps 30] [--device cpu|cuda]

Ends with one line of JSON: {"bench": "train", "ratio_vs_bare": ..., ...} (the worst ratio over the configs).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
from accelerate import Accelerator
from hydra import compose, initialize_config_dir

from lineclip.config import conf_dir, register_configs
from lineclip.loss import contrastive_loss
from lineclip.trainer import any_rank, build_model, build_optimization, train_step

CONFIGS = {
    "tiny": ["model=dinov2_tiny", "text=byt5_tiny"],
    "small": ["experiment=cpu_scratch"],
}


def batches(n: int, batch: int, height: int, width: int, text_len: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(3, 259, (batch, text_len), generator=g)
        ids[:, -1] = 1
        out.append({"pixel_values": torch.randn(batch, 3, height, width, generator=g), "input_ids": ids,
                    "attention_mask": torch.ones_like(ids), "indices": torch.arange(i * batch, (i + 1) * batch)})
    return out


def bare_loop(model, data, steps: int, lr: float, text_ids) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        b = data[step % len(data)]
        out = model(pixel_values=b["pixel_values"], input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        loss = contrastive_loss(out.image, out.text, text_ids[b["indices"]], out.logit_scale).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def lineclip_loop(model, cfg, data, steps: int, text_ids, device: str) -> float:
    """One optimizer step as lineclip.trainer.train takes it, minus data loading and logging: the trainer's own
    build_optimization (AdamW over param_groups, accelerate's prepare, the lr schedule), train_step and any_rank."""
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision=cfg.trainer.mixed_precision)
    model, opt = build_optimization(cfg, model, accelerator, batches_per_epoch=steps)
    optimizer, scheduler = opt.optimizer, opt.scheduler
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        result = train_step(accelerator, model, [data[step % len(data)]], None, gather=False, grad_cache=False)
        non_finite, _ = any_rank(accelerator, not torch.isfinite(result.loss).item(), False)
        accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        contrastive = result.contrastive
        _ = (result.loss.item(), contrastive.i2t_accuracy.item(), contrastive.t2i_accuracy.item(),
             scheduler.get_last_lr())
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    steps = 4 if args.quick else args.steps
    register_configs()
    results = {}
    for name, overrides in CONFIGS.items():
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose(config_name="train", overrides=[*overrides, "optim.grad_clip=1.0"])
        batch = 8 if args.quick else 32
        height = cfg.preprocess.target_height
        width = math.ceil(512 / cfg.preprocess.patch_multiple) * cfg.preprocess.patch_multiple
        data = batches(4, batch, height, width, min(cfg.text.max_length, 128))
        text_ids = torch.arange(4 * batch)
        # The collator's text_ids (each line its own text here), which train_step takes its positives from.
        data = [{**{k: v.to(args.device) for k, v in b.items()}, "text_ids": text_ids[b["indices"]].to(args.device)}
                for b in data]
        text_ids = text_ids.to(args.device)
        timings = {"bare": [], "lineclip": []}
        for _ in range(2 if args.quick else 3):  # interleaved rounds: drift hits both sides alike
            for side in ("bare", "lineclip"):
                torch.manual_seed(0)
                model, _, _ = build_model(cfg)
                model.to(args.device)
                warm = 1 if args.quick else 2
                if side == "bare":
                    bare_loop(model, data, warm, cfg.optim.lr, text_ids)
                    timings[side].append(bare_loop(model, data, steps, cfg.optim.lr, text_ids))
                else:
                    lineclip_loop(model, cfg, data, warm, text_ids, args.device)
                    timings[side].append(lineclip_loop(model, cfg, data, steps, text_ids, args.device))
        best = {side: min(t) for side, t in timings.items()}
        results[name] = {
            "bare_samples_per_s": round(steps * batch / best["bare"], 2),
            "lineclip_samples_per_s": round(steps * batch / best["lineclip"], 2),
            "ratio_vs_bare": round(best["bare"] / best["lineclip"], 3),
            "batch": batch, "image": f"{height}x{width}", "text_len": data[0]["input_ids"].shape[1],
        }
        print(f"{name}: {results[name]}")
    print(json.dumps({"bench": "train", "device": args.device, "steps": steps,
                      "ratio_vs_bare": min(r["ratio_vs_bare"] for r in results.values()), "configs": results}))


if __name__ == "__main__":
    main()
