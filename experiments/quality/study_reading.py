"""Issue 20's reading studies, side by side from random init on the issue-12 benchmark (clean short synthetic lines,
`experiment=cpu_read`): which tokens and reading targets make a from-scratch tower read soonest on 2 CPU cores.

Arms (each `--steps` steps, validated every `--eval-every` on the held-out synthetic pages, one after another in one
invocation so that their speeds compare on the same box):

- `patches`:    cpu_read as shipped: 8x8 patches, a covering position table, 4 CTC frames a patch column
- `strips2`:    full-height [32, 4] strips (model=dinov2_cpu_strip), 2 CTC frames a strip (the shipped reader's)
- `strips1`, `strips4`: the same with 1 and 4 CTC frames a strip
- `strips2_bag`: strips2 plus the bag-of-characters target on the pooled image token (loss.bag_weight=1)
- `strips2_phoc`: strips2 plus order-aware bags (PHOC's pyramid, levels 1-3: which characters occur in each half
  and third of the line) on both towers' pooled features (loss.bag_levels=[1,2,3], bag_weight=text_bag_weight=1)
- `strips2_readfirst`: a read-first schedule: the first third of the steps mostly CTC (loss.reading_weight=10),
  then the rest from it at reading_weight 1 with the image tower at 0.3x the lr (LiT-style)
- `strips2_1thread`: strips2 on one thread (trainer.cpu_threads=1) for `--thread-steps` steps: samples/s against
  strips2's two threads

    python experiments/quality/study_reading.py [--synth-dir D] [--out D] [--steps 300] [--arms strips2,patches]

Prints, per arm, its wall time, samples/s and the validation curve (CTC, CER, read+match and embedding recall).
Runs go to experiments/quality/runs/study/ (ignored by git); an arm whose run dir is complete is not run again.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from run_reading import ROOT, SYNTH_ARGS, curve, train

STRIPS = ["model=dinov2_cpu_strip", "preprocess.patch_multiple=4"]
ARMS: dict[str, list[str]] = {
    "patches": [],
    "strips2": [*STRIPS, "loss.reading_frames_per_column=2"],
    "strips1": [*STRIPS, "loss.reading_frames_per_column=1"],
    "strips4": [*STRIPS, "loss.reading_frames_per_column=4"],
    "strips2_bag": [*STRIPS, "loss.reading_frames_per_column=2", "loss.bag_weight=1.0"],
    "strips2_phoc": [*STRIPS, "loss.reading_frames_per_column=2", "loss.bag_weight=1.0", "loss.bag_levels=[1,2,3]",
                     "loss.text_bag_weight=1.0"],
}


def samples_per_second(run: Path) -> float:
    """Training samples per second: the median of the logged windows after step 20 (the first ones hold the loader's
    start-up, a window with a validation in it is slower)."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
    rates = [r["train/samples_per_s"] for r in rows if "train/samples_per_s" in r and r["step"] > 20]
    return statistics.median(rates) if rates else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--synth-dir", type=Path, default=ROOT / "experiments" / "quality" / "runs" / "synth_short")
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "quality" / "runs" / "study")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--thread-steps", type=int, default=40)
    parser.add_argument("--arms", default="strips2,strips2_1thread,patches,strips4,strips1,strips2_bag,strips2_phoc,"
                                          "strips2_readfirst")
    args = parser.parse_args()
    synth, out = args.synth_dir.resolve(), args.out.resolve()
    if not (synth / "train" / "meta" / "lines.jsonl").exists():
        subprocess.run([sys.executable, "-m", "lineclip.synth", f"out_dir={synth}", *SYNTH_ARGS], check=True, cwd=ROOT)

    def budget(steps: int, eval_every: int = args.eval_every, threads: int = 2) -> list[str]:
        """An arm's steps, validations and threads (one checkpoint: the final bundle)."""
        return [f"trainer.max_steps={steps}", f"trainer.eval_every_steps={eval_every}",
                f"trainer.checkpoint_every_steps={steps}", f"trainer.cpu_threads={threads}", "data.num_workers=1",
                "trainer.export_embeddings=false"]

    for arm in args.arms.split(","):
        run = out / arm
        if arm == "strips2_1thread":
            train(run, "cpu_read", synth, *ARMS["strips2"], *budget(args.thread_steps, args.thread_steps, threads=1))
        elif arm == "strips2_readfirst":
            first = args.steps // 3
            train(out / "readfirst_a", "cpu_read", synth, *ARMS["strips2"], *budget(first, first),
                  "loss.reading_weight=10")
            train(run, "cpu_read", synth, *ARMS["strips2"], *budget(args.steps - first),
                  f"model.init_from={out / 'readfirst_a'}", "model.backbone_lr_multiplier=0.3",
                  "optim.warmup_steps=20")
            wall = int((out / "readfirst_a" / "wall_seconds").read_text())
            print(f"## readfirst_a (the first {first} steps, {wall} s)\n\n{curve(out / 'readfirst_a')}\n")
        else:
            train(run, "cpu_read", synth, *ARMS[arm], *budget(args.steps))
        wall = int((run / "wall_seconds").read_text())
        print(f"## {arm} ({wall} s, {samples_per_second(run):.1f} samples/s)\n\n{curve(run)}\n", flush=True)


if __name__ == "__main__":
    main()
