"""`python -m lineclip.evaluate run_dir=... manifest=...`: retrieval quality of a trained bundle on any manifest.

Both directions (line image -> text, text -> line image), Recall@K, MRR and median rank, in two flavours:
- duplicate-aware: a retrieved item is correct when its normalised text equals the query's (what a user
  searching a corpus wants: any line carrying the phrase is a hit);
- strict: only the query's own pair is correct (one-to-one). Ties count in the query's favour, so a line
  whose text is shared scores as well as its twin in i2t.
With `eval.group_key=collection` the same numbers per value of that manifest key (gallery = the group's lines).

Metrics that knowing a line's collection cannot satisfy (lineclip.galleries):
- `eval.gallery_by=page_id` (doc_id, collection, any manifest key, or a list): each query ranked only among the
  lines sharing its value, pooled over all groups (lines without a value left out, a line alone in its group
  counted but never a hit);
- `eval.queries=phrase`: per line a seeded run of 2-8 whole syllables is the text query, every line containing
  it a correct answer (text -> image).
Each setting comes with the expected levels of rankers that never read: chance, one that knows only the
collection (`eval.collection_field`), one that knows only lengths (a text's, and a line image's width, from
which it predicts its text length) (`levels` in the JSON); and, with `eval.levels=[...,ocr]`, what a user gets
without lineclip: Tesseract's reading of each line searched by text similarity (lineclip.ocr, `eval.ocr`).

The result is printed as a table and written as JSON to `<run dir>/<bundle prefix>eval_<name>.json` (or
`eval.output`), where `<name>` is the manifest's stem, or `<split>_<stem>` for OpenPecha's
`<root>/<split>/meta/lines.jsonl` (so `eval_eval_lines.json`, `eval_train_lines.json`). Similarities are
computed in chunks: memory O(N x chunk) besides the N x D embeddings.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from lineclip.cli import (
    UsageError,
    check_manifest_args,
    check_model_args,
    hydra_command,
    run_command,
    write_text_atomic,
)
from lineclip.config import ModelArgs, register_configs
from lineclip.manifest import manifest_label
from lineclip.ocr import OcrOptions, ocr_level

if TYPE_CHECKING:
    from lineclip.encoder import LineEncoder
    from lineclip.lines import LineRecord

log = logging.getLogger("lineclip.evaluate")
MISSING_GROUP = "(missing)"


@dataclass
class EvalOptions:
    group_key: str | None = None  # a manifest key (LineRecord.extra) or page_id/doc_id, e.g. collection
    gallery_by: Any = None  # a field or a list of fields: within-group galleries (page_id, doc_id, ...)
    queries: Any = "line"  # line | phrase | [line, phrase]: whole-line queries are always scored
    phrase_seed: int = 0
    phrase_syllables: list[int] = field(default_factory=lambda: [2, 8])  # min and max syllables of a phrase
    collection_field: str = "collection"  # what the collection-only level knows
    # Reference levels: true (chance, collection, length: CPU, O(N^2) in blocks), false, or a list of chance,
    # collection, length, ocr (Tesseract + text search, lineclip.ocr: ~0.1-0.4 s of CPU per line and mode, cached)
    levels: Any = True
    ocr: OcrOptions = field(default_factory=OcrOptions)
    output: str | None = None  # JSON path; default <run dir>/<bundle prefix>eval_<name>.json
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    chunk_size: int = 256  # query rows per similarity block: 256 x 100k lines is 100 MB of scores


@dataclass
class EvaluateConfig(ModelArgs):
    manifest: str | None = None
    dataset_dir: str | None = None  # also tried for relative image paths, as in training
    on_bad_row: str = "skip"  # skip (and count) | error
    num_workers: int = 4  # processes decoding and binarising line images (the bottleneck on a GPU)
    text_batch_size: int = 64
    eval: EvalOptions = field(default_factory=EvalOptions)


# ------------------------------------------------------------------------------------------------ metrics


def chance_level(text_ids: np.ndarray, ks: Sequence[int], strict: bool) -> dict[str, float]:
    """Expected Recall@K, MRR and mean rank of a random ranking of this gallery (the same in both directions).

    A query with m correct items among N hits the top k with probability 1 - C(N-m, k) / C(N, k); its first
    correct item sits at rank r with probability prod_{i<r-1} (N-m-i)/(N-i) * m/(N-r+1). Strict: m = 1.
    """
    ids = np.asarray(text_ids)
    n = len(ids)
    _, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    multiplicity = np.ones(n, dtype=np.int64) if strict else counts[inverse.reshape(-1)]
    out = {f"r{k}": 0.0 for k in ks} | {"mrr": 0.0, "mean_rank": 0.0}
    for m, n_queries in zip(*np.unique(multiplicity, return_counts=True), strict=True):
        r = np.arange(1, n - m + 2, dtype=np.float64)
        # P(first r-1 items all wrong) as a running product; the factor for r = 1 is 1.
        survive = np.concatenate([[1.0], np.cumprod((n - m - r[:-1] + 1) / (n - r[:-1] + 1))])
        p_first = survive * m / (n - r + 1)
        weight = n_queries / n
        for k in ks:
            out[f"r{k}"] += weight * float(p_first[: min(k, len(p_first))].sum())
        out["mrr"] += weight * float((p_first / r).sum())
        out["mean_rank"] += weight * (n + 1) / (m + 1)
    return out


def _metrics(image: np.ndarray, text: np.ndarray, ids: np.ndarray, ks: Sequence[int], chunk: int) -> dict[str, Any]:
    import torch

    from lineclip.metrics import retrieval_metrics

    image_t, text_t, ids_t = torch.from_numpy(image), torch.from_numpy(text), torch.from_numpy(ids)
    return {
        "n_lines": len(ids),
        "n_distinct_texts": int(len(np.unique(ids))),
        "metrics": {
            "duplicate_aware": retrieval_metrics(image_t, text_t, ids_t, ks=tuple(ks), chunk_size=chunk),
            "strict": retrieval_metrics(image_t, text_t, ids_t, ks=tuple(ks), strict=True, chunk_size=chunk),
        },
        "chance": {"duplicate_aware": chance_level(ids, ks, strict=False),
                   "strict": chance_level(ids, ks, strict=True)},
    }


def evaluate_records(
    encoder: LineEncoder,
    records: Sequence[LineRecord],
    group_key: str | None = None,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 256,
    batch_size: int = 32,
    text_batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = False,
    gallery_by: Sequence[str] = (),
    phrases: bool = False,
    phrase_seed: int = 0,
    phrase_syllables: Sequence[int] = (2, 8),
    collection_field: str = "collection",
    levels: Any = True,
    ocr: OcrOptions | None = None,
    manifest: str | None = None,
) -> dict[str, Any]:
    """Embed the records' images and texts with `encoder` and compute both kinds of metrics (and per group),
    the within-group galleries of `gallery_by`, phrase queries when `phrases`, and the reference levels
    (`levels`: galleries.level_names; `ocr` configures the ocr level, whose cache defaults beside `manifest`).

    Lines whose image cannot be read are left out (counted in `images_unreadable`)."""
    import pandas as pd
    import torch

    from lineclip import galleries
    from lineclip.batch import count_truncated
    from lineclip.metrics import text_ids

    # With a reading head beside the bundle (a run trained with the reading loss), each line is also decoded.
    image, kept, readings = encoder.read_image_files([r.image_path for r in records], batch_size, num_workers,
                                                     progress)
    if len(kept) == 0:
        raise UsageError(f"none of the {len(records)} line images could be read")
    used = [records[i] for i in kept]
    texts = [r.text for r in used]
    text = encoder.encode_texts(texts, text_batch_size, progress)
    ids = text_ids(texts)
    counts = np.bincount(ids)
    result: dict[str, Any] = {
        **_metrics(image, text, ids, ks, chunk_size),
        "n_rows": len(records),
        "images_unreadable": len(records) - len(kept),
        "lines_with_shared_text": int(counts[counts > 1].sum()),
        "texts_truncated": count_truncated(texts, encoder.text_max_length),
        "ks": list(ks),
    }
    _check_fields(records, "eval.group_key", [group_key] if group_key else [])
    if group_key:
        values = [v or MISSING_GROUP for v in galleries.field_values(used, group_key)]
        members = pd.Series(values).groupby(values).indices  # value -> row positions, in manifest order
        groups = {value: _metrics(image[rows], text[rows], ids[rows], ks, chunk_size)
                  for value, rows in sorted(members.items())}
        result["groups"] = {"key": group_key, "values": groups}

    lengths = galleries.text_bytes(texts)
    collection = galleries.optional_codes(used, collection_field)
    names = galleries.level_names(levels)
    predicted = None
    if "length" in names:
        predicted = galleries.predicted_lengths(galleries.image_aspects([r.image_path for r in used]), lengths)
    plan = None
    if phrases:
        low, high = phrase_syllables
        # Drawn on the whole manifest (seeded by position, as in training validation), then restricted to the
        # lines whose images could be read.
        plan = galleries.ValidationPlan.build(records, (), True, phrase_seed, low, high, levels=False).restrict(kept)
    scores = None
    if "ocr" in names:
        result["ocr"], scores = ocr_level(used, texts, plan.phrases if plan is not None else None,
                                          ocr or OcrOptions(), manifest, progress)
        if scores is None:
            names = [n for n in names if n != "ocr"]

    def picked(computed: dict[str, Any]) -> dict[str, Any]:
        return {name: value for name, value in computed.items() if galleries.level_family(name) in names}

    line_scores = scores.line_scores("ocr") if scores is not None else None
    read_scores = None
    if readings is not None:
        result["reading"], read_scores = _reading_block(encoder, readings, texts,
                                                         plan.phrases if plan is not None else None)
    read_line_scores = read_scores.line_scores("read") if read_scores is not None else None
    if read_scores is not None:
        result["decode_then_match"] = _only_read(galleries.line_levels(ids, lengths, None, ks=ks,
                                                                       scores=read_line_scores))
    if names:
        result["levels"] = picked(galleries.line_levels(ids, lengths, collection, ks=ks, predicted=predicted,
                                                        scores=line_scores))
    image_t, text_t = torch.from_numpy(image), torch.from_numpy(text)
    _check_fields(records, "eval.gallery_by", gallery_by)
    if gallery_by:
        result["galleries"] = {}
        for key in gallery_by:
            groups = galleries.group_codes(galleries.field_values(used, key))
            block = galleries.within_group_metrics(image_t, text_t, ids, groups, ks, chunk_size)
            if names:
                block["levels"] = picked(galleries.line_levels(ids, lengths, collection, groups, ks, predicted,
                                                               scores=line_scores))
            if read_scores is not None:
                block["decode_then_match"] = _only_read(galleries.line_levels(ids, lengths, None, groups, ks,
                                                                              scores=read_line_scores))
            result["galleries"][key] = block
    if plan is not None:
        result["phrase"] = _phrase_block(encoder, plan, image_t, len(texts), ks, chunk_size, text_batch_size, progress,
                                         (phrase_seed, *phrase_syllables), picked if names else None, collection,
                                         predicted, scores, read_scores)
    return result


def _phrase_block(encoder: LineEncoder, plan: Any, image: Any, n_lines: int, ks: Sequence[int], chunk_size: int,
                  text_batch_size: int, progress: bool, drawn: tuple[int, int, int],
                  picked: Callable[[dict[str, Any]], dict[str, Any]] | None, collection: Any, predicted: Any,
                  scores: Any, read_scores: Any) -> dict[str, Any]:
    """evaluate_records' phrase queries: each phrase of `plan` (drawn with seed and syllable range `drawn`) against
    the line images, and their levels (`picked`: None when no level is asked for) and decode-then-match."""
    import torch

    from lineclip import galleries

    phrase_seed, low, high = drawn
    phrase_texts, query_lines, answers = plan.phrases, plan.query_lines, plan.answers
    phrase_emb = torch.from_numpy(encoder.encode_texts(phrase_texts, text_batch_size, progress))
    block = {"seed": phrase_seed, "syllables": [low, high], "n_queries": len(phrase_texts),
             "n_lines_without_phrase": n_lines - len(phrase_texts),
             "mean_correct_lines": float(np.mean([len(a) for a in answers])) if answers else 0.0,
             "metrics": galleries.phrase_metrics(phrase_emb, image, answers, ks, chunk_size)}
    if picked is not None:
        block["levels"] = picked(galleries.phrase_levels(
            answers, query_lines, galleries.text_bytes(phrase_texts), n_lines, collection, ks, predicted,
            scores=scores.phrase_scores("ocr") if scores is not None else None))
    if read_scores is not None:
        block["decode_then_match"] = _only_read(galleries.phrase_levels(
            answers, query_lines, galleries.text_bytes(phrase_texts), n_lines, None, ks,
            scores=read_scores.phrase_scores("read")))
    return block


def _only_read(levels: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in levels.items() if name.startswith("read_")}


def _reading_block(encoder: LineEncoder, readings: list[str], texts: list[str],
                   phrases: list[str] | None) -> tuple[dict[str, Any], Any]:
    """The reading head's CER on these lines (references: the manifest's transcriptions, as the head can write
    them) and its decode-then-match scores (lineclip.transcripts), or (a reason, None) without rapidfuzz."""
    from lineclip import transcripts
    from lineclip.reading import readable_text

    missing = transcripts.rapidfuzz_missing()
    if missing is not None:
        log.warning("reading head: no CER or decode-then-match: %s", missing)
        return {"unavailable": missing}, None
    references = [transcripts.normalize_reading(readable_text(t)) for t in texts]
    normalised = [transcripts.normalize_reading(r) for r in readings]
    block = {"cer": transcripts.character_error_rate(normalised, references),
             "frames_per_column": encoder.model.reading_head.frames_per_column,
             "empty_readings": sum(1 for r in normalised if not r),
             "examples": [{"text": t, "reading": r} for t, r in zip(texts[:3], readings[:3], strict=True)]}
    return block, transcripts.match_scores(readings, texts, phrases, transcripts.READ_SCORERS, workers=-1)


def _check_fields(records: Sequence[LineRecord], option: str, fields: Sequence[str]) -> None:
    from lineclip.galleries import field_values

    for key in fields:
        if all(v is None for v in field_values(records, key)):
            raise UsageError(f"{option}={key}: no row of the manifest has that key")


def _as_list(value: Any) -> list[str]:
    """A config value that may be one string or a list of them."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


