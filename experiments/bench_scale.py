"""Benchmark: start-up time and memory per line of `lineclip.train` on a large generated manifest.

A manifest of N rows is generated from the bundled demo lines (160 images; every row a distinct text: the demo
transcription plus its row number), either pointing at the 160 demo files themselves (`--images repeated`, the
setup of issue 16's baseline: 1M rows took 134 s to two steps) or at N distinct hard links to them
(`--images distinct`: every row its own file, as in a real dataset, still all in the page cache).
Then, each as its own `python -m lineclip.train` process (tiny towers, `data.num_workers=2`, val off,
`trainer.max_steps=2`, no export):

- parse: `read_line_table` alone, in this process (rows/s of the manifest parse and validation);
- cold: no line cache: parse + header scan (each distinct file once; none with `--manifest-sizes`, where the
  rows keep the demo's true width/height) + the cache written, then two steps;
- warm: the same command again, with the cache.

For each run: wall time to the start of the loop (`start-up`, the trainer's "N train lines" log line), to the
end of the first step (`first step`: the first row of metrics.jsonl, `trainer.log_every_steps=1`) and to the
end of the process; and the peak memory of the main process and of its children (the data-loader workers; in
the cold run also the parse and scan pool), sampled every 0.2 s from /proc: VmRSS, and its two parts RssAnon
(private memory, copy-on-write copies included: what a process really costs) and RssFile (mapped file pages: the
memory-mapped line cache and the libraries; page cache, shared by every process that maps the file, reclaimable).
Per line: the peak divided by N, raw and above the same command's peak on a 1,000-row manifest (the fixed cost of
Python, torch, the tiny towers).

    python experiments/bench_scale.py [--quick] [--rows 1000000] [--images repeated|distinct] [--skip-cold]

The last line printed is one JSON object with the figures. `--quick`: 20,000 rows.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from lineclip.config import asset_dir
from lineclip.manifest import read_line_table

BASELINE_ROWS = 1_000
ISSUE_COLD_S = 134.0  # issue 16: 1M rows, repeated demo images, two steps, this box, before the line cache


def generate(path: Path, n: int, images: str, image_dir: Path, sizes: bool) -> None:
    demo = asset_dir("demo")
    rows = [json.loads(line) for line in (demo / "train" / "meta" / "lines.jsonl").read_text().splitlines()]
    files = [str(demo / row["line_path"]) for row in rows]
    if images == "distinct":
        image_dir.mkdir(parents=True, exist_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for i in range(n):
            row = dict(rows[i % len(rows)])
            if images == "distinct":
                target = image_dir / f"{i // 10000:04d}" / f"{i}.jpg"
                if i % 10000 == 0:
                    target.parent.mkdir(exist_ok=True)
                if not target.exists():
                    os.link(files[i % len(rows)], target)
                row["line_path"] = str(target)
            else:
                row["line_path"] = files[i % len(rows)]
            if not sizes:  # the demo rows carry their true width/height: without them every header is read
                row.pop("width", None), row.pop("height", None)
            row["id"] = f"line{i}"
            row["text"] = f"{row['text']} {i}"
            out.write(json.dumps(row, ensure_ascii=False) + "\n")


def clear_cache(manifest: Path) -> None:
    for cache in manifest.parent.glob(f".{manifest.name}.lineclip-*.arrow"):
        cache.unlink()


def _status(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon (private memory: what a process really costs, COW copies included) and RssFile (mapped file
    pages: the line cache, libraries; page cache that every process mapping the file shares), in bytes."""
    fields = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                fields[key] = int(value.split()[0]) * 1024
    return fields


class TreeMonitor:
    """Peak VmRSS, RssAnon and RssFile (every 0.2 s) of a process and each of its descendants, by pid."""

    KINDS = ("VmRSS", "RssAnon", "RssFile")

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.peak: dict[int, dict[str, int]] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                return
            for proc in procs:
                try:
                    now = _status(proc.pid)
                except (OSError, ValueError):
                    continue
                peak = self.peak.setdefault(proc.pid, dict.fromkeys(self.KINDS, 0))
                for kind in self.KINDS:
                    peak[kind] = max(peak[kind], now.get(kind, 0))
            time.sleep(0.2)

    def peaks(self) -> dict[str, float]:
        self.stop.set()
        self.thread.join()
        main = self.root.pid
        others = [pid for pid in self.peak if pid != main]
        out: dict[str, float] = {"n_children": len(others)}
        for kind in self.KINDS:
            out[f"main_{kind}"] = self.peak.get(main, {}).get(kind, 0)
            out[f"child_{kind}"] = max((self.peak[p][kind] for p in others), default=0)
        return out


