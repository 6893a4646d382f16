"""Retrieval quality of the CPU recipe on real lines: train `experiment=cpu_scratch` with a fixed step budget on
the real dev train lines (with and without synthetic pretraining), evaluate on the real dev eval lines with
`lineclip.evaluate`, and print a markdown table against chance for that gallery and against what knowing only
each line's collection gives (when the manifest has a `collection` field), plus the learning curves.

    python experiments/quality/run_quality.py --dev-dir ../shared/data/tibetan_lines_dev [--steps 150]
    python experiments/quality/run_quality.py --study crop_to_text --steps 150    # one study: its variants

Runs go to experiments/quality/runs/ (ignored by git); the summary to runs/summary.json. A dev tool: it reads
a dataset dir you name (the real dev lines are not shipped with lineclip; the bundled demo set is the default).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))
from collection_floor import collection_floor  # noqa: E402

# Each study: its variants as extra overrides on top of the recipe (the first is the recipe's own choice).
STUDIES: dict[str, dict[str, list[str]]] = {
    "crop_to_text": {"whole line image (recipe)": [], "image cropped to the kept text": ["data.crop_to_text=true"]},
    "text_length": {"128 bytes (recipe)": [], "256 bytes": ["text.max_length=256"]},
    "pipeline": {"bdrc (recipe)": [], "none": ["preprocess=none"]},
    "temperature": {"learnable (recipe)": [],
                    "fixed 0.1": ["loss.learnable_temperature=false", "loss.temperature=0.1"]},
    # DINOv2's own patch 14 at the issue's heights; widths scaled so the longest line keeps the recipe's 16:1 cap
    "image_height": {"32 px, patch 8 (recipe)": [], **{f"{h} px, patch 14": [
        f"preprocess.target_height={h}", "preprocess.patch_multiple=14", "model.config.patch_size=14",
        f"model.config.image_size={h}", f"preprocess.max_width={16 * h}",
        f"preprocess.width_buckets=[{4 * h},{8 * h},{12 * h},{16 * h}]"] for h in (56, 70, 84)}},
    "lr": {"1e-3 (recipe)": [], "3e-4": ["optim.lr=3e-4"]},
    # run-to-run noise: the same recipe with other seeds (init, batch order)
    "seed": {"seed 0 (recipe)": [], "seed 1": ["trainer.seed=1"], "seed 2": ["trainer.seed=2"]},
    "image_tower": {"trained (recipe)": [], "frozen": ["model.freeze_backbone=true"]},
    "projection_dim": {"128 (recipe)": [], "64": ["model.projection_dim=64"], "256": ["model.projection_dim=256"]},
    # issue 12's phrase training, each against the recipe (scored on page galleries and phrase queries too)
    "phrase_training": {"infonce, shuffled batches (recipe)": [], "text spans p=0.5": ["data.text_span.p=0.5"],
                        "same-page batches": ["data.group_batches_by=page_id"], "siglip": ["loss=siglip"]},
    "lr_per_tower": {"1x (recipe)": [], "text tower 0.3x": ["text.encoder_lr_multiplier=0.3"],
                     "image tower 0.3x": ["model.backbone_lr_multiplier=0.3"]},
}


def data_args(dataset: Path) -> list[str]:
    return ["data=openpecha", f"data.dataset_dir={dataset}", f"data.train_manifest={dataset}/train/meta/lines.jsonl",
            f"data.val_manifest={dataset}/eval/meta/lines.jsonl"]


def train(out: Path, dataset: Path, steps: int, *overrides: str) -> dict:
    if not (out / "training_config.json").exists():
        cmd = [sys.executable, "-m", "lineclip.train", "experiment=cpu_scratch", *data_args(dataset), "logger=none",
               f"trainer.max_steps={steps}", f"trainer.eval_every_steps={max(10, steps // 10)}",
               "trainer.checkpoint_every_steps=100000", "trainer.progress_bar=false", f"hydra.run.dir={out}",
               *overrides]
        t0 = time.time()
        subprocess.run(cmd, check=True, cwd=ROOT)
        (out / "wall_seconds").write_text(f"{time.time() - t0:.0f}")
    return json.loads((out / "training_config.json").read_text())


def evaluate(run: Path, manifest: Path) -> dict:
    out = run / "eval_dev_pages_phrases.json"
    if not out.exists():
        subprocess.run([sys.executable, "-m", "lineclip.evaluate", f"run_dir={run}", f"manifest={manifest}",
                        "eval.gallery_by=page_id", "eval.queries=[line,phrase]", f"eval.output={out}"],
                       check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def synth(out: Path, n_lines: int) -> Path:
    if not (out / "train" / "meta" / "lines.jsonl").exists():
        subprocess.run([sys.executable, "-m", "lineclip.synth", f"out_dir={out}", f"n_lines={n_lines}", "workers=2",
                        "overwrite=true"], check=True, cwd=ROOT)
    return out


def row(name: str, run: Path, result: dict) -> dict:
    """`lineclip.evaluate` on whole lines (what a user's query meets) and the trainer's last validation (lines
    cropped like the training lines when data.crop_to_text is on)."""
    aware = result["metrics"]["duplicate_aware"]
    val = json.loads((run / "training_config.json").read_text())["val_metrics"]
    losses = re.findall(r"step \d+/\d+: loss ([\d.]+)", (run / "train.log").read_text())
    page = result.get("galleries", {}).get("page_id", {}).get("metrics", {})
    phrase = result.get("phrase", {}).get("metrics", {})
    return {"name": name, "run": str(run), "wall_s": float((run / "wall_seconds").read_text()),
            "train_loss": float(losses[-1]) if losses else float("nan"),
            "page_t2i_r1": page.get("t2i_r1", float("nan")), "phrase_t2i_r10": phrase.get("t2i_r10", float("nan")),
            **{f"{d}_r{k}": aware[f"{d}_r{k}"] for d in ("t2i", "i2t") for k in (1, 5, 10)},
            **{f"val_{d}_r{k}": val[f"val_{d}_r{k}"] for d in ("t2i", "i2t") for k in (1, 5, 10)}}


def group_level(manifest: Path, field: str = "collection") -> dict[int, float] | None:
    """Expected Recall@K of a model that knows only each line's `field` (its collection) and ranks the lines of
    that group in random order ahead of all others: mean over queries of min(1, K / group size). The dev set has
    two collections that differ in script and transcription conventions, so this is what telling them apart
    buys without reading a single character."""
    groups = [json.loads(line).get(field) for line in manifest.read_text().splitlines() if line.strip()]
    if None in groups:
        return None
    size = {g: groups.count(g) for g in set(groups)}
    return {k: sum(min(1.0, k / size[g]) for g in groups) / len(groups) for k in (1, 5, 10)}


def table(rows: list[dict], n: int, collection: dict[int, float] | None, floor: float | None) -> str:
    def cells(r: dict, p: str) -> str:
        return " | ".join(f"{r[f'{p}{d}_r{k}']:.3f}" for d in ("t2i", "i2t") for k in (1, 5, 10))

    lines = ["| variant | scored on | t2i R@1 | R@5 | R@10 | i2t R@1 | R@5 | R@10 | within-page t2i R@1 | phrase t2i "
             "R@10 | last train loss | wall |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | whole lines (evaluate) | {cells(r, '')} | {r['page_t2i_r1']:.3f} | "
                     f"{r['phrase_t2i_r10']:.3f} | {r['train_loss']:.2f} | {r['wall_s']:.0f} s |")
        if any(r[f"val_{d}_r{k}"] != r[f"{d}_r{k}"] for d in ("t2i", "i2t") for k in (1, 5, 10)):
            lines.append(f"| | as trained (last validation) | {cells(r, 'val_')} | | | | |")
    chance = " | ".join(f"{k / n:.3f}" for _ in range(2) for k in (1, 5, 10))
    lines.append(f"| chance ({n} lines) | | {chance} | | | | |")
    if collection is not None:
        level = " | ".join(f"{collection[k]:.3f}" for _ in range(2) for k in (1, 5, 10))
        floor_cell = "" if floor is None else f"{floor:.2f}"  # None: the train manifest has no collection field
        lines.append(f"| knows the collection only | | {level} | | | {floor_cell} | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_dev = ROOT.parent / "shared" / "data" / "tibetan_lines_dev"
    parser.add_argument("--dev-dir", type=Path, default=default_dev if default_dev.is_dir() else None)
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "quality" / "runs")
    parser.add_argument("--steps", type=int, default=150, help="fine-tuning / baseline optimizer steps")
    parser.add_argument("--synth-lines", type=int, default=3000)
    parser.add_argument("--synth-steps", type=int, default=300)
    parser.add_argument("--study", choices=[*STUDIES, "recipe"], default="recipe")
    parser.add_argument("--no-synth", action="store_true", help="recipe: the real-lines baseline only")
    args = parser.parse_args()
    if args.dev_dir is None:
        from lineclip.config import asset_dir

        args.dev_dir = asset_dir("demo")
    dev, out = args.dev_dir.resolve(), args.out.resolve()
    eval_manifest = dev / "eval" / "meta" / "lines.jsonl"
    n_eval = sum(1 for line in eval_manifest.read_text().splitlines() if line.strip())
    rows, curves = [], {}
    if args.study == "recipe":
        base = out / f"study_{args.steps}_recipe"  # the same run as every study's recipe variant
        cfg = train(base, dev, args.steps)
        rows.append(row("cpu_scratch (cpu_small before), real lines only", base, evaluate(base, eval_manifest)))
        curves["real only"] = cfg["val_history"]
    if args.study == "recipe" and not args.no_synth:
        synth_dir = synth(out / f"synth_{args.synth_lines}", args.synth_lines)
        pre = out / f"synth_pretrain_{args.synth_lines}_{args.synth_steps}"
        cfg = train(pre, synth_dir, args.synth_steps)
        curves["synthetic pretraining (scored on synthetic eval lines)"] = cfg["val_history"]
        fine = out / f"synth_then_real_{args.synth_lines}_{args.synth_steps}_{args.steps}"
        cfg = train(fine, dev, args.steps, f"model.init_from={pre}")
        rows.append(row(f"synthetic pretraining ({args.synth_lines} lines, {args.synth_steps} steps) then real", fine,
                        evaluate(fine, eval_manifest)))
        curves["synthetic then real"] = cfg["val_history"]
    if args.study != "recipe":
        for name, overrides in STUDIES[args.study].items():
            # the recipe's own variant is one run shared by every study
            slug = re.sub(r"[^\w.-]+", "-", "_".join(overrides)) or "recipe"
            run = out / f"study_{args.steps}_{slug}"
            cfg = train(run, dev, args.steps, *overrides)
            rows.append(row(name, run, evaluate(run, eval_manifest)))
            curves[name] = cfg["val_history"]
    level = group_level(eval_manifest)
    print(table(rows, n_eval, level, collection_floor(dev) if level else None))
    print()
    for name, history in curves.items():
        points = ", ".join(f"{h['step']}: {h['val_t2i_r10']:.2f}" for h in history)
        print(f"- learning curve ({name}), val t2i R@10 by step: {points}")
    summary = out / "summary.json"
    previous = json.loads(summary.read_text()) if summary.exists() else {}
    previous[f"{args.study}_{args.steps}"] = {"rows": rows, "curves": curves, "n_eval": n_eval}
    summary.write_text(json.dumps(previous, indent=2))


if __name__ == "__main__":
    main()