# -------------------------------------------------------------------------------------------------- table


def _rows(block: dict[str, Any], ks: Sequence[int]) -> list[tuple[str, list[str]]]:
    rows = []
    for direction in ("i2t", "t2i"):
        for kind, label in (("duplicate_aware", "dup-aware"), ("strict", "strict")):
            m = block["metrics"][kind]
            cells = [f"{m[f'{direction}_r{k}']:.3f}" for k in ks]
            rows.append((f"{direction} {label}", cells + [f"{m[f'{direction}_mrr']:.3f}",
                                                          f"{m[f'{direction}_median_rank']:g}"]))
    for kind, label in (("duplicate_aware", "dup-aware"), ("strict", "strict")):
        c = block["chance"][kind]
        rows.append((f"chance {label}", [f"{c[f'r{k}']:.3f}" for k in ks] + [f"{c['mrr']:.3f}",
                                                                              f"~{c['mean_rank']:.0f}"]))
    return rows + _level_rows(block, ks, ("collection", "length_i2t", "length_t2i", "ocr_i2t", "ocr_t2i")) \
        + _read_rows(block, ks, ("i2t", "t2i"))


LEVEL_LABELS = {"chance": "chance", "collection": "collection only", "length_i2t": "i2t length only",
                "length_t2i": "t2i length only", "ocr_i2t": "i2t ocr", "ocr_t2i": "t2i ocr"}


