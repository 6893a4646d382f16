"""nox sessions: `nox` runs the tests; `nox -s lint`; one session per benchmark in experiments/."""

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True

CPU_TORCH = "torch==2.13.0"


@nox.session
def tests(session: nox.Session) -> None:
    session.install(CPU_TORCH)
    session.install("-e", ".[dev]")
    session.run("pytest", "-q", *session.posargs, env={"WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"})


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "lineclip", "tests", "experiments", "noxfile.py")
