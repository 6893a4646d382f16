"""Benchmark: line images per second per CPU core through the data path, and the data-loader workers a GPU needs.

What one data-loader worker does per batch is timed on the real dev lines at their original resolution
(``../shared/data/tibetan_lines_dev``; the bundled demo lines, downscaled to 56 px, when that is absent):
``LineDataset.__getitem__`` (read + decode the file, the pipeline, geometry, normalisation) for each line of
a batch of 32, then ``LineCollator`` (stack + byte-encode the texts, ``text.max_length`` 512). Each pipeline
(none / pb / bdrc) runs with the eval transform and with the augmenting train transform.

One process, one thread (``cv2.setNumThreads(1)``, ``torch.set_num_threads(1)``): a data-loader worker is
one process, so lines/s of one thread is lines/s per core. The rate is lines per second of this process's
CPU time (``time.process_time``), so other work on a shared box does not count against it; the wall-clock
rate is printed next to it. Files are read once before timing (page cache warm), as in a steady-state epoch.
Configurations are interleaved over ``--rounds``; the best round of each is kept. The per-stage columns
(decode, transform, collate, each timed alone, best of the rounds) show where the time goes.

Workers per GPU = ceil(GPU samples/s / lines/s per core). The GPU rate comes from ``--gpu-samples-per-s``;
by default it is an ASSUMPTION (600 samples/s for dinov2-base + byt5-small, batch 32, bf16, on one H100),
not a measurement: replace it with bench_gpu's figure when one is recorded in experiments/RESULTS.md.

    python experiments/bench_data.py [--quick] [--data-dir DIR] [--gpu-samples-per-s 600]

The last line printed is one JSON object with the headline figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from lineclip.batch import BucketBatchSampler, LineCollator, LineDataset
from lineclip.lines import LineRecord
from lineclip.manifest import read_manifest
from lineclip.preprocess import PIPELINES, LineGeometry, LineImageTransform

DEV_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tibetan_lines_dev"
ASSUMED_GPU_SAMPLES_PER_S = 600.0
BATCH_SIZE = 32
MAX_LENGTH = 512
GEOMETRY = LineGeometry(56, 1024, (256, 384, 512, 768, 1024), 14)  # conf/preprocess/*.yaml


def find_data(data_dir: str | None) -> tuple[Path, str]:
    """The dev lines if present (a dev tool), else the demo lines bundled with the package."""
    if data_dir:
        return Path(data_dir), "given"
    if (DEV_DATA / "train" / "meta" / "lines.jsonl").is_file():
        return DEV_DATA, "dev"
    from lineclip.config import asset_dir

    return asset_dir("demo"), "demo (downscaled to 56 px: NOT original resolution)"


def load_records(data_dir: Path, limit: int | None) -> list[LineRecord]:
    records: list[LineRecord] = []
    for split in ("train", "eval"):
        manifest = data_dir / split / "meta" / "lines.jsonl"
        if manifest.is_file():
            records += read_manifest(manifest, data_dir)[0]
    return records[:limit] if limit else records


def time_loader_work(dataset: LineDataset, batches: list[list[int]], collate: LineCollator) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of what a data-loader worker does for these batches."""
    cpu, wall = time.process_time(), time.perf_counter()
    for batch in batches:
        out = collate([dataset[i] for i in batch])
        if out["n_corrupt"]:
            raise RuntimeError(f"{out['n_corrupt']} corrupt lines in a benchmark batch")
    return time.process_time() - cpu, time.perf_counter() - wall