def _level_rows(block: dict[str, Any], ks: Sequence[int], names: Sequence[str]) -> list[tuple[str, list[str]]]:
    rows = []
    for name in names:
        level = (block.get("levels") or {}).get(name)
        if level is not None:
            rows.append((LEVEL_LABELS[name], [f"{level[f'r{k}']:.3f}" for k in ks] + [f"{level['mrr']:.3f}", ""]))
    return rows


def _setting_rows(block: dict[str, Any], ks: Sequence[int], directions: Sequence[str]) -> list[tuple[str, list[str]]]:
    m = block["metrics"]
    rows = [(direction, [f"{m[f'{direction}_r{k}']:.3f}" for k in ks]
             + [f"{m[f'{direction}_mrr']:.3f}", f"{m[f'{direction}_median_rank']:g}"]) for direction in directions]
    names = ("chance", "collection", *(f"length_{d}" for d in directions), *(f"ocr_{d}" for d in directions))
    return rows + _level_rows(block, ks, names) + _read_rows(block, ks, directions)


def _read_rows(block: dict[str, Any], ks: Sequence[int], directions: Sequence[str]) -> list[tuple[str, list[str]]]:
    """The model's reading head, decode-then-match (expected values: equal scores in random order)."""
    rows = []
    for direction in directions:
        m = (block.get("decode_then_match") or {}).get(f"read_{direction}")
        if m is not None:
            rows.append((f"{direction} read+match", [f"{m[f'r{k}']:.3f}" for k in ks] + [f"{m['mrr']:.3f}", ""]))
    return rows


