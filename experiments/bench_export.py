"""Memory of the final corpus export per process: the gather every rank used to do vs per-process parts merged on
the main process (lineclip.corpus.EmbeddingPart / merge_parts, what lineclip.validation.export_corpus and
lineclip.index now run). The model is not what is measured: rows are random float32 made batch by batch, as
the towers would hand them over.

    python experiments/bench_export.py [--quick] [--n 1000000] [--dim 256] [--world 2] [--batch 64]

- `gather` (before): each process concatenates its rows, pads them to the longest share, gathers every
  process's share, drops the padding and sorts: the sequence of accelerate/torch calls the old
  `embed_dataset` made, done with numpy (the same copies), on every process; the main process saves the file.
- `parts` (now): each process appends each batch to its part file; the main process merges the parts into
  the corpus `.npy` through a memmap.
Peak heap: tracemalloc's peak (numpy's array buffers are traced; pages of memory-mapped files are not:
the kernel pages them in and out as the file system's cache). Each method in a fresh subprocess; the
simulated processes run one after the other and the worst one's peak is reported. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np


def shares(n: int, world: int, batch: int) -> list[list[np.ndarray]]:
    """Batches of dataset indices dealt round-robin, as line_batches deals them (one bucket: plain order)."""
    batches = [np.arange(s, min(s + batch, n)) for s in range(0, n, batch)]
    return [batches[r::world] for r in range(world)]


def rows(indices: np.ndarray, dim: int) -> np.ndarray:
    return np.random.default_rng(int(indices[0])).standard_normal((len(indices), dim), dtype=np.float32)


def gather_peak(n: int, dim: int, world: int, batch: int) -> dict:
    dealt = shares(n, world, batch)
    peaks = []
    longest = max(sum(len(b) for b in share) for share in dealt)
    for rank in range(world):
        tracemalloc.start()
        image = np.concatenate([rows(b, dim) for b in dealt[rank]])
        index = np.concatenate(dealt[rank]).astype(np.int64)
        padded = np.zeros((longest, dim), np.float32)  # pad_across_processes
        padded[: len(image)] = image
        padded_index = np.full(longest, -1, np.int64)
        padded_index[: len(index)] = index
        # gather: every process's padded share, in one buffer
        gathered = np.concatenate([padded if r == rank else np.zeros_like(padded) for r in range(world)])
        gathered_index = np.concatenate([padded_index] * world)
        keep = gathered_index >= 0
        order = np.argsort(gathered_index[keep])
        corpus = gathered[keep][order]
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        if rank == 0:  # the main process then wrote the corpus file (as the parts' merge does)
            with tempfile.TemporaryDirectory() as tmp:
                np.save(Path(tmp) / "faiss_embeddings.npy", corpus)
        del image, padded, gathered, corpus
    return {"peak_mib": max(peaks) / 2**20}


def parts_peak(n: int, dim: int, world: int, batch: int) -> dict:
    from lineclip.corpus import EmbeddingPart, merge_parts

    dealt = shares(n, world, batch)
    peaks = []
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        for rank in range(world):
            tracemalloc.start()
            with EmbeddingPart(directory, rank, dim) as part:
                for b in dealt[rank]:
                    part.append(b, rows(b, dim))
            peaks.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()
        tracemalloc.start()
        order = merge_parts(directory, world, dim, directory / "faiss_embeddings.npy")
        merge_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        merged = np.load(directory / "faiss_embeddings.npy", mmap_mode="r")
        assert len(order) == n and merged.shape == (n, dim)
        probe = [0, n // 3, n - 1]  # rows landed where they belong
        for i in probe:
            b = next(b for share in dealt for b in share if b[0] <= i <= b[-1])
            assert np.array_equal(merged[i], rows(b, dim)[i - b[0]])
    return {"peak_mib": max(peaks) / 2**20, "merge_peak_mib": merge_peak / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--method", choices=["gather", "parts"], help=argparse.SUPPRESS)  # a subprocess's own
    args = parser.parse_args()
    n = 100_000 if args.quick else args.n
    if args.method:
        t0 = time.perf_counter()
        result = (gather_peak if args.method == "gather" else parts_peak)(n, args.dim, args.world, args.batch)
        print(json.dumps({**result, "seconds": time.perf_counter() - t0}))
        return
    results = {}
    for method in ("gather", "parts"):
        out = subprocess.run([sys.executable, __file__, "--method", method, "--n", str(n), "--dim", str(args.dim),
                              "--world", str(args.world), "--batch", str(args.batch)],
                             capture_output=True, text=True, check=True)
        results[method] = json.loads(out.stdout.strip().splitlines()[-1])
        print(method, results[method], flush=True)
    corpus_mib = n * args.dim * 4 / 2**20
    print(json.dumps({
        "bench": "export", "n": n, "dim": args.dim, "world": args.world, "corpus_mib": round(corpus_mib, 1),
        "gather_peak_mib_per_process": round(results["gather"]["peak_mib"], 1),
        "parts_peak_mib_per_process": round(results["parts"]["peak_mib"], 2),
        "parts_merge_peak_mib_main": round(results["parts"]["merge_peak_mib"], 1),
        "merge_bytes_per_line": round(results["parts"]["merge_peak_mib"] * 2**20 / n, 1),
        "gather_s": round(results["gather"]["seconds"], 1), "parts_s": round(results["parts"]["seconds"], 1)}))


if __name__ == "__main__":
    main()
