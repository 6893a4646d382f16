"""Does the CPU reading recipe read? Train `experiment=cpu_read` from scratch on clean short synthetic lines, then
`experiment=cpu_read_real` from it on real lines, score each with `lineclip.evaluate` (whole gallery, within-page
galleries, phrase queries, each beside chance and the collection-only and length-only levels) and print the
learning curves from each run's metrics.jsonl.

    python experiments/quality/run_reading.py --dev-dir ../shared/data/tibetan_lines_dev [--synth-dir D]

The synthetic dir is made with the command of issue 12 when it does not exist yet. Runs go to
experiments/quality/runs/ (ignored by git). A dev tool: it reads the dataset dirs you name.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SYNTH_ARGS = ["n_lines=12000", "height=[32,32]", "p_short=1.0", "short_aspect=[2.0,5.0]", "degradation=0",
              "p_neighbours=0", "p_frame=0", "p_border=0", "p_jpeg=0", "p_binarized=1.0", "p_yig_mgo=0"]
CURVE_KEYS = {"train/loss": "train loss", "train/embedding_cosine_image": "image cos",
              "train/embedding_cosine_text": "text cos", "train/reading_loss": "CTC/char",
              "val_t2i_r1": "val t2i R@1", "val_t2i_r10": "R@10", "val_page_t2i_r1": "page t2i R@1",
              "val_phrase_t2i_r10": "phrase R@10"}


def data_args(dataset: Path) -> list[str]:
    return [f"data.dataset_dir={dataset}", f"data.train_manifest={dataset}/train/meta/lines.jsonl",
            f"data.val_manifest={dataset}/eval/meta/lines.jsonl"]


def train(out: Path, experiment: str, dataset: Path, *overrides: str) -> None:
    if (out / "training_config.json").exists():
        return
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "lineclip.train", f"experiment={experiment}", *data_args(dataset),
                    "logger=none", "trainer.progress_bar=false", f"hydra.run.dir={out}", *overrides],
                   check=True, cwd=ROOT)
    (out / "wall_seconds").write_text(f"{time.time() - t0:.0f}")


def evaluate(run: Path, dataset: Path) -> str:
    out = run / "eval_reading.json"
    printed = subprocess.run([sys.executable, "-m", "lineclip.evaluate", f"run_dir={run}",
                              f"manifest={dataset}/eval/meta/lines.jsonl", "eval.gallery_by=page_id",
                              "eval.queries=[line,phrase]", f"eval.output={out}", "progress=false"],
                             check=True, cwd=ROOT, capture_output=True, text=True)
    return printed.stdout


def curve(run: Path) -> str:
    """Train-step rows and validation rows of metrics.jsonl, merged by step, as a markdown table."""
    by_step: dict[int, dict] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        by_step.setdefault(row["step"], {}).update(row)
    keys = [k for k in CURVE_KEYS if any(k in row for row in by_step.values())]
    lines = ["| step | " + " | ".join(CURVE_KEYS[k] for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for step, row in sorted(by_step.items()):
        if "val_t2i_r1" in row or step % 50 == 0:
            lines.append(f"| {step} | " + " | ".join(f"{row[k]:.3f}" if k in row else "" for k in keys) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dev-dir", type=Path, required=True, help="real lines (OpenPecha layout)")
    parser.add_argument("--synth-dir", type=Path, default=ROOT / "experiments" / "quality" / "runs" / "synth_short")
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "quality" / "runs")
    args = parser.parse_args()
    synth, dev, out = args.synth_dir.resolve(), args.dev_dir.resolve(), args.out.resolve()
    if not (synth / "train" / "meta" / "lines.jsonl").exists():
        subprocess.run([sys.executable, "-m", "lineclip.synth", f"out_dir={synth}", *SYNTH_ARGS], check=True, cwd=ROOT)
    stage1, stage2 = out / "cpu_read", out / "cpu_read_real"
    train(stage1, "cpu_read", synth)
    train(stage2, "cpu_read_real", dev, f"model.init_from={stage1}")
    for name, run, dataset in (("cpu_read, synthetic eval pages", stage1, synth),
                               ("cpu_read_real, real dev eval pages", stage2, dev)):
        wall = (run / "wall_seconds").read_text().strip() if (run / "wall_seconds").exists() else "?"
        print(f"## {name} ({wall} s of training)\n\n```\n{evaluate(run, dataset)}```\n\n{curve(run)}\n")


if __name__ == "__main__":
    main()
