"""Benchmark: how long `lineclip.serve` takes to answer a text query over a 100k-line corpus on the CPU.

Setup, all in a temp dir:
- a bundle of the `experiment=cpu_scratch` towers (ByT5-cpu text tower, 128-dim embeddings), trained 2 steps on the
  bundled demo lines through `python -m lineclip.train` (the weights do not change the time; `--run RUN` uses a
  run of your own instead);
- a corpus dir in lineclip.index's format (`faiss_embeddings.npy`, its meta parquet, `corpus.json` with the
  bundle's fingerprint) with N lines: random L2-normalised image embeddings, meta rows cycling the demo's 160
  lines (so thumbnails are real line images), searched exactly (`flat`, lineclip.index's default);
- `lineclip.serve`'s app over both, loaded once (timed), served by uvicorn in a background thread on
  127.0.0.1 exactly as `python -m lineclip.serve` serves it, queried over one keep-alive HTTP connection as a
  browser does.

Timed per query (phrases of 2-8 syllables drawn, seeded, from the demo transcriptions; first page of 10):
- `floor`: the model and the index alone: `encode_texts([q])` + FAISS top-10 search, in-process;
- `page`: GET /?q=... over HTTP: parse, encode, search, render the page (what the 200 ms target is about);
- `page_wylie`: the same query typed in Wylie (pyewts conversion added);
- `last_page`: page 20 (ranks 191-200: a top-200 search);
- `thumbnails`: the 10 GET /thumb/<row> the browser then fetches for a page (decode + resize + JPEG), all 10.
Median and 90th percentile over Q queries, each method interleaved with the others query by query (a shared
box drifts: drift hits every method alike); `page / floor` is the web layer's share.

    python experiments/bench_serve.py           # N = 100,000, Q = 200
    python experiments/bench_serve.py --quick   # N = 20,000, Q = 40 (about a minute)

The last line printed is one JSON object with the headline figures.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
import pandas as pd

TARGET_MS = 200.0


def train_bundle(out: Path) -> Path:
    """A 2-step `experiment=cpu_scratch` run on the bundled demo (a real bundle in a real run dir)."""
    args = [sys.executable, "-m", "lineclip.train", "experiment=cpu_scratch", "trainer.max_steps=2",
            "trainer.checkpoint_every_steps=2", "trainer.val_levels=false", "trainer.val_phrases=false",
            "trainer.progress_bar=false", "data.num_workers=0", "logger=none", f"hydra.run.dir={out}"]
    proc = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
    if proc.returncode != 0:
        sys.exit(f"training the benchmark's bundle failed:\n{proc.stderr[-3000:]}")
    return out


def write_corpus(run: Path, out: Path, n: int, seed: int = 0) -> Path:
    """N lines in lineclip.index's corpus format, fingerprinted with the run's bundle."""
    from lineclip import artifacts
    from lineclip.bundle import model_fingerprint, resolve_bundle
    from lineclip.corpus import CORPUS_INFO

    demo = pd.read_parquet(run / artifacts.EMBEDDINGS_META)
    dim = int(np.load(run / artifacts.EMBEDDINGS, mmap_mode="r").shape[1])
    rng = np.random.default_rng(seed)
    embeddings = rng.standard_normal((n, dim), dtype=np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    source = np.arange(n) % len(demo)
    meta = pd.DataFrame({
        "sample_id": [f"bench_{i:07d}" for i in range(n)],
        "doc_id": [f"doc_{i // 5000:03d}" for i in range(n)],
        "page_id": [f"page_{i // 8:05d}" for i in range(n)],
        "line_id": [str(i % 8) for i in range(n)],
        "text": demo["text"].to_numpy()[source],
        "image_path": demo["image_path"].to_numpy()[source],
    }, columns=list(artifacts.META_COLUMNS))
    out.mkdir(parents=True)
    np.save(out / artifacts.EMBEDDINGS, embeddings)
    meta.to_parquet(out / artifacts.EMBEDDINGS_META, index=False)
    info = {"name": out.name, "kind": "flat", "n_lines": n, "dim": dim, "bundle": str(run),
            "fingerprint": model_fingerprint(resolve_bundle(run)), "source": "bench_serve (random embeddings)"}
    (out / CORPUS_INFO).write_text(json.dumps(info), encoding="utf-8")
    return out


def queries(texts: list[str], q: int, seed: int = 0) -> list[str]:
    from lineclip.phrases import sample_phrases

    phrases = [p for p in sample_phrases(texts, seed) if p]
    return [phrases[i % len(phrases)] for i in range(q)]


def start_server(app) -> tuple[object, int]:
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline:
            sys.exit("uvicorn did not start")
        time.sleep(0.05)
    return server, port


def get(conn: http.client.HTTPConnection, path: str) -> tuple[int, bytes]:
    conn.request("GET", path)
    response = conn.getresponse()
    return response.status, response.read()


def summary(ms: list[float]) -> dict[str, float]:
    ordered = sorted(ms)
    return {"median_ms": round(statistics.median(ordered), 2),
            "p90_ms": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 2),
            "min_ms": round(ordered[0], 2)}


def run_bench(tmp: Path, n: int, q: int, own_run: str | None) -> None:
    import pyewts
    import torch
    from omegaconf import OmegaConf

    from lineclip.config import ServeConfig
    from lineclip.serve import LineSearch, build_app

    started = time.perf_counter()
    run = Path(own_run) if own_run else train_bundle(tmp / "run")
    setup_s = time.perf_counter() - started
    corpus_dir = write_corpus(run, tmp / "corpus", n)

    cfg = OmegaConf.structured(ServeConfig(run_dir=str(run), corpus=str(corpus_dir), device="cpu"))
    started = time.perf_counter()
    engine = LineSearch.load(cfg)
    load_s = time.perf_counter() - started
    server, port = start_server(build_app(engine))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    texts = queries(engine.corpus.meta["text"][:160].tolist(), q)
    to_wylie = pyewts.pyewts().toWylie
    timings: dict[str, list[float]] = {k: [] for k in ("floor", "page", "page_wylie", "last_page", "thumbnails")}
    rows_shown = []
    for i, text in enumerate([texts[0], texts[1], *texts]):  # two warm-up queries, not timed
        warm = i < 2
        t0 = time.perf_counter()
        embedding = engine.encoder.encode_texts([text])[0]
        engine.corpus.search_images(embedding[None, :], 10)
        t1 = time.perf_counter()
        status, body = get(conn, "/?" + urlencode({"q": text}))
        t2 = time.perf_counter()
        assert status == 200, body[:500]
        rows = [int(r) for r in re.findall(rb'<tr class="hit" data-row="(\d+)"', body)]
        status_w, body_w = get(conn, "/?" + urlencode({"q": to_wylie(text), "script": "wylie"}))
        t3 = time.perf_counter()
        status_l, _ = get(conn, "/?" + urlencode({"q": text, "page": 20}))
        t4 = time.perf_counter()
        for row in rows:
            status_t, thumb = get(conn, f"/thumb/{row}")
            assert status_t == 200 and thumb[:2] == b"\xff\xd8"
        t5 = time.perf_counter()
        assert status_l == 200 and len(rows) == 10
        if warm:
            continue
        rows_shown.append(len(rows))
        timings["floor"].append(1000 * (t1 - t0))
        timings["page"].append(1000 * (t2 - t1))
        if status_w == 200:  # a phrase whose Wylie does not round-trip cleanly is refused (400), not timed
            timings["page_wylie"].append(1000 * (t3 - t2))
        timings["last_page"].append(1000 * (t4 - t3))
        timings["thumbnails"].append(1000 * (t5 - t4))
    conn.close()
    server.should_exit = True

    stats = {name: summary(ms) for name, ms in timings.items() if ms}
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}; torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print(f"corpus: {n:,} lines, dim {engine.corpus.dim}, flat; model {run} (setup {setup_s:.1f} s); "
          f"LineSearch.load {load_s:.2f} s; {len(timings['page'])} queries")
    print(f"{'method':<12} {'median ms':>10} {'p90 ms':>8} {'min ms':>8}")
    for name, s in stats.items():
        print(f"{name:<12} {s['median_ms']:>10.1f} {s['p90_ms']:>8.1f} {s['min_ms']:>8.1f}")
    headline = {
        "bench": "serve", "n": n, "queries": len(timings["page"]), "dim": engine.corpus.dim,
        "load_s": round(load_s, 2),
        **{f"{name}_{k}": v for name, s in stats.items() for k, v in s.items() if k != "min_ms"},
        "page_vs_floor": round(stats["page"]["median_ms"] / stats["floor"]["median_ms"], 2),
        "wylie_queries_timed": len(timings["page_wylie"]),
        "target_ms": TARGET_MS, "meets_target": stats["page"]["p90_ms"] <= TARGET_MS,
        "load_average": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(),
    }
    print(json.dumps(headline))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--n", type=int, default=None, help="corpus lines (default 100000; --quick 20000)")
    parser.add_argument("--queries", type=int, default=None, help="timed queries (default 200; --quick 40)")
    parser.add_argument("--run", default=None, help="a run dir to use instead of training a cpu_scratch bundle")
    args = parser.parse_args()
    n = args.n or (20_000 if args.quick else 100_000)
    q = args.queries or (40 if args.quick else 200)
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        run_bench(Path(tmp), n, q, args.run)


if __name__ == "__main__":
    main()
