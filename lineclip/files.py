"""What every command shares at the OS level: one-line errors, refusing non-regular files, staged writes that
either land whole or leave nothing behind, and the CPUs a process may use. Light on purpose: no torch (lineclip.synth's
worker processes import it)."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from collections.abc import Sequence
from pathlib import Path


def first_line(exc: BaseException) -> str:
    """`Type: first line of the message`: how an exception from a library shows in lineclip's one-line errors."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def first_non_regular(paths: Sequence[str | Path]) -> Path | None:
    """The first of `paths` (or of the files directly inside those that are dirs) that is neither a regular file
    nor a dir: a FIFO or device would block or never end the read that opens it. Missing paths are skipped."""
    for path in map(Path, paths):
        try:
            mode = path.stat().st_mode
        except OSError:
            continue
        if stat.S_ISDIR(mode):
            try:
                children = list(os.scandir(path))
            except OSError:
                continue
            for child in children:
                if not (child.is_file() or child.is_dir()):
                    return Path(child.path)
        elif not stat.S_ISREG(mode):
            return path
    return None


def foreign_entries(directory: Path, what: str, own: set[str] | None) -> str | None:
    """Why `directory` may not be replaced (overwrite=true), or None: every entry in it must be one of `own`, the
    files lineclip wrote there by its own record (a corpus.json, a shards.json), each a regular file. So a dir
    that merely holds a file of that name keeps everything else a person put there. `own` None: no such record."""
    if own is None:
        return f"exists and is not a {what} (no record of lineclip's files in it); refusing to replace it"
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as exc:
        return f"cannot be listed ({exc.strerror}); refusing to replace it"
    foreign = [e.name + ("/" if e.is_dir(follow_symlinks=False) else "") for e in entries
               if e.name not in own or not e.is_file(follow_symlinks=False)]
    if not foreign:
        return None
    shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
    return (f"holds what lineclip did not write there ({shown}); refusing to replace it: overwrite replaces only a "
            f"{what} as lineclip left it")


def remove_staging(staging: str | Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)


class WriteError(OSError):
    """Writing a bundle, a corpus or a training state failed (disk full, read-only, quota); one line."""


def as_write_error(exc: BaseException, what: str) -> WriteError | None:
    """What a failed write becomes: a full disk surfaces as OSError from Python, RuntimeError from torch.save's
    zip writer and SafetensorError from safetensors; all three mean the same to the user. None: not a write error
    (re-raise as is)."""
    from safetensors import SafetensorError

    if isinstance(exc, WriteError) or not isinstance(exc, (OSError, RuntimeError, SafetensorError)):
        return None
    lines = str(exc).strip().splitlines()
    return WriteError(f"cannot write {what}: {type(exc).__name__}: {lines[-1] if lines else ''}".strip())


def usable_cpus() -> int:
    """The CPUs this process may run on (a container's or taskset's share), not all the machine has."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks (a bundle's weights, an OCR'd line image)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