def format_table(result: dict[str, Any]) -> str:
    """The metrics as a plain-text table (overall, then one block per group)."""
    ks = result["ks"]
    header = ["", *[f"R@{k}" for k in ks], "MRR", "medR"]
    blocks = [(f"all {result['n_lines']} lines, {result['n_distinct_texts']} distinct texts", result)]
    for value, block in (result.get("groups") or {}).get("values", {}).items():
        blocks.append((f"{result['groups']['key']}={value}: {block['n_lines']} lines, "
                       f"{block['n_distinct_texts']} distinct texts", block))
    blocks = [(title, _rows(block, ks)) for title, block in blocks]
    for key, block in (result.get("galleries") or {}).items():
        blocks.append((f"within {key}: {block['n_queries']} queries in {block['n_groups']} galleries "
                       f"({block['n_alone']} alone, never a hit; {block['n_without_value']} lines without {key})",
                       _setting_rows(block, ks, ("i2t", "t2i"))))
    if "phrase" in result:
        block = result["phrase"]
        low, high = block["syllables"]
        blocks.append((f"phrase queries ({low}-{high} syllables, seed {block['seed']}): {block['n_queries']} "
                       f"queries, {block['mean_correct_lines']:.2f} correct lines each on average",
                       _setting_rows(block, ks, ("t2i",))))
    lines = []
    if "ocr" in result:
        lines.append(_ocr_title(result["ocr"]))
    if "reading" in result:
        reading = result["reading"]
        lines.append(f"reading head: not measured ({reading['unavailable']})" if "unavailable" in reading else
                     f"reading head (greedy CTC): CER {reading['cer']:.3f}, {reading['empty_readings']} empty "
                     "readings; read+match rows: its readings searched by text similarity (lines: ratio, phrases: "
                     "partial_ratio)")
    for title, rows in blocks:
        lines.append(title)
        lines.append("  " + f"{header[0]:<16}" + "".join(f"{h:>8}" for h in header[1:]))
        for label, cells in rows:
            lines.append("  " + f"{label:<16}" + "".join(f"{c:>8}" for c in cells))
    return "\n".join(lines)


