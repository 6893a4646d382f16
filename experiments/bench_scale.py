"""Benchmark: a cold and a warm start of `python -m lineclip.train` on a large manifest, run as a user runs it.

The setup of issue 25: an N-row JSONL manifest made of the bundled demo's 160 train rows repeated (`line_path`
absolute, `text` the demo text plus " <i>", ids `l<i>`, no width/height columns, every other demo field kept),
the images in the page cache, no line cache; then, as its own process, exactly the issue's command:

    /usr/bin/time -v python -m lineclip.train data=openpecha data.dataset_dir=<demo> data.train_manifest=<manifest>
        data.val_manifest=null logger=none trainer.max_steps=2 trainer.export_embeddings=false
        trainer.checkpoint_every_steps=1000 trainer.progress_bar=false data.num_workers=2

run in a fresh working dir (Hydra's default run dir `outputs/<date>/<time>` lands there), with the caller's
environment. First cold (no line cache: parse, header scan, cache written), then the same command warm.

Recorded per run: the wall time to the end of step 2 (the process end: two steps, no export), GNU time's
"Maximum resident set size" (the largest peak of the main process and the descendants it waited for), and
per process (the main one, the parse/scan pools, the loader workers) the kernel's own peak resident set
(VmHWM of /proc/<pid>/status, read every 0.1 s while the process lives) with its parts at the sampled peak
(RssAnon: private memory; RssFile: mapped file pages such as the memory-mapped line cache, shared page
cache). Also the trainer's per-phase timing line from train.log (`start-up phases: ...`).

    python experiments/bench_scale.py [--rows 1000000] [--src DIR] [--skip-warm] [--workdir DIR]
    python experiments/bench_scale.py --cache-build-only --rows N [--src DIR]

`--cache-build-only`: the cold line-cache build alone (lineclip.sizes.load_line_table with the trainer's settings:
parse, header scan, cache write), as its own process under /usr/bin/time -v, for the memory of that phase at
several N (the one that grew with the number of rows).

`--src DIR` runs the command against the lineclip checkout in DIR (PYTHONPATH=DIR), e.g. a checkout of an older
commit, for a before/after pair on the same box and manifest. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from lineclip.config import asset_dir

KINDS = ("VmHWM", "VmRSS", "RssAnon", "RssFile")


def generate(path: Path, n: int) -> None:
    """The issue's manifest: the demo's train rows repeated, absolute `line_path`, text + " <i>", id `l<i>`, no
    width/height (every image header is read, each distinct file once)."""
    demo = asset_dir("demo")
    rows = [json.loads(line) for line in (demo / "train" / "meta" / "lines.jsonl").read_text().splitlines()]
    for row in rows:
        row["line_path"] = str(demo / row["line_path"])  # the demo's paths are relative to its root
        assert Path(row["line_path"]).is_file(), row["line_path"]
        row.pop("width", None), row.pop("height", None)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as out:
        for i in range(n):
            row = dict(rows[i % len(rows)])
            row["id"] = f"l{i}"
            row["text"] = f"{row['text']} {i}"
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def clear_cache(manifest: Path) -> None:
    for cache in manifest.parent.glob(f".{manifest.name}.lineclip-*"):
        cache.unlink()


def _status(pid: int) -> dict[str, int]:
    fields = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in KINDS:
                fields[key] = int(value.split()[0]) * 1024
    return fields


class TreeMonitor:
    """Per process of a tree (by pid): the kernel's peak RSS (VmHWM) and, at the highest sampled VmRSS, its
    anonymous and file-backed parts; sampled every 0.1 s."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.peak: dict[int, dict[str, int]] = {}
        self.names: dict[int, str] = {}
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
                    if proc.pid not in self.names:
                        self.names[proc.pid] = " ".join(proc.cmdline()[:3])[:60]
                except (OSError, ValueError, psutil.Error):
                    continue
                peak = self.peak.setdefault(proc.pid, dict.fromkeys(KINDS, 0))
                peak["VmHWM"] = max(peak["VmHWM"], now.get("VmHWM", 0))
                if now.get("VmRSS", 0) >= peak["VmRSS"]:
                    peak.update({k: now.get(k, 0) for k in ("VmRSS", "RssAnon", "RssFile")})
            time.sleep(0.1)

    def result(self, main_pid: int) -> dict[str, object]:
        self.stop.set()
        self.thread.join()
        procs = []
        for pid, peak in self.peak.items():
            if pid == self.root.pid:
                continue  # /usr/bin/time itself
            role = "main" if pid == main_pid else "child"
            procs.append({"pid": pid, "role": role, **{f"{k}_mb": round(v / 2**20) for k, v in peak.items()}})
        procs.sort(key=lambda p: (p["role"] != "main", p["pid"]))
        children = [p for p in procs if p["role"] == "child"]
        main = next((p for p in procs if p["role"] == "main"), {})
        return {"main_peak_mb": main.get("VmHWM_mb", 0),
                "child_peak_mb": max((p["VmHWM_mb"] for p in children), default=0),
                "n_children": len(children), "processes": procs}


def _gnu_time(stderr: str) -> dict[str, float]:
    out = {}
    found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    if found:
        out["gnu_time_max_rss_mb"] = round(int(found.group(1)) / 1024)
    found = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", stderr)
    if found:
        hours, minutes, seconds = found.groups()
        out["gnu_time_wall_s"] = round(int(hours or 0) * 3600 + int(minutes) * 60 + float(seconds), 1)
    return out


