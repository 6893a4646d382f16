"""nox sessions: `nox` runs the tests; `nox -s lint`; `nox -s bench_<name>` for each experiments/bench_<name>.py."""

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True

CPU_TORCH = "torch==2.13.0"


@nox.session
def tests(session: nox.Session) -> None:
    session.install(CPU_TORCH)
    session.install("-e", ".[dev,sweep]")
    session.run("pytest", "-q", *session.posargs, env={"WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"})


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "lineclip", "tests", "experiments", "noxfile.py")


def _bench(session: nox.Session, script: str) -> None:
    session.install(CPU_TORCH)
    session.install("-e", ".")
    # --quick unless the caller passes their own arguments: `nox -s bench_eval -- --n 100000`
    session.run("python", f"experiments/{script}", *(session.posargs or ["--quick"]))


@nox.session
def bench_eval(session: nox.Session) -> None:
    """Recall@K evaluation vs a plain chunked matmul + top-k (the floor), and peak memory."""
    _bench(session, "bench_eval.py")


@nox.session
def bench_data(session: nox.Session) -> None:
    """Lines/s per core of each preprocessing pipeline + collate; data-loader workers per GPU."""
    _bench(session, "bench_data.py")


@nox.session
def bench_padding(session: nox.Session) -> None:
    """Text padding left by width-only vs width + text-length bucketing."""
    _bench(session, "bench_padding.py")


@nox.session
def bench_train(session: nox.Session) -> None:
    """lineclip's training step vs a bare PyTorch loop on the same in-memory tensors."""
    _bench(session, "bench_train.py")


@nox.session
def bench_panels(session: nox.Session) -> None:
    """What the W&B panels (retrieval table, rank histograms) cost a validation, side by side with it."""
    _bench(session, "bench_panels.py")


@nox.session
def bench_export(session: nox.Session) -> None:
    """Peak memory per process of the corpus export: the old gather on every rank vs per-process parts."""
    _bench(session, "bench_export.py")


@nox.session
def bench_gpu(session: nox.Session) -> None:
    """Peak memory and MFU of DINOv2-base + ByT5-small at batch 64 on one GPU, the trainer's own step with each
    memory saver side by side. On a CPU it runs the same code path with tiny towers (`--tiny`)."""
    session.install(CPU_TORCH)  # the pin takes the CUDA build from PyPI on a GPU machine
    session.install("-e", ".")
    session.run("python", "experiments/bench_gpu.py",
                *(session.posargs or ["--tiny", "--no-compile", "--batch", "4", "--steps", "2"]),
                env={"PYTHONPATH": "."})


@nox.session
def bench_serve(session: nox.Session) -> None:
    """lineclip.serve's answer time for a text query on a 100k-line corpus (--quick: 20k), vs model + index alone."""
    session.install(CPU_TORCH)
    session.install("-e", ".[serve]")
    session.run("python", "experiments/bench_serve.py", *(session.posargs or ["--quick"]))


@nox.session
def bench_scale(session: nox.Session) -> None:
    """Start-up time (cold: parse + header scan; warm: the line cache) and peak RSS per line of lineclip.train
    on a generated manifest (`-- --rows 1000000`; `--quick`: 20,000 rows)."""
    _bench(session, "bench_scale.py")