def _ocr_title(block: dict[str, Any]) -> str:
    if "unavailable" in block:
        return f"ocr level: not computed ({block['unavailable']})"
    modes = "+".join(str(m) for m in block["modes"])
    cer = ", ".join(f"--psm {m} {c:.3f}" for m, c in block["cer"].items())
    return (f"ocr level: {block['version']} -l {block['lang']} --psm {modes} (joined), {block['scorers']['t2i']}; "
            f"{block['n_lines']} lines: {block['n_cached']} cached, {block['n_read']} read, {block['n_failed']} "
            f"failed; CER {cer}")


# ------------------------------------------------------------------------------------------------ command


def default_output(bundle_dir: Path, prefix: str, manifest: str) -> Path:
    return bundle_dir / f"{prefix}eval_{manifest_label(manifest)}.json"


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """The command: load, read, embed, score, print, write (the JSON only once everything succeeded)."""
    check_model_args(cfg)
    check_manifest_args(cfg)
    if not cfg.eval.ks or min(cfg.eval.ks) < 1 or cfg.eval.chunk_size < 1:
        raise UsageError("eval.ks must be positive integers and eval.chunk_size >= 1")
    from lineclip.artifacts import check_output_path, check_replaceable
    from lineclip.bundle import check_bundle, resolve_bundle
    from lineclip.encoder import load_encoder
    from lineclip.manifest import read_manifest

    ref = resolve_bundle(cfg.run_dir)
    check_bundle(ref)  # a bad run dir fails before the manifest is read
    queries = _as_list(cfg.eval.queries)
    if not set(queries) <= {"line", "phrase"}:
        raise UsageError(f"eval.queries must be line, phrase or a list of them, got {cfg.eval.queries}")
    syllables = list(cfg.eval.phrase_syllables)
    if len(syllables) != 2 or not 1 <= syllables[0] <= syllables[1]:
        raise UsageError(f"eval.phrase_syllables must be [min, max] with 1 <= min <= max, got {syllables}")
    gallery_by = _as_list(cfg.eval.gallery_by)
    from lineclip.galleries import level_names

    try:
        levels = level_names(cfg.eval.levels)
    except ValueError as exc:
        raise UsageError(f"eval.levels: {exc}") from None
    if "ocr" in levels:
        from lineclip.transcripts import SCORERS

        for direction in ("t2i", "i2t", "phrase"):
            if cfg.eval.ocr[f"scorer_{direction}"] not in SCORERS:
                raise UsageError(f"eval.ocr.scorer_{direction}={cfg.eval.ocr[f'scorer_{direction}']}: one of "
                                 f"{', '.join(SCORERS)}")
    records, report = read_manifest(cfg.manifest, cfg.dataset_dir, cfg.on_bad_row)
    # before minutes of embedding, not after
    _check_fields(records, "eval.group_key", [cfg.eval.group_key] if cfg.eval.group_key else [])
    _check_fields(records, "eval.gallery_by", gallery_by)
    output = Path(cfg.eval.output) if cfg.eval.output else default_output(ref.directory, ref.prefix, cfg.manifest)
    resolved = check_output_path(output, "eval.output", inputs=[cfg.manifest])  # never a run's or corpus's own
    check_replaceable(resolved, "eval.output", "eval")  # nor a file lineclip did not write
    encoder = load_encoder(cfg.run_dir, device=cfg.device)
    started = time.perf_counter()
    result = evaluate_records(encoder, records, cfg.eval.group_key, list(cfg.eval.ks), cfg.eval.chunk_size,
                              cfg.batch_size, cfg.text_batch_size, cfg.num_workers, cfg.progress,
                              gallery_by=gallery_by, phrases="phrase" in queries, phrase_seed=cfg.eval.phrase_seed,
                              phrase_syllables=syllables, collection_field=cfg.eval.collection_field,
                              levels=levels, ocr=OmegaConf.to_object(cfg.eval.ocr), manifest=cfg.manifest)
    import lineclip

    config = encoder.training_config
    document = {
        "manifest": report.manifest,
        "bundle": {"path": ref.label, "run_dir": str(ref.directory), "prefix": ref.prefix,
                   "global_step": config.get("global_step"), "fingerprint": encoder.fingerprint()},
        **result,
        "manifest_report": report.to_dict(),
        "seconds": round(time.perf_counter() - started, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "lineclip_version": lineclip.__version__,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    _check_finite(document)
    print(f"{encoder.bundle.label if encoder.bundle else cfg.run_dir} on {report.manifest}")
    print(format_table(result))
    write_text_atomic(output, json.dumps(document, indent=2, ensure_ascii=False))
    log.info("wrote %s", output)
    return document


def _check_finite(value: Any) -> None:
    # json.dumps would write NaN, which is not JSON; a NaN metric means a bug, not bad input.
    if isinstance(value, float) and not math.isfinite(value):
        raise RuntimeError("a metric is not finite")
    if isinstance(value, dict):
        for item in value.values():
            _check_finite(item)


register_configs()  # the `${lineclip_asset:...}` resolver, usable in evaluate overrides too
ConfigStore.instance().store(name="evaluate_schema", node=EvaluateConfig)


@hydra_command("evaluate")
def main(cfg: DictConfig) -> None:
    run_command(evaluate, cfg)


if __name__ == "__main__":
    main()
