"""`python -m lineclip.index run_dir=... manifest=...`: embed a manifest's line images (and texts) into a corpus dir.

The corpus dir (default `<run dir>/<bundle prefix>index_<name>/`, `<name>` as in lineclip.evaluate: the
manifest's stem, or `<split>_<stem>` for OpenPecha's `<root>/<split>/meta/lines.jsonl`) holds the image
embeddings + meta parquet in the training run's own format, the text embeddings for line -> text search,
and for `index.kind=ivf|hnsw` a FAISS index file; `lineclip.search corpus=<dir>` searches it. See
lineclip.corpus for the layout. Exact inner product (`flat`) is the default and right up to a few hundred
thousand lines; `ivf` (`index.nlist`, `index.nprobe`) or `hnsw` (`index.hnsw_m`, `index.ef_search`) for millions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from lineclip.artifacts import check_output_path
from lineclip.cli import UsageError, check_manifest_args, check_model_args, hydra_command, run_command
from lineclip.config import ModelArgs, register_configs
from lineclip.corpus import INDEX_KINDS, IndexParams
from lineclip.manifest import manifest_label


@dataclass
class IndexOptions(IndexParams):
    name: str | None = None  # the index dir's name suffix; default: derived from the manifest
    output: str | None = None  # the index dir; default <run dir>/<bundle prefix>index_<name>
    texts: bool = True  # also embed the texts (line -> text search); else search embeds them on demand
    overwrite: bool = False


@dataclass
class IndexConfig(ModelArgs):
    manifest: str | None = None
    dataset_dir: str | None = None
    on_bad_row: str = "skip"  # skip (and count) | error
    num_workers: int = 4  # processes decoding and binarising line images (the bottleneck on a GPU)
    text_batch_size: int = 64
    index: IndexOptions = field(default_factory=IndexOptions)


def build(cfg: DictConfig) -> Path:
    """The command: check everything cheap first, then embed and write the corpus dir in one rename."""
    check_model_args(cfg)
    check_manifest_args(cfg)
    opts = cfg.index
    if opts.kind not in INDEX_KINDS:
        raise UsageError(f"index.kind={opts.kind!r} is not one of {', '.join(INDEX_KINDS)}")
    if min(opts.nprobe, opts.hnsw_m, opts.ef_construction, opts.ef_search) < 1 or (
            opts.nlist is not None and opts.nlist < 1):
        raise UsageError("index.nlist, nprobe, hnsw_m, ef_construction and ef_search must be >= 1")
    from lineclip.bundle import check_bundle, resolve_bundle
    from lineclip.corpus import write_corpus
    from lineclip.encoder import load_encoder
    from lineclip.manifest import read_manifest

    ref = resolve_bundle(cfg.run_dir)
    check_bundle(ref)
    name = opts.name or manifest_label(cfg.manifest)
    output = Path(opts.output) if opts.output else ref.directory / f"{ref.prefix}index_{name}"
    if output.exists() and not opts.overwrite:
        raise UsageError(f"{output} already exists (index.overwrite=true replaces it)")
    # Never a run dir, nor any file or dir of a run or another corpus; overwrite replaces only an index dir.
    check_output_path(output, "index.output", replace_corpus=True, inputs=[cfg.manifest])
    records, report = read_manifest(cfg.manifest, cfg.dataset_dir, cfg.on_bad_row)
    encoder = load_encoder(cfg.run_dir, device=cfg.device)
    params = IndexParams(**{k: opts[k] for k in IndexParams.__dataclass_fields__})
    written = write_corpus(output, encoder, records, params, with_texts=opts.texts, batch_size=cfg.batch_size,
                           text_batch_size=cfg.text_batch_size, num_workers=cfg.num_workers,
                           progress=cfg.progress, overwrite=opts.overwrite,
                           extra_info={"manifest": report.manifest, "manifest_report": report.to_dict()})
    print(f"{written}: {report.rows_used} lines of {report.manifest} ({opts.kind})")
    return written


register_configs()
ConfigStore.instance().store(name="index_schema", node=IndexConfig)


@hydra_command("index")
def main(cfg: DictConfig) -> None:
    run_command(build, cfg)


if __name__ == "__main__":
    main()
