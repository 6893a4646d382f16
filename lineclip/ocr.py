"""The `ocr` level: what a user gets without lineclip, by reading each line with Tesseract and searching the text.

Tesseract runs as the `tesseract` binary (Debian: `apt-get install tesseract-ocr tesseract-ocr-bod`; its Tibetan
model `bod` is trained on rendered text only), once per page segmentation mode in `modes` (default 13, a raw
line, and 6, a block: each misses what the other reads, and the search below looks for the best window
anyway), the outputs normalised (whitespace removed, NFC) and joined. The texts are then ranked against the
queries by lineclip.transcripts (rapidfuzz partial_ratio): the level's numbers sit beside chance, collection and
length in evaluate's table and in validation's levels.

Tesseract costs ~0.1-0.4 s of CPU per line and mode, so its output is cached per image file: one JSON file per
image under `<cache dir>/<engine key>/`, named by the SHA-256 of the image's bytes, where the engine key hashes
the engine's version, the language model file, the language and the modes. A second evaluation of the same
lines runs no OCR; a changed image, model or mode is read anew. The cache dir defaults to `.lineclip_ocr/`
beside the manifest, or the user cache dir (`$XDG_CACHE_HOME/lineclip/ocr`) where that is not writable.
Lines are read in parallel by `workers` concurrent tesseract processes (each single-threaded:
OMP_THREAD_LIMIT=1, so the processes, not Tesseract's threads, share the cores).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lineclip.files import file_sha256
from lineclip.transcripts import MatchScores, normalize_reading

log = logging.getLogger("lineclip.ocr")
APT_PACKAGES = "tesseract-ocr tesseract-ocr-bod"
CACHE_DIR_NAME = ".lineclip_ocr"
CACHE_FORMAT = 1


@dataclass
class OcrOptions:
    """How the `ocr` level reads lines (eval.ocr, trainer.val_ocr)."""

    binary: str = "tesseract"  # a name on PATH or a path
    lang: str = "bod"  # Tesseract's language model: bod (tesseract-ocr-bod), or Tibetan (the script model)
    modes: list[int] = field(default_factory=lambda: [13, 6])  # --psm page segmentation modes, outputs joined
    cache_dir: str | None = None  # null: .lineclip_ocr/ beside the manifest if writable, else the user cache dir
    workers: int | None = None  # concurrent tesseract processes; null: all CPUs
    timeout_s: float = 120.0  # per tesseract call; a line that takes longer is counted as failed
    # rapidfuzz scorers (lineclip.transcripts.SCORERS) per direction; why partial_ratio: experiments/RESULTS.md
    scorer_t2i: str = "partial_ratio"
    scorer_i2t: str = "partial_ratio"
    scorer_phrase: str = "partial_ratio"


class OcrUnavailable(RuntimeError):
    """Tesseract or its language model is missing: the message is one line saying how to install them."""


@dataclass
class OcrReadings:
    """Tesseract's output for a list of line images, in their order."""

    raw: list[dict[str, str]]  # per line: mode ("13") -> stdout as Tesseract wrote it ({} where it failed)
    modes: list[int]
    engine: str  # the engine key of the cache
    version: str
    n_cached: int = 0  # distinct images (by content) found in the cache
    n_read: int = 0  # distinct images (by content) read by Tesseract in this call
    n_failed: int = 0  # lines whose image Tesseract could not read (nonzero exit, timeout): an empty reading
    n_not_cached: int = 0  # readings the cache dir could not take (not writable): read again next time
    failures: list[str] = field(default_factory=list)  # the first few reasons, "path: why"
    cache_dir: str = ""

    def joined(self) -> list[str]:
        """Each line's reading: every mode's output normalised (transcripts.normalize_reading) and concatenated."""
        return ["".join(normalize_reading(out.get(str(m), "")) for m in self.modes) for out in self.raw]

    def mode(self, mode: int) -> list[str]:
        """Each line's normalised output of one mode (what a CER is measured on)."""
        return [normalize_reading(out.get(str(mode), "")) for out in self.raw]

    def report(self) -> dict[str, object]:
        return {
            "engine": "tesseract",
            "version": self.version,
            "modes": self.modes,
            "engine_key": self.engine,
            "cache_dir": self.cache_dir,
            "n_lines": len(self.raw),
            "n_cached": self.n_cached,
            "n_read": self.n_read,
            "n_failed": self.n_failed,
            "n_not_cached": self.n_not_cached,
            "failures": self.failures,
        }