def time_stages(
    records: list[LineRecord], transform: LineImageTransform, batches: list[list[int]], collate: LineCollator
) -> dict[str, float]:
    """CPU ms per line of each stage alone: decode, transform, collate (the breakdown of the loader's time)."""
    cpu = time.process_time()
    images = []
    for record in records:
        with Image.open(record.image_path) as image:
            image.load()
        images.append(image)
    decode = time.process_time() - cpu
    cpu = time.process_time()
    items = [{"pixel_values": transform(image), "text": r.text, "index": i} for i, (image, r) in
             enumerate(zip(images, records, strict=True))]
    transform_s = time.process_time() - cpu
    cpu = time.process_time()
    for batch in batches:
        collate([items[i] for i in batch])
    collate_s = time.process_time() - cpu
    n = len(records)
    return {"decode_ms": 1e3 * decode / n, "transform_ms": 1e3 * transform_s / n, "collate_ms": 1e3 * collate_s / n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="128 lines, 2 rounds (< 1 min)")
    parser.add_argument("--data-dir", default=None, help="dataset dir with {train,eval}/meta/lines.jsonl")
    parser.add_argument("--lines", type=int, default=None, help="lines to time (default: all; --quick 128)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved repetitions (default 3; --quick 2)")
    parser.add_argument("--gpu-samples-per-s", type=float, default=None,
                        help=f"measured GPU training rate (default: an assumed {ASSUMED_GPU_SAMPLES_PER_S:.0f})")
    args = parser.parse_args()
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    limit = args.lines or (128 if args.quick else None)
    rounds = args.rounds or (2 if args.quick else 3)

    data_dir, source = find_data(args.data_dir)
    records = load_records(data_dir, limit)
    for record in records:  # warm the page cache: time decoding, not the disk
        Path(record.image_path).read_bytes()
    sizes = np.array([Image.open(r.image_path).size for r in records])
    print(f"# {platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
          f"opencv {cv2.__version__}, torch {torch.__version__}, 1 thread")
    mean_w, mean_h = sizes.mean(axis=0)
    print(f"# {source}: {len(records)} lines from {data_dir}; mean size {mean_w:.0f}x{mean_h:.0f} px; "
          f"batch {BATCH_SIZE}, text.max_length {MAX_LENGTH}; best of {rounds} rounds")

    configs = [(pipeline, augment) for pipeline in PIPELINES for augment in (False, True)]
    setups = {}
    for pipeline, augment in configs:
        transform = LineImageTransform(pipeline, GEOMETRY, augment=augment, seed=0 if augment else None)
        dataset = LineDataset(records, transform, header_workers=1)
        batches = list(BucketBatchSampler(dataset.buckets, BATCH_SIZE, shuffle=False))
        setups[pipeline, augment] = (dataset, batches, transform)
    collate = LineCollator(MAX_LENGTH)
    best: dict[tuple[str, bool], tuple[float, float]] = {}
    stages: dict[tuple[str, bool], dict[str, float]] = {}
    for _ in range(rounds):
        for key in configs:
            dataset, batches, transform = setups[key]
            cpu, wall = time_loader_work(dataset, batches, collate)
            if key not in best or cpu < best[key][0]:
                best[key] = (cpu, wall)
            stage = time_stages(records, transform, batches, collate)
            stages[key] = {k: min(v, stages.get(key, stage)[k]) for k, v in stage.items()}

    gpu_rate = args.gpu_samples_per_s or ASSUMED_GPU_SAMPLES_PER_S
    assumed = args.gpu_samples_per_s is None
    print(f"\n{'pipeline':<9} {'transform':<10} {'lines/cpu-s':>11} {'lines/wall-s':>12} {'decode ms':>9} "
          f"{'transform ms':>12} {'collate ms':>10} {'workers/GPU':>11}")
    summary: dict[str, object] = {"bench": "data", "data": source.split(" ")[0], "lines": len(records)}
    for (pipeline, augment), (cpu, wall) in best.items():
        rate = len(records) / cpu
        stage = stages[pipeline, augment]
        workers = math.ceil(gpu_rate / rate)
        name = "augment" if augment else "eval"
        print(f"{pipeline:<9} {name:<10} {rate:>11.0f} {len(records) / wall:>12.0f} {stage['decode_ms']:>9.2f} "
              f"{stage['transform_ms']:>12.2f} {stage['collate_ms']:>10.2f} {workers:>11d}")
        summary[f"{pipeline}_{name}_lines_per_s_per_core"] = round(rate, 1)
        summary[f"{pipeline}_{name}_workers_per_gpu"] = workers
    bdrc = min(summary["bdrc_eval_lines_per_s_per_core"], summary["bdrc_augment_lines_per_s_per_core"])
    summary["bdrc_lines_per_s_per_core"] = bdrc
    summary["gpu_samples_per_s"] = gpu_rate
    summary["gpu_rate_is_assumption"] = assumed
    summary["bdrc_workers_per_gpu"] = math.ceil(gpu_rate / bdrc)
    note = "ASSUMED (no measured bench_gpu figure)" if assumed else "given"
    print(f"\nGPU rate {gpu_rate:.0f} samples/s ({note}): bdrc needs {summary['bdrc_workers_per_gpu']} data-loader "
          f"workers per GPU (one core each), plus the training process's own core.")
    summary["load_avg_1min"] = round(os.getloadavg()[0], 1)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
