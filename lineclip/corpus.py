"""A searchable corpus of line images: embeddings, their meta rows, a FAISS index and (optionally) text embeddings.

A corpus dir holds
- `faiss_embeddings.npy` (float32 [N, D], L2-normalised image embeddings) and `faiss_embeddings_meta.parquet`
  (`sample_id, doc_id, page_id, line_id, text, image_path`, same row order): the very files a training run
  leaves in its run dir, so a finished run dir *is* a corpus (its training lines) and loads without
  re-encoding;
- `text_embeddings.npy` (float32 [N, D], rows aligned with the meta) for line -> text search; when absent
  (a training run dir) they are computed on demand from the meta texts;
- `index.faiss` for the approximate kinds (`ivf`, `hnsw`); the exact kind (`flat`, inner product) is
  rebuilt from the .npy at load time, which costs one copy and no training;
- `corpus.json`: kind, size, dims, the manifest and the bundle it was built with, and that bundle's
  fingerprint, so a search with another model fails instead of returning noise.

A corpus is built in a staging dir and renamed into place: an index dir either is complete or does not exist.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from lineclip import artifacts
from lineclip.errors import LineclipError
from lineclip.files import as_write_error, first_line, first_non_regular

if TYPE_CHECKING:
    import faiss

    from lineclip.encoder import LineEncoder
    from lineclip.lines import LineRecord

log = logging.getLogger(__name__)

CORPUS_INFO = "corpus.json"
INDEX_FILE = "index.faiss"
TEXT_EMBEDDINGS = "text_embeddings.npy"
INDEX_KINDS = ("flat", "ivf", "hnsw")


class CorpusError(LineclipError, ValueError):
    """A corpus dir that cannot be used (missing files, another model's embeddings); one line."""


@dataclass
class IndexParams:
    kind: str = "flat"  # flat (exact inner product) | ivf | hnsw
    nlist: int | None = None  # ivf: number of clusters; None: about 4 * sqrt(N), at least 39 points each
    nprobe: int = 16  # ivf: clusters visited per query
    hnsw_m: int = 32  # hnsw: links per node
    ef_construction: int = 200
    ef_search: int = 128  # hnsw: candidate list per query


def build_index(embeddings: np.ndarray, params: IndexParams) -> faiss.Index:
    """An inner-product FAISS index over L2-normalised rows (inner product = cosine similarity)."""
    import faiss

    if params.kind not in INDEX_KINDS:
        raise CorpusError(f"index.kind={params.kind!r} is not one of {', '.join(INDEX_KINDS)}")
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    n, dim = x.shape
    if params.kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif params.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params.ef_construction
        index.hnsw.efSearch = params.ef_search
    else:
        # k-means wants >= 39 points per centroid; fewer clusters beats a poorly trained quantiser.
        nlist = params.nlist or max(1, min(round(4 * math.sqrt(n)), n // 39))
        nlist = max(1, min(nlist, n))
        index = faiss.index_factory(dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(0)
        sample = x if n <= 256 * nlist else x[np.sort(rng.choice(n, 256 * nlist, replace=False))]
        index.train(sample)
        faiss.extract_index_ivf(index).nprobe = min(params.nprobe, nlist)
    index.add(x)
    return index


def on_gpu_if_available(index: Any) -> Any:
    """A search-only copy of `index` on the GPUs when faiss-gpu is installed and sees one (flat and IVF indexes;
    HNSW has no GPU version); otherwise `index` itself."""
    import faiss

    if not hasattr(faiss, "index_cpu_to_all_gpus") or faiss.get_num_gpus() == 0 or hasattr(index, "hnsw"):
        return index
    return faiss.index_cpu_to_all_gpus(index)


@dataclass
class Corpus:
    """A loaded corpus. `search_*` return (scores, row indices) per query, best first."""

    directory: Path
    meta: pd.DataFrame
    image_embeddings: np.ndarray
    index: Any
    info: dict[str, Any]
    text_embeddings: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.meta)

    @property
    def dim(self) -> int:
        return int(self.image_embeddings.shape[1])

    @property
    def name(self) -> str:
        return str(self.info.get("name") or self.directory.name)

    @classmethod
    def load(cls, directory: str | Path, nprobe: int | None = None, ef_search: int | None = None) -> Corpus:
        directory = Path(os.path.expanduser(str(directory))).absolute()
        if not directory.is_dir():
            raise CorpusError(f"corpus dir {directory} does not exist")
        emb_path, meta_path = directory / artifacts.EMBEDDINGS, directory / artifacts.EMBEDDINGS_META
        absent = [p.name for p in (emb_path, meta_path) if not p.exists()]
        if absent:
            hint = " (was the run trained with trainer.export_embeddings=false? build one with lineclip.index)"
            raise CorpusError(f"{directory} is not a corpus: no {' or '.join(absent)}"
                              + (hint if (directory / artifacts.CONFIG).exists() else ""))
        odd = first_non_regular([directory / n for n in (*artifacts.CORPUS_FILES, artifacts.CONFIG)])
        if odd is not None:
            raise CorpusError(f"corpus {directory}: {odd.name} is not a regular file (a FIFO or a device?)")
        try:
            info = cls._read_info(directory)
            # mmap: a corpus of millions of lines is not read into memory twice (FAISS copies what it indexes).
            embeddings = np.load(emb_path, mmap_mode="r")
            meta = pd.read_parquet(meta_path)
            texts = np.load(directory / TEXT_EMBEDDINGS, mmap_mode="r") \
                if (directory / TEXT_EMBEDDINGS).exists() else None
        except CorpusError:
            raise
        except (OSError, ValueError) as exc:
            raise CorpusError(f"cannot read corpus {directory}: {type(exc).__name__}: {exc}") from None
        if embeddings.ndim != 2 or embeddings.dtype != np.float32 or len(embeddings) != len(meta):
            raise CorpusError(f"corpus {directory}: {emb_path.name} is {embeddings.dtype} {embeddings.shape} "
                              f"for {len(meta)} meta rows (want float32 [N, D])")
        missing_cols = [c for c in artifacts.META_COLUMNS if c not in meta.columns]
        if missing_cols:
            raise CorpusError(f"corpus {directory}: {meta_path.name} lacks column(s) {', '.join(missing_cols)}")
        if texts is not None and texts.shape != embeddings.shape:
            raise CorpusError(f"corpus {directory}: {TEXT_EMBEDDINGS} is {texts.shape}, images {embeddings.shape}")
        if info.get("n_lines") is not None and info["n_lines"] != len(meta):
            raise CorpusError(f"corpus {directory}: {len(meta)} meta rows, but its "
                              f"{CORPUS_INFO if (directory / CORPUS_INFO).exists() else artifacts.CONFIG} says "
                              f"{info['n_lines']} lines (files of two different writes?)")
        if info.get("dim") is not None and info["dim"] != embeddings.shape[1]:
            raise CorpusError(f"corpus {directory}: {CORPUS_INFO} says dim {info['dim']}, the embeddings have "
                              f"{embeddings.shape[1]}")
        index = on_gpu_if_available(cls._load_index(directory, info, embeddings, nprobe, ef_search))
        return cls(directory, meta, embeddings, index, info, texts)

    @staticmethod
    def _read_info(directory: Path) -> dict[str, Any]:
        """corpus.json, or for a training run dir what its final training_config.json says about its corpus."""
        path = directory / CORPUS_INFO
        if path.exists():
            info = _read_json(path)
            if not isinstance(info, dict):
                raise CorpusError(f"corpus {directory}: {CORPUS_INFO} does not hold a JSON object")
            kind = info.get("kind", "flat")
            if kind not in INDEX_KINDS:
                raise CorpusError(f"corpus {directory}: {CORPUS_INFO} has kind {kind!r}, not one of "
                                  f"{', '.join(INDEX_KINDS)}")
            for key in ("n_lines", "dim"):
                if info.get(key) is not None and (not isinstance(info[key], int) or isinstance(info[key], bool)):
                    raise CorpusError(f"corpus {directory}: {CORPUS_INFO} has a non-integer {key}")
            if info.get("fingerprint") is not None and not isinstance(info["fingerprint"], str):
                raise CorpusError(f"corpus {directory}: {CORPUS_INFO} has a non-string fingerprint")
            return info
        config_path = directory / artifacts.CONFIG
        if not config_path.exists():
            raise CorpusError(f"corpus {directory} has embeddings but neither {CORPUS_INFO} nor a final "
                              f"{artifacts.CONFIG} (an interrupted save?); rebuild it with lineclip.index")
        config = _read_json(config_path)
        if not isinstance(config, dict):
            raise CorpusError(f"corpus {directory}: {config_path.name} does not hold a JSON object")
        info = {"kind": "flat", "source": "training run", "bundle": str(directory)}
        if "corpus" not in config:  # written before runs recorded it: the bundle beside the embeddings made them
            return info
        recorded = config["corpus"]
        if not isinstance(recorded, dict) or not isinstance(recorded.get("fingerprint"), str):
            raise CorpusError(f"{directory} was trained with trainer.export_embeddings=false: its "
                              f"{artifacts.EMBEDDINGS} are not its final model's; build a corpus with lineclip.index")
        return {**info, "n_lines": recorded.get("n_lines"), "fingerprint": recorded["fingerprint"]}

    @staticmethod
    def _load_index(directory: Path, info: dict[str, Any], embeddings: np.ndarray, nprobe: int | None,
                    ef_search: int | None) -> Any:
        import faiss

        kind = info.get("kind", "flat")
        if kind == "flat":
            return build_index(embeddings, IndexParams(kind="flat"))
        path = directory / INDEX_FILE
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as exc:
            raise CorpusError(f"cannot read {path}: {str(exc).splitlines()[0] if str(exc) else exc}") from None
        if index.ntotal != len(embeddings):
            raise CorpusError(f"{path} holds {index.ntotal} vectors for {len(embeddings)} meta rows")
        if index.d != embeddings.shape[1]:
            raise CorpusError(f"{path} indexes {index.d}-dim vectors, the corpus embeddings have {embeddings.shape[1]}")
        if nprobe is not None and kind == "ivf":
            faiss.extract_index_ivf(index).nprobe = nprobe
        if ef_search is not None and hasattr(index, "hnsw"):
            index.hnsw.efSearch = ef_search
        return index

    def check_model(self, encoder: LineEncoder) -> None:
        """Fail (one line) if this corpus was embedded by another model than `encoder`."""
        from lineclip.bundle import BundleError, check_bundle, fingerprint_matches, model_fingerprint, resolve_bundle

        if encoder.dim != self.dim:
            raise CorpusError(f"corpus {self.directory} has {self.dim}-dim embeddings, the model gives {encoder.dim}")
        expected = self.info.get("fingerprint")
        if expected is None:
            try:  # a training run dir: compare with its own final bundle
                ref = resolve_bundle(self.info.get("bundle", self.directory))
                check_bundle(ref)
                expected = model_fingerprint(ref)
            except (BundleError, OSError):
                log.warning("corpus %s does not say which model embedded it; assuming %s", self.directory,
                            encoder.bundle.label if encoder.bundle else "this one")
                return
        if encoder.bundle is not None and not fingerprint_matches(expected, encoder.bundle, encoder.fingerprint()):
            raise CorpusError(
                f"corpus {self.directory} was embedded by another model ({self.info.get('bundle')}) than "
                f"{encoder.bundle.label}; build an index with this model: python -m lineclip.index "
                f"run_dir={encoder.bundle.label} manifest=...")

    def search_images(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Nearest line images of each query embedding (a text's or a line image's)."""
        k = min(k, len(self))
        scores, rows = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return scores, rows

    def ensure_text_embeddings(self, encoder: LineEncoder, batch_size: int = 64, progress: bool = False) -> np.ndarray:
        if self.text_embeddings is None:
            log.info("embedding the %d corpus texts for line -> text search (lineclip.index stores them)",
                     len(self))
            self.text_embeddings = encoder.encode_texts(self.meta["text"].tolist(), batch_size, progress)
        return self.text_embeddings

    def search_texts(self, query: np.ndarray, k: int) -> list[tuple[float, str, list[int]]]:
        """The `k` best *distinct* texts for one query embedding: (score, text, corpus rows carrying it)."""
        if self.text_embeddings is None:
            raise RuntimeError("call ensure_text_embeddings first")
        # Identical texts have identical embeddings: score each distinct text once, then list its lines.
        codes, uniques = pd.factorize(self.meta["text"])
        first = np.full(len(uniques), len(codes), dtype=np.int64)
        np.minimum.at(first, codes, np.arange(len(codes)))
        scores = np.asarray(self.text_embeddings[first], dtype=np.float32) @ np.asarray(query, dtype=np.float32)
        top = np.argsort(-scores, kind="stable")[: min(k, len(uniques))]
        return [(float(scores[u]), str(uniques[u]), np.flatnonzero(codes == u).tolist()) for u in top]


class EmbeddingPart:
    """One process's rows of a corpus being embedded, appended to raw files as they are made (float32 rows and
    their int64 dataset indices), so memory is one batch whatever the corpus size. `merge_parts` assembles the
    parts of all processes into the corpus file. A context manager: the files are closed (and complete) on exit."""

    def __init__(self, directory: Path, rank: int, dim: int) -> None:
        self.rows_path, self.indices_path = _part_paths(directory, rank)
        self.dim, self.n_rows = dim, 0
        self._rows = open(self.rows_path, "wb")  # noqa: SIM115 - closed in close(), the context manager's exit
        self._indices = open(self.indices_path, "wb")  # noqa: SIM115

    def append(self, indices: np.ndarray, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if rows.shape != (len(indices), self.dim):
            raise ValueError(f"{rows.shape} rows for {len(indices)} indices of dim {self.dim}")
        self._rows.write(rows.data)
        self._indices.write(np.ascontiguousarray(indices, dtype=np.int64).data)
        self.n_rows += len(indices)

    def close(self) -> None:
        self._rows.close()
        self._indices.close()

    def __enter__(self) -> EmbeddingPart:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _part_paths(directory: Path, rank: int) -> tuple[Path, Path]:
    return directory / f"part_{rank:05d}.f32", directory / f"part_{rank:05d}.indices.i64"


def merge_parts(directory: Path, world: int, dim: int, output: Path, chunk_rows: int = 65536) -> np.ndarray:
    """The parts of `world` processes (`EmbeddingPart`s in `directory`) as one float32 [N, D] `.npy` at `output`,
    rows in ascending dataset index, written through a memmap `chunk_rows` at a time (memory: 8 bytes a line for
    the indices, not the rows). Returns those indices. The part files are removed once merged."""
    parts = []
    for rank in range(world):
        rows_path, indices_path = _part_paths(directory, rank)
        indices = np.fromfile(indices_path, dtype=np.int64)
        if rows_path.stat().st_size != len(indices) * dim * 4:
            raise RuntimeError(f"{rows_path} holds {rows_path.stat().st_size} bytes for {len(indices)} rows of "
                               f"dim {dim} (an incomplete part)")
        parts.append((rows_path, indices_path, indices))
    order = np.sort(np.concatenate([indices for _, _, indices in parts]))
    if len(order) > 1 and not (np.diff(order) > 0).all():
        raise RuntimeError("a line was embedded by two processes (the batches were not dealt disjointly)")
    if len(order) == 0:  # a zero-byte file cannot be memory-mapped
        np.save(output, np.empty((0, dim), np.float32))
    else:
        merged = np.lib.format.open_memmap(output, mode="w+", dtype=np.float32, shape=(len(order), dim))
        for rows_path, _, indices in parts:
            if len(indices) == 0:
                continue
            rows = np.memmap(rows_path, dtype=np.float32, mode="r", shape=(len(indices), dim))
            positions = np.searchsorted(order, indices)
            for start in range(0, len(indices), chunk_rows):
                merged[positions[start : start + chunk_rows]] = rows[start : start + chunk_rows]
            del rows
        merged.flush()
        del merged
    for rows_path, indices_path, _ in parts:
        rows_path.unlink()
        indices_path.unlink()
    return order


def _read_json(path: Path) -> Any:
    """A corpus's JSON file, or CorpusError naming it (not JSON, not UTF-8, or nested too deep for Python)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:
        raise CorpusError(f"cannot read {path}: {first_line(exc)}") from None


def write_corpus(
    output: str | Path,
    encoder: LineEncoder,
    records: Sequence[LineRecord],
    params: IndexParams,
    with_texts: bool = True,
    batch_size: int = 32,
    text_batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = False,
    overwrite: bool = False,
    extra_info: dict[str, Any] | None = None,
) -> Path:
    """Embed `records` and write a corpus dir at `output` (all at once: staged, then renamed into place). The
    embeddings stream to the staged files as they are made: memory does not grow with the corpus (bar FAISS's
    own copy for `ivf`/`hnsw`)."""
    import faiss

    import lineclip

    output = Path(os.path.expanduser(str(output))).absolute()
    if params.kind not in INDEX_KINDS:
        raise CorpusError(f"index.kind={params.kind!r} is not one of {', '.join(INDEX_KINDS)}")
    if output.exists() and not overwrite:
        raise CorpusError(f"{output} already exists (index.overwrite=true replaces it)")
    artifacts.check_output_path(output, "output", replace_corpus=True)
    started = time.perf_counter()
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.parent / f".{output.name}.{os.getpid()}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        # Rows go to disk as they are made (one batch in memory), then into the corpus file in input order.
        paths = [r.image_path for r in records]
        failed: list[int] = []
        with EmbeddingPart(staging, 0, encoder.dim) as part:
            for batch in encoder.image_batches(paths, batch_size, num_workers, progress):
                part.append(batch.indices, batch.image)
                failed += batch.failed
        encoder.log_skipped(paths, failed)
        kept = merge_parts(staging, 1, encoder.dim, staging / artifacts.EMBEDDINGS)
        if len(kept) == 0:
            raise CorpusError(f"none of the {len(records)} line images could be read")
        used = [records[i] for i in kept]
        image = np.load(staging / artifacts.EMBEDDINGS, mmap_mode="r")
        if with_texts:
            texts = np.lib.format.open_memmap(staging / TEXT_EMBEDDINGS, mode="w+", dtype=np.float32,
                                              shape=(len(used), encoder.dim))
            encoder.encode_texts([r.text for r in used], text_batch_size, progress, out=texts)
            texts.flush()
            del texts
        index = build_index(image, params) if params.kind != "flat" else None
        artifacts.corpus_meta(used).to_parquet(staging / artifacts.EMBEDDINGS_META, index=False)
        if index is not None:
            faiss.write_index(index, str(staging / INDEX_FILE))
        used_params = {k: getattr(params, k) for k in IndexParams.__dataclass_fields__}
        if params.kind == "ivf":
            ivf = faiss.extract_index_ivf(index)
            used_params.update(nlist=int(ivf.nlist), nprobe=int(ivf.nprobe))  # what was used, not asked
        dim = int(image.shape[1])
        del image, index  # the memmap and FAISS's copy: nothing of the staged files stays open or held
        info = {
            "name": output.name,
            "kind": params.kind,
            "params": used_params,
            "n_lines": len(used),
            "n_rows": len(records),
            "images_unreadable": len(records) - len(used),
            "dim": dim,
            "text_embeddings": with_texts,
            "bundle": encoder.bundle.label if encoder.bundle else None,
            "fingerprint": encoder.fingerprint(),
            "seconds": round(time.perf_counter() - started, 3),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "lineclip_version": lineclip.__version__,
            **(extra_info or {}),
        }
        (staging / CORPUS_INFO).write_text(json.dumps(info, indent=2, ensure_ascii=False), encoding="utf-8")
        if output.exists():  # overwrite: move the old one aside first, so a failure keeps one complete corpus
            old = output.parent / f".{output.name}.{os.getpid()}.old"
            output.rename(old)
            staging.rename(output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(output)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        error = as_write_error(exc, f"corpus {output}")  # faiss reports a full disk as RuntimeError
        if error is None:
            raise
        raise error from exc
    return output