class Tesseract:
    """The `tesseract` binary with one language and a list of page segmentation modes."""

    def __init__(self, options: OcrOptions) -> None:
        binary = shutil.which(options.binary)
        if binary is None:
            raise OcrUnavailable(
                f"no `{options.binary}` binary: install Tesseract and its Tibetan model "
                f"(apt-get install {APT_PACKAGES})"
            )
        if not options.modes:
            raise ValueError("ocr.modes must name at least one page segmentation mode")
        self.binary, self.options = binary, options
        proc = self._call("--version")
        # "tesseract 5.3.0\n leptonica-1.82.0 ..." (some builds print it on stderr)
        version = (proc.stdout or proc.stderr).strip()
        self.version = version.splitlines()[0] if version else "unknown"
        langs = self._call("--list-langs").stdout
        available = [line.strip() for line in langs.splitlines()[1:] if line.strip()]
        if options.lang not in available:
            raise OcrUnavailable(
                f"Tesseract has no `{options.lang}` language model (it has: "
                f"{', '.join(available) or 'none'}): apt-get install {APT_PACKAGES}"
            )
        match = re.search(r'"([^"]+)"', langs.splitlines()[0] if langs else "")
        model = Path(match.group(1)) / f"{options.lang}.traineddata" if match else None
        model_hash = file_sha256(model) if model is not None and model.is_file() else "unknown"
        key = json.dumps(
            {
                "format": CACHE_FORMAT,
                "version": version,
                "model": model_hash,
                "lang": options.lang,
                "modes": [int(m) for m in options.modes],
            },
            sort_keys=True,
        )
        self.key = hashlib.sha256(key.encode()).hexdigest()[:20]

    def _call(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([self.binary, *args], capture_output=True, text=True, timeout=60)

    def read_file(self, path: str, mode: int) -> str:
        """One image, one mode: Tesseract's stdout (raises CalledProcessError / TimeoutExpired)."""
        env = {**os.environ, "OMP_THREAD_LIMIT": "1"}
        proc = subprocess.run(
            [self.binary, path, "stdout", "-l", self.options.lang, "--psm", str(mode)],
            capture_output=True,
            timeout=self.options.timeout_s,
            env=env,
            check=True,
        )
        return proc.stdout.decode("utf-8", errors="replace")

    def read(self, paths: Sequence[str], cache_dir: Path, progress: bool = False) -> OcrReadings:
        """Every image of `paths` read in every mode, from the cache where it is there; parallel over
        `options.workers` processes. An image that cannot be read gets an empty reading and is counted."""
        directory = cache_dir / self.key
        modes = [int(m) for m in self.options.modes]
        result = OcrReadings(
            raw=[{} for _ in paths], modes=modes, engine=self.key, version=self.version, cache_dir=str(directory)
        )
        workers = self.options.workers or os.cpu_count() or 1
        from tqdm.auto import tqdm

        # Threads: they only hash files and wait on their tesseract child, which does the work.
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            # The cache is keyed by content, so identical files (one image under two paths) are read once.
            distinct = list(dict.fromkeys(str(p) for p in paths))
            digests = dict(zip(distinct, pool.map(_digest_or_error, distinct), strict=True))
            by_digest: dict[str, list[int]] = {}
            for i, path in enumerate(paths):
                digest, error = digests[str(path)]
                if error is not None:
                    result.n_failed += 1
                    if len(result.failures) < 5:
                        result.failures.append(f"{path}: {error}")
                    continue
                by_digest.setdefault(digest, []).append(i)
            futures = {
                pool.submit(self._read_one, paths[rows[0]], digest, modes, directory): digest
                for digest, rows in by_digest.items()
            }
            # disable=None: drawn only when stderr is a terminal, as evaluate's other bars
            bar = tqdm(total=len(futures), desc="ocr", unit="line", disable=None if progress else True)
            for future in concurrent.futures.as_completed(futures):
                rows = by_digest[futures[future]]
                outputs, cached, error, stored = future.result()
                bar.update(1)
                if error is not None:
                    result.n_failed += len(rows)
                    if len(result.failures) < 5:
                        result.failures.append(f"{paths[rows[0]]}: {error}")
                    continue
                result.n_cached += cached
                result.n_read += not cached
                result.n_not_cached += not stored
                for i in rows:
                    result.raw[i] = outputs
            bar.close()
        if result.n_not_cached:
            log.warning(
                "OCR cache %s not writable: %d readings not cached (the next run reads them again)",
                directory,
                result.n_not_cached,
            )
        return result

    def _read_one(
        self, path: str, digest: str, modes: list[int], directory: Path
    ) -> tuple[dict[str, str], bool, str | None, bool]:
        """(outputs per mode, whether they came from the cache, the reason it failed or None, whether they are in
        the cache now)."""
        entry = directory / digest[:2] / f"{digest}.json"
        cached = _read_entry(entry, digest, modes)
        if cached is not None:
            return cached, True, None, True
        outputs = {}
        for mode in modes:
            try:
                outputs[str(mode)] = self.read_file(path, mode)
            except subprocess.TimeoutExpired:
                return {}, False, f"tesseract --psm {mode} took over {self.options.timeout_s:g} s", True
            except subprocess.CalledProcessError as exc:
                why = (exc.stderr or b"").decode("utf-8", "replace").strip().splitlines()
                return {}, False, f"tesseract --psm {mode} exited {exc.returncode}: {why[-1] if why else ''}", True
        stored = _write_entry(
            entry,
            {
                "format": CACHE_FORMAT,
                "image_sha256": digest,
                "engine": self.key,
                "version": self.version,
                "lang": self.options.lang,
                "outputs": outputs,
            },
        )
        return outputs, False, None, stored


def default_cache_dir(manifest: str | Path | None) -> Path:
    """`.lineclip_ocr/` beside the manifest where that dir is writable, else the user cache dir."""
    if manifest is not None:
        beside = Path(manifest).resolve().parent
        if os.access(beside, os.W_OK):
            return beside / CACHE_DIR_NAME
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lineclip" / "ocr"


def read_lines(
    paths: Sequence[str], options: OcrOptions, manifest: str | Path | None = None, progress: bool = False
) -> OcrReadings:
    """Tesseract's readings of `paths` (cached). Raises OcrUnavailable when the engine or its model is missing."""
    engine = Tesseract(options)
    cache_dir = Path(options.cache_dir) if options.cache_dir else default_cache_dir(manifest)
    return engine.read(paths, cache_dir, progress)


def ocr_level(
    records: Sequence[Any],
    texts: Sequence[str],
    phrases: Sequence[str] | None,
    options: OcrOptions,
    manifest: str | None,
    progress: bool,
) -> tuple[dict[str, Any], MatchScores | None]:
    """Read every record's line image with Tesseract (cached) and score the queries (`texts`, the phrase queries)
    against the readings: (a report: engine, cache counts, CER per mode against `texts`, scorers; the
    transcripts.MatchScores for galleries' levels, or None, with the reason in the report, when Tesseract, its
    model or rapidfuzz is missing: one warning line, and the other levels are still computed)."""
    from lineclip import transcripts

    missing = transcripts.rapidfuzz_missing()
    if missing is not None:
        log.warning("ocr level skipped: %s", missing)
        return {"unavailable": missing}, None
    started = time.perf_counter()
    try:
        readings = read_lines([r.image_path for r in records], options, manifest, progress)
    except OcrUnavailable as exc:
        log.warning("ocr level skipped: %s", exc)
        return {"unavailable": str(exc)}, None
    if readings.n_failed:
        log.warning(
            "ocr: Tesseract could not read %d of %d lines (an empty reading each), e.g. %s",
            readings.n_failed,
            len(records),
            readings.failures[0],
        )
    references = [transcripts.normalize_reading(t) for t in texts]
    block: dict[str, Any] = {
        **readings.report(),
        "lang": options.lang,
        "cer": {str(m): transcripts.character_error_rate(readings.mode(m), references) for m in readings.modes},
        "scorers": {"t2i": options.scorer_t2i, "i2t": options.scorer_i2t, "phrase": options.scorer_phrase},
    }
    scores = transcripts.match_scores(
        readings.joined(), texts, phrases, block["scorers"], workers=options.workers or -1
    )
    block["seconds"] = round(time.perf_counter() - started, 3)
    return block, scores


def _digest_or_error(path: str) -> tuple[str, str | None]:
    try:
        return file_sha256(Path(path)), None
    except OSError as exc:
        return "", f"unreadable ({exc.strerror or exc})"




def _read_entry(entry: Path, digest: str, modes: list[int]) -> dict[str, str] | None:
    """A cache entry's outputs, or None when it is missing or does not hold this image in these modes (then it
    is read again and rewritten: the cache is data, never trusted beyond its JSON)."""
    try:
        data = json.loads(entry.read_text(encoding="utf-8"))
        outputs = data["outputs"]
        if data.get("image_sha256") != digest or not all(isinstance(outputs.get(str(m)), str) for m in modes):
            return None
        return {str(m): outputs[str(m)] for m in modes}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _write_entry(entry: Path, data: dict[str, object]) -> bool:
    """Atomically (a temporary file renamed into place), so that concurrent runs never see half an entry. A cache
    that cannot be written costs the next run its OCR time, nothing else: counted (False), not fatal."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=entry.parent, prefix=".tmp_", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, ensure_ascii=False)
            os.replace(tmp, entry)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError:
        return False
    return True
