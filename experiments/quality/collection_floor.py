"""The training loss a model reaches by knowing only each line's collection: with the recipe's own batches
(width buckets, batch 64), a line whose collection has c members in its batch scores at best ln(c) when the
model spreads its belief evenly over them. A training loss that stays above this floor has learnt no more than
the collection.

    python experiments/quality/collection_floor.py --dev-dir ../shared/data/tibetan_lines_dev
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from lineclip.batch import BucketBatchSampler, LineDataset, group_keys
from lineclip.config import compose
from lineclip.manifest import read_manifest
from lineclip.preprocess import LineGeometry, LineImageTransform


def collection_floor(dev_dir: Path, overrides: list[str] = (), epochs: int = 3) -> float | None:
    """Mean over `epochs` of the recipe's batches of ln(members of the line's collection in its batch); None
    when the train manifest has no `collection` field."""
    manifest = dev_dir.resolve() / "train" / "meta" / "lines.jsonl"
    cfg = compose("train", ["experiment=cpu_scratch", *overrides])
    records, _ = read_manifest(manifest, dev_dir)
    collections = [r.extra.get("collection") for r in records]
    if None in collections:
        return None
    p = cfg.preprocess
    geometry = LineGeometry(p.target_height, p.max_width, tuple(p.width_buckets), p.patch_multiple)
    lines = LineDataset(records, LineImageTransform(p.pipeline, geometry))
    # Seeded and stepped through epochs as the trainer does, so these are the batches a cpu_scratch run trains on.
    groups = group_keys(records, cfg.data.group_batches_by) if cfg.data.group_batches_by else None
    sampler = BucketBatchSampler(lines.buckets, cfg.data.batch_size, shuffle=True, seed=cfg.trainer.seed,
                                 groups=groups, min_batch_size=min(cfg.data.min_batch_size, cfg.data.batch_size))
    total, count = 0.0, 0
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for batch in sampler:
            members = [collections[i] for i in batch]
            total += sum(math.log(members.count(c)) for c in members)
            count += len(members)
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dev-dir", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=3, help="epochs of batches to average over")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides on top of experiment=cpu_scratch")
    args = parser.parse_args()
    floor = collection_floor(args.dev_dir, args.overrides, args.epochs)
    print(json.dumps({"collection_floor": None if floor is None else round(floor, 3)}))


if __name__ == "__main__":
    main()
