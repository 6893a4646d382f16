"""Benchmark: how much of the text tensor is padding, width-only vs width + text-length bucketing.

On the real dev train lines (or the bundled demo lines when ../shared is absent), at the spec's settings
(``text.max_length`` 512, batch 32, the ``bdrc`` geometry for the width buckets), it builds the shuffled
batches of ``lineclip.batch.BucketBatchSampler`` for several epochs, once grouping by image width only and
once by width and text-length bucket (``lengths=text_lengths(...)``, ``text_bucket_bytes`` 32/64/128), and
reports ``text_padding_fraction`` (padded ids / all ids after ``byte_encode``' pad to a multiple of 8),
the text positions the text tower runs on (relative to width-only; attention grows with their square, so
the sum of B * L^2 is shown too), and what the extra groups cost: short batches and, with drop_last, the
lines left out of each epoch.

    python experiments/bench_padding.py [--quick] [--data-dir DIR] [--max-length 512] [--batch-size 32]

The last line printed is one JSON object with the headline figures (text_bucket_bytes 64).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from lineclip.batch import BucketBatchSampler, LineDataset, text_lengths, text_padding_fraction
from lineclip.manifest import read_manifest
from lineclip.preprocess import LineGeometry, LineImageTransform

DEV_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tibetan_lines_dev"


def find_data(data_dir: str | None) -> tuple[Path, str]:
    """The dev lines if present (a dev tool), else the demo lines bundled with the package."""
    if data_dir:
        return Path(data_dir), "given"
    if (DEV_DATA / "train" / "meta" / "lines.jsonl").is_file():
        return DEV_DATA, "dev"
    from lineclip.config import asset_dir

    return asset_dir("demo"), "demo"


def batch_stats(batches: list[list[int]], lengths: np.ndarray, batch_size: int) -> dict[str, float]:
    widths = [-(-int(lengths[b].max()) // 8) * 8 for b in batches]
    sizes = [len(b) for b in batches]
    return {
        "padding_fraction": text_padding_fraction(batches, lengths),
        "positions": float(sum(s * w for s, w in zip(sizes, widths, strict=True))),
        "attention": float(sum(s * w * w for s, w in zip(sizes, widths, strict=True))),
        "batches": float(len(batches)),
        "short_batches": float(sum(s < batch_size for s in sizes)),
    }


def measure(
    buckets: np.ndarray, lengths: np.ndarray, batch_size: int, epochs: int, text_bucket_bytes: int | None
) -> dict[str, float]:
    """Averages over epochs of shuffled batches (drop_last False), plus lines that drop_last would leave out."""
    sampler_lengths = lengths if text_bucket_bytes else None
    sampler = BucketBatchSampler(buckets, batch_size, shuffle=True, seed=0, lengths=sampler_lengths,
                                 text_bucket_bytes=text_bucket_bytes or 64)
    per_epoch = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        per_epoch.append(batch_stats(list(sampler), lengths, batch_size))
    out = {key: float(np.mean([e[key] for e in per_epoch])) for key in per_epoch[0]}
    # Over all epochs, not a mean of per-epoch fractions: a batch-weighted mean would overweight short batches.
    padded = sum(e["padding_fraction"] * e["positions"] for e in per_epoch)
    out["padding_fraction"] = padded / sum(e["positions"] for e in per_epoch)
    dropping = BucketBatchSampler(buckets, batch_size, shuffle=True, seed=0, drop_last=True,
                                  lengths=sampler_lengths, text_bucket_bytes=text_bucket_bytes or 64)
    out["dropped_with_drop_last"] = float(int((buckets != -1).sum()) - sum(len(b) for b in dropping))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 epochs instead of 20")
    parser.add_argument("--data-dir", default=None, help="dataset dir with train/meta/lines.jsonl")
    parser.add_argument("--max-length", type=int, default=512, help="text.max_length (ids)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=None)
    args = parser.parse_args()
    epochs = args.epochs or (3 if args.quick else 20)

    data_dir, source = find_data(args.data_dir)
    records, _ = read_manifest(data_dir / "train" / "meta" / "lines.jsonl", data_dir)
    geometry = LineGeometry(56, 1024, (256, 384, 512, 768, 1024), 14)  # conf/preprocess/bdrc.yaml
    buckets = LineDataset(records, LineImageTransform("bdrc", geometry)).buckets
    lengths = text_lengths([r.text for r in records], args.max_length)
    n_truncated = int(sum(len(r.text.encode("utf-8")) + 1 > args.max_length for r in records))
    print(f"# {source} train lines: {len(records)} from {data_dir}")
    print(f"# text ids per line (bytes + </s>, capped at {args.max_length}): min {lengths.min()}, "
          f"median {int(np.median(lengths))}, max {lengths.max()}; truncated {n_truncated}")
    raw = np.array([len(r.text.encode("utf-8")) for r in records])
    print(f"# UTF-8 bytes per line before the cap: median {int(np.median(raw))}, p90 {int(np.percentile(raw, 90))}, "
          f"max {raw.max()}")
    widths, counts = np.unique(buckets, return_counts=True)
    print(f"# lines per width bucket: {dict(zip(widths.tolist(), counts.tolist(), strict=True))}")
    print(f"# batch {args.batch_size}, {epochs} shuffled epochs, pad to a multiple of 8")

    rows = {"width_only": measure(buckets, lengths, args.batch_size, epochs, None)}
    for tbb in (32, 64, 128):
        rows[f"width_and_text_{tbb}"] = measure(buckets, lengths, args.batch_size, epochs, tbb)
    base = rows["width_only"]
    print(f"\n{'grouping':<20} {'padding':>8} {'positions':>10} {'B*L^2':>7} {'batches':>8} {'short':>6} "
          f"{'dropped (drop_last)':>20}")
    for name, row in rows.items():
        print(f"{name:<20} {row['padding_fraction']:>8.3f} {row['positions'] / base['positions']:>10.3f} "
              f"{row['attention'] / base['attention']:>7.3f} {row['batches']:>8.1f} {row['short_batches']:>6.1f} "
              f"{row['dropped_with_drop_last']:>20.0f}")
    head = rows["width_and_text_64"]
    print(json.dumps({
        "bench": "padding",
        "data": source,
        "n_lines": len(records),
        "max_length": args.max_length,
        "batch_size": args.batch_size,
        "text_bucket_bytes": 64,
        "padding_fraction_width_only": round(base["padding_fraction"], 4),
        "padding_fraction_width_and_text": round(head["padding_fraction"], 4),
        "text_positions_ratio": round(head["positions"] / base["positions"], 4),
        "batches_per_epoch_width_only": base["batches"],
        "batches_per_epoch_width_and_text": head["batches"],
        "truncated_lines": n_truncated,
    }))


if __name__ == "__main__":
    main()
