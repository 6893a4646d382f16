"""Does the CPU reading recipe read? Train `experiment=cpu_read` from scratch on clean short synthetic lines (the
issue-12 benchmark), and `experiment=cpu_read_real` from the reader lineclip ships (or `--reader RUN`) on real
lines, optionally with `--mix N` degraded synthetic lines of `--mix-manifest` in its train set; score each with
`lineclip.evaluate` (whole gallery, within-page galleries, phrase queries, each beside chance and the
collection-only and length-only levels, and the OCR level where tesseract is installed) and print the learning
curves from each run's metrics.jsonl.

    python experiments/quality/run_reading.py --dev-dir ../shared/data/tibetan_lines_dev [--synth-dir D] \
        [--reader lineclip:cpu_reader] [--mix 750 --mix-manifest D2/train/meta/lines.jsonl] [--skip-stage1]

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
              "val_phrase_t2i_r10": "phrase R@10", "val_cer": "val CER", "val_read_t2i_r1": "read+match R@1"}


def data_args(dataset: Path) -> list[str]:
    return [f"data.dataset_dir={dataset}", f"data.train_manifest={dataset}/train/meta/lines.jsonl",
            f"data.val_manifest={dataset}/eval/meta/lines.jsonl"]


def mixed_train_manifest(dataset: Path, mix_manifest: Path, n: int, out: Path) -> Path:
    """The real train lines plus the first `n` lines of a synthetic manifest (paths made absolute)."""
    rows = [json.loads(x) for x in (dataset / "train" / "meta" / "lines.jsonl").read_text().splitlines() if x]
    for row in rows:
        row["line_path"] = str(dataset / row["line_path"])
    for x in mix_manifest.read_text().splitlines()[:n]:
        row = json.loads(x)
        row["id"], row["line_path"] = f"synth_{row['id']}", str(mix_manifest.parents[2] / row["line_path"])
        rows.append(row)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return out


def train(out: Path, experiment: str, dataset: Path, *overrides: str) -> None:
    if (out / "training_config.json").exists():
        return
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "lineclip.train", f"experiment={experiment}", *data_args(dataset),
                    "logger=none", "trainer.progress_bar=false", f"hydra.run.dir={out}", *overrides],
                   check=True, cwd=ROOT)
    (out / "wall_seconds").write_text(f"{time.time() - t0:.0f}")


def evaluate(run: Path, dataset: Path, levels: str = "[chance,collection,length]") -> str:
    out = run / "eval_reading.json"
    out.unlink(missing_ok=True)
    printed = subprocess.run([sys.executable, "-m", "lineclip.evaluate", f"run_dir={run}",
                              f"manifest={dataset}/eval/meta/lines.jsonl", "eval.gallery_by=page_id",
                              "eval.queries=[line,phrase]", f"eval.levels={levels}", f"eval.output={out}",
                              "progress=false"],
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
    parser.add_argument("--reader", default="lineclip:cpu_reader", help="stage 2 starts from this bundle")
    parser.add_argument("--mix", type=int, default=0, help="synthetic lines added to the real train lines")
    parser.add_argument("--mix-manifest", type=Path, help="where the --mix lines come from (a synth train manifest)")
    parser.add_argument("--skip-stage1", action="store_true", help="only stage 2 (the from-scratch run is long)")
    parser.add_argument("--levels", default="[chance,collection,length]", help="eval.levels of the reports")
    parser.add_argument("--name", default="cpu_read_real", help="stage 2's run dir under --out")
    args = parser.parse_args()
    synth, dev, out = args.synth_dir.resolve(), args.dev_dir.resolve(), args.out.resolve()
    stage1, stage2 = out / "cpu_read", out / args.name
    reports = []
    if not args.skip_stage1:
        if not (synth / "train" / "meta" / "lines.jsonl").exists():
            subprocess.run([sys.executable, "-m", "lineclip.synth", f"out_dir={synth}", *SYNTH_ARGS], check=True,
                           cwd=ROOT)
        train(stage1, "cpu_read", synth)
        reports.append(("cpu_read, synthetic eval pages", stage1, synth))
    overrides = [f"model.init_from={args.reader}"]
    if args.mix:
        mixed = mixed_train_manifest(dev, args.mix_manifest.resolve(), args.mix, stage2.parent / f"{args.name}.jsonl")
        overrides += [f"data.train_manifest={mixed}"]
    train(stage2, "cpu_read_real", dev, *overrides)
    reports.append((f"{args.name}, real dev eval pages", stage2, dev))
    for name, run, dataset in reports:
        wall = (run / "wall_seconds").read_text().strip() if (run / "wall_seconds").exists() else "?"
        print(f"## {name} ({wall} s of training)\n\n```\n{evaluate(run, dataset, args.levels)}```\n\n{curve(run)}\n")


if __name__ == "__main__":
    main()
