"""What the W&B panels cost a validation: the val/retrieval table (16 queries x top 5 line thumbnails, scores,
hits) and the four rank histograms, logged to an offline W&B run, against the validation they belong to.

Each round runs the trainer's own `validate` (the towers embedding the val lines, Recall@K, the within-page and
phrase metrics; the reference levels only in the first round, as in training) with the trainer's own panel hook
(`RunPanels.validation`) as its callback, timed on its own: the ratio is measured side by side in one run,
round by round. The first round also makes the thumbnails (later rounds copy them); it is reported apart.
Also timed once: the input grid (train/inputs) and the final bundle as a model artifact (logger.log_model).

    python experiments/bench_panels.py [--quick] [--val-lines 1000] [--rounds 5] [--config tiny|small]

Val lines beyond the demo's 40 are the demo's 200 lines repeated under new ids (the image files are read again,
as distinct lines would be). Ends with one line of JSON: {"bench": "panels", "ratio": ..., ...} (the worst
steady-state ratio over the settings).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

from accelerate import Accelerator  # noqa: E402

from lineclip.checkpoint import Checkpointer  # noqa: E402
from lineclip.config import compose  # noqa: E402
from lineclip.data import build_data, load_lines  # noqa: E402
from lineclip.tracking import RunPanels, finish_tracking, start_tracking  # noqa: E402
from lineclip.trainer import build_model  # noqa: E402
from lineclip.validation import validate  # noqa: E402

CONFIGS = {"tiny": ["model=dinov2_tiny", "text=byt5_tiny"], "small": ["experiment=cpu_scratch", "data.num_workers=0"]}



def widen(records: list, n: int) -> list:
    """`n` val lines: the given ones, then repeats under new sample ids."""
    out = list(records)
    while len(out) < n:
        r = records[len(out) % len(records)]
        out.append(dataclasses.replace(r, sample_id=f"{r.sample_id}~{len(out)}"))
    return out[:n]


def measure(config: str, val_lines: int, rounds: int, out_dir: Path) -> dict:
    cfg = compose("train", [*CONFIGS[config], "logger=wandb", "data.num_workers=0", f"output_dir={out_dir}"])
    accelerator = Accelerator(log_with="wandb")
    train_records, val_records, report = load_lines(cfg)
    val_records = widen(train_records + val_records, val_lines) if val_lines > len(val_records) else val_records
    model, processor, tokenizer = build_model(cfg)
    data = build_data(cfg, train_records, val_records, report, processor, 0, 1)
    model = accelerator.prepare(model)
    start_tracking(accelerator, cfg, out_dir, resuming=False)
    panels = RunPanels(accelerator, cfg, out_dir, data, resuming=False)

    batch = next(iter(data.loader))
    start = time.perf_counter()
    panels.log_inputs(batch, 0)
    inputs_s = time.perf_counter() - start

    validation_s, panels_s = [], []
    for step in range(1, rounds + 1):
        hook, spent = panels.validation(step), []

        def timed(embedded, ranks, hook=hook, spent=spent):
            t = time.perf_counter()
            hook(embedded, ranks)
            spent.append(time.perf_counter() - t)

        start = time.perf_counter()
        validate(accelerator, model, data.val_set, data.collate, data.val_ids, cfg, data.val_plan, on_ranked=timed)
        total = time.perf_counter() - start
        validation_s.append(total - spent[0])
        panels_s.append(spent[0])

    checkpointer = Checkpointer(cfg, accelerator, out_dir, model, None, None, processor, tokenizer, len(train_records),
                                {}, report)
    checkpointer.save_final(None, [])
    size_mb = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file() and "wandb" not in p.parts) / 1e6
    cfg.logger.log_model = True
    start = time.perf_counter()
    panels.log_bundle("", rounds)
    artifact_s = time.perf_counter() - start
    panels.close()
    finish_tracking(accelerator)
    steady = [p / v for p, v in zip(panels_s[1:], validation_s[1:], strict=True)]
    return {
        "config": config, "val_lines": len(val_records), "rounds": rounds,
        "validation_s_first": round(validation_s[0], 3), "panels_s_first": round(panels_s[0], 3),
        "ratio_first": round(panels_s[0] / validation_s[0], 4),
        "validation_s": round(statistics.median(validation_s[1:]), 3),
        "panels_s": round(statistics.median(panels_s[1:]), 4),
        "ratio": round(statistics.median(steady), 4),
        "input_grid_s": round(inputs_s, 3), "model_artifact_s": round(artifact_s, 3),
        "bundle_mb": round(size_mb, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="the demo's 40 val lines, tiny towers, 3 rounds")
    parser.add_argument("--val-lines", type=int, nargs="+", default=[40, 1000])
    parser.add_argument("--config", nargs="+", default=["tiny", "small"], choices=sorted(CONFIGS))
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    settings = [("tiny", 40, 3)] if args.quick else \
        [(c, n, args.rounds) for c in args.config for n in args.val_lines]
    results = []
    for config, n, rounds in settings:
        with tempfile.TemporaryDirectory(prefix="bench_panels_") as tmp:
            result = measure(config, n, rounds, Path(tmp))
        print(json.dumps(result), flush=True)
        results.append(result)
    worst = max(results, key=lambda r: r["ratio"])
    print(json.dumps({"bench": "panels", "ratio": worst["ratio"], "worst": f"{worst['config']}/{worst['val_lines']}",
                      "settings": results}))


if __name__ == "__main__":
    main()