def train_run(manifest: Path, run_dir: Path, workers: int, *overrides: str) -> dict[str, float]:
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "lineclip.train", "data=openpecha", f"data.dataset_dir={manifest.parent}",
           f"data.train_manifest={manifest}", "data.val_manifest=null", "trainer.max_steps=2",
           "trainer.export_embeddings=false", f"data.num_workers={workers}", "trainer.log_every_steps=1",
           "trainer.progress_bar=false", "logger=none", f"hydra.run.dir={run_dir}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    monitor = TreeMonitor(proc.pid)
    startup = first_step = None
    log, metrics = run_dir / "train.log", run_dir / "metrics.jsonl"
    while proc.poll() is None:
        now = time.perf_counter() - start
        if startup is None and log.exists() and " train lines, " in log.read_text(errors="ignore"):
            startup = now
        if first_step is None and metrics.exists() and metrics.stat().st_size > 0:
            first_step = now
        time.sleep(0.05)
    total = time.perf_counter() - start
    peaks = monitor.peaks()
    if proc.returncode != 0:
        raise SystemExit(f"train failed ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
    return {"startup_s": startup or total, "first_step_s": first_step or total, "total_s": total, **peaks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--images", choices=("repeated", "distinct"), default="repeated")
    parser.add_argument("--workers", type=int, default=2, help="data.num_workers")
    parser.add_argument("--manifest-sizes", action="store_true",
                        help="keep the demo rows' width/height (true sizes: no header scan); default: drop them")
    parser.add_argument("--workdir", default="/tmp/lineclip_bench_scale")
    parser.add_argument("--skip-cold", action="store_true", help="only the warm start (the cache must exist)")
    parser.add_argument("--scan-workers", type=int, default=None,
                        help="data.scan_workers of the cold run (1: a one-pass parse, one copy of the lines)")
    parser.add_argument("--skip-parse", action="store_true", help="no in-process parse timing (saves its memory)")
    args = parser.parse_args()
    n = 20_000 if args.quick else args.rows
    work = Path(args.workdir)
    kind = f"{args.images}{'_sized' if args.manifest_sizes else ''}"
    manifest = work / f"{kind}_{n}" / "lines.jsonl"
    baseline_manifest = work / f"{kind}_{BASELINE_ROWS}" / "lines.jsonl"
    for path, rows in ((manifest, n), (baseline_manifest, BASELINE_ROWS)):
        if not path.exists():
            t = time.perf_counter()
            generate(path, rows, args.images, work / f"images_{args.images}", args.manifest_sizes)
            print(f"generated {rows} rows in {time.perf_counter() - t:.1f} s: {path}", flush=True)

    results: dict[str, object] = {"bench": "scale", "rows": n, "images": args.images,
                                  "manifest_sizes": args.manifest_sizes, "num_workers": args.workers,
                                  "cpus": len(os.sched_getaffinity(0))}
    if not args.skip_parse:
        for workers in (1, 2):  # one pass, and the process pool (manifests of 64 MB or more)
            t = time.perf_counter()
            table, report = read_line_table(manifest, manifest.parent, workers=workers)
            parse_s = time.perf_counter() - t
            assert report.rows_used == n, report.summary()
            del table
            print(f"parse, {workers} process(es): {n} rows in {parse_s:.1f} s ({n / parse_s:,.0f} rows/s)", flush=True)
            results[f"parse_{workers}proc_s"] = round(parse_s, 2)
    train_run(baseline_manifest, work / "run_baseline", args.workers)  # cache-less (< 10k rows): the fixed cost
    base = train_run(baseline_manifest, work / "run_baseline", args.workers)
    runs = {}
    if not args.skip_cold:
        clear_cache(manifest)
        extra = [f"data.scan_workers={args.scan_workers}"] if args.scan_workers else []
        runs["cold"] = train_run(manifest, work / "run_cold", args.workers, *extra)
    runs["warm"] = train_run(manifest, work / "run_warm", args.workers)
    for name, run in runs.items():
        row = {key: round(run[key], 1) for key in ("startup_s", "first_step_s", "total_s")}
        for who in ("main", "child"):
            for kind in TreeMonitor.KINDS:
                key = f"{who}_{kind}"
                row[f"{key}_mb"] = round(run[key] / 2**20)
                row[f"{key}_b_per_line"] = round(run[key] / n)
                row[f"{key}_b_per_line_above_baseline"] = round((run[key] - base[key]) / n)
        row["n_children"] = run["n_children"]
        results[name] = row
        print(f"{name}: {row}", flush=True)
    results["baseline_1000_rows_mb"] = {k: round(v / 2**20) for k, v in base.items() if k.startswith(("main", "child"))}
    if "cold" in runs:
        results["cold_speedup_vs_issue_134s"] = round(ISSUE_COLD_S / runs["cold"]["total_s"], 2)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