def _run_monitored(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str, dict]:
    """Run `cmd` (under /usr/bin/time -v) to its end, sampling the peak RSS of its process tree; the finished
    process, its stderr and {wall_s, GNU time's fields, each process's peak}. The main process is time's first child."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)
    monitor = TreeMonitor(proc.pid)
    main_pid = None
    while main_pid is None and proc.poll() is None:
        kids = psutil.Process(proc.pid).children()
        main_pid = kids[0].pid if kids else None
        time.sleep(0.01)
    _, stderr = proc.communicate()
    wall = time.perf_counter() - start
    return proc, stderr, {"wall_s": round(wall, 1), **_gnu_time(stderr), **monitor.result(main_pid or -1)}


def _phases(run_dir: Path) -> dict[str, float]:
    logs = sorted(run_dir.glob("outputs/*/*/train.log"), key=lambda path: path.stat().st_mtime)
    if not logs:
        return {}
    found = re.search(r"start-up phases \(s\): (.*)", logs[-1].read_text(errors="ignore"))
    if not found:
        return {}
    return {name.strip(): float(value) for name, value in
            (part.split("=") for part in found.group(1).split(", ") if "=" in part)}


def train_run(manifest: Path, demo: Path, run_dir: Path, src: Path | None, workers: int) -> dict[str, object]:
    """The issue's command in the working dir `run_dir`, with this environment (+ PYTHONPATH=src). The cold and
    the warm run share it, as a user's two runs from one dir do: the working dir is one of the dirs relative image
    paths resolve against, so it is part of the line cache's key (another dir, another cache)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "lineclip.train", "data=openpecha",
           f"data.dataset_dir={demo}", f"data.train_manifest={manifest}", "data.val_manifest=null", "logger=none",
           "trainer.max_steps=2", "trainer.export_embeddings=false", "trainer.checkpoint_every_steps=1000",
           "trainer.progress_bar=false", f"data.num_workers={workers}"]
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = str(src)
    proc, stderr, result = _run_monitored(cmd, run_dir, env)
    result["phases_s"] = _phases(run_dir)
    if proc.returncode != 0:
        raise SystemExit(f"train failed ({proc.returncode}): {stderr[-3000:]}")
    return result


_CACHE_BUILD = """
import sys
import lineclip
from lineclip.sizes import load_line_table
print(lineclip.__file__, file=sys.stderr)
table, report = load_line_table(sys.argv[1], sys.argv[2], max_text_bytes=8192, max_pixels=40_000_000,
                                progress=False)
assert report.rows_used == len(table), report.summary()
"""


def cache_build_run(manifest: Path, demo: Path, src: Path | None) -> dict[str, object]:
    """The cold line-cache build alone (parse, header scan, cache write: what a first run does before the model),
    as its own process with the trainer's settings (all CPUs for the parse pool and the scan)."""
    clear_cache(manifest)
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = str(src)
    cmd = ["/usr/bin/time", "-v", sys.executable, "-c", _CACHE_BUILD, str(manifest), str(demo)]
    # In the manifest's dir: `python -c` puts the working dir first on sys.path, before PYTHONPATH (from a
    # checkout's root it would import that checkout's lineclip, whatever --src says).
    proc, stderr, result = _run_monitored(cmd, manifest.parent, env)
    if proc.returncode != 0:
        raise SystemExit(f"cache build failed ({proc.returncode}): {stderr[-3000:]}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=2, help="data.num_workers (the issue: 2)")
    parser.add_argument("--src", type=Path, default=None, help="the lineclip checkout to run (PYTHONPATH)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lineclip_bench_scale"))
    parser.add_argument("--label", default="", help="a name for this run in the output (e.g. before/after)")
    parser.add_argument("--skip-warm", action="store_true")
    parser.add_argument("--keep-cache", action="store_true", help="no cold run: the cache must exist")
    parser.add_argument("--cache-build-only", action="store_true",
                        help="instead of training: the cold line-cache build alone (load_line_table), its own process")
    args = parser.parse_args()
    demo = asset_dir("demo")
    manifest = args.workdir / f"issue25_{args.rows}" / "lines.jsonl"
    if not manifest.exists():
        t = time.perf_counter()
        generate(manifest, args.rows)
        print(f"generated {args.rows} rows in {time.perf_counter() - t:.1f} s: {manifest}", flush=True)
    results: dict[str, object] = {"bench": "scale", "label": args.label, "rows": args.rows,
                                  "src": str(args.src or "PYTHONPATH"), "num_workers": args.workers,
                                  "cpus": len(os.sched_getaffinity(0)), "load_before": os.getloadavg()[0]}
    if args.cache_build_only:
        results["cache_build"] = cache_build_run(manifest, demo, args.src)
        print(f"{args.label} cache build: {json.dumps(results['cache_build'])}", flush=True)
        print(json.dumps(results))
        return
    runs = (() if args.keep_cache else ("cold",)) + (() if args.skip_warm else ("warm",))
    cwd = args.workdir / f"cwd_{args.label or 'run'}"
    for name in runs:
        if name == "cold":
            clear_cache(manifest)
            if cwd.exists():
                subprocess.run(["rm", "-rf", str(cwd)], check=True)
        run = train_run(manifest, demo, cwd, args.src, args.workers)
        results[name] = run
        brief = {k: v for k, v in run.items() if k != "processes"}
        print(f"{args.label} {name}: {json.dumps(brief)}", flush=True)
    results["load_after"] = os.getloadavg()[0]
    print(json.dumps(results))


if __name__ == "__main__":
    main()
