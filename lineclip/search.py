"""`python -m lineclip.search run_dir=... query="..."` or `query_image=line.jpg`: search a corpus, print the ranked
results and write an HTML page with the matched line images, their scores and texts.

- `query=བཀྲ་ཤིས་བདེ་ལེགས` (text -> lines): the corpus lines whose images best match the phrase, typed as is
  (lineclip.cli quotes free text for Hydra; spaces and shad need only the shell's quotes);
- `query_wylie='bkra shis bde legs'`: the same, typed in Wylie / EWTS transliteration, converted by pyewts (the
  Tibetan it searched for is printed; a conversion warning stops the search instead of searching garbage);
- `query_image=path` (line -> texts and line -> similar lines): the corpus's distinct transcriptions that
  best match the line image, and the corpus lines that look most like it.

The corpus defaults to the run's training corpus (`faiss_embeddings.npy` + meta beside the final bundle);
`corpus=<dir>` picks one made by `lineclip.index`. The page goes to `<run dir>/<bundle prefix>search_<time>.html`
(or `search.output`); line images are embedded as base64 JPEG thumbnails (`search.thumbnails=false` links
them by file:// URL instead), so the page can be mailed or archived as one file.
"""

from __future__ import annotations

import base64
import functools
import html
import io
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from lineclip.cli import UsageError, check_model_args, hydra_command, run_command, write_text_atomic
from lineclip.config import ModelArgs, register_configs

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

    from lineclip.corpus import Corpus
    from lineclip.encoder import LineEncoder

log = logging.getLogger("lineclip.search")


@dataclass
class SearchOptions:
    output: str | None = None  # HTML path; default <run dir>/<bundle prefix>search_<YYYYmmdd-HHMMSS>.html
    html: bool = True
    thumbnails: bool = True  # embed base64 thumbnails (portable); false: <img src="file://...">
    thumb_height: int = 64  # px; line images are shown at most this tall
    thumb_width: int = 1200
    nprobe: int | None = None  # ivf corpora: clusters visited (default: as built)
    ef_search: int | None = None  # hnsw corpora
    text_width: int = 80  # characters of text shown per row in the terminal table


@dataclass
class SearchConfig(ModelArgs):
    query: str | None = None  # text -> lines
    query_wylie: str | None = None  # text -> lines, typed in Wylie / EWTS (converted to Tibetan by pyewts)
    query_image: str | None = None  # line image -> texts and similar lines
    corpus: str | None = None  # a lineclip.index dir; default: the run's training corpus
    top_k: int = 10
    text_batch_size: int = 64
    search: SearchOptions = field(default_factory=SearchOptions)


@dataclass
class Hit:
    """One result row. For line -> text hits `row` is the first corpus line carrying the text and `rows` all."""

    rank: int
    score: float
    row: int
    sample_id: str
    text: str
    image_path: str
    doc_id: str = ""
    page_id: str = ""
    line_id: str = ""
    rows: list[int] = field(default_factory=list)


def _hit(corpus: Corpus, rank: int, score: float, row: int, rows: list[int] | None = None) -> Hit:
    meta = corpus.meta.iloc[row]
    return Hit(rank, float(score), int(row), str(meta["sample_id"]), str(meta["text"]), str(meta["image_path"]),
               str(meta["doc_id"]), str(meta["page_id"]), str(meta["line_id"]), rows or [int(row)])


def lines_for_embedding(corpus: Corpus, query: np.ndarray, top_k: int, skip: int = 0) -> list[Hit]:
    """The corpus lines whose image embeddings score best against one query embedding (text or image): ranks
    `skip + 1` to `top_k` (a page of results reads the meta of its own rows only)."""
    scores, rows = corpus.search_images(query[None, :], top_k)
    # Approximate indexes return -1 when fewer than top_k candidates were visited.
    return [_hit(corpus, i + 1, s, r) for i, (s, r) in enumerate(zip(scores[0], rows[0], strict=True))
            if r >= 0 and i >= skip]


def texts_for_embedding(corpus: Corpus, encoder: LineEncoder, query: np.ndarray, top_k: int,
                        text_batch_size: int = 64, progress: bool = False) -> list[Hit]:
    """The corpus's distinct transcriptions that score best against a line image embedding."""
    corpus.ensure_text_embeddings(encoder, text_batch_size, progress)
    return [_hit(corpus, i + 1, score, rows[0], rows)
            for i, (score, _text, rows) in enumerate(corpus.search_texts(query, top_k))]


class WylieError(UsageError):
    """Wylie / EWTS input that does not convert cleanly; the message lists pyewts' warnings."""


def tibetan_from_wylie(text: str) -> tuple[str, list[str]]:
    """Wylie / EWTS transliteration -> Tibetan script (normalised as a query), and the converter's warnings.

    pyewts (Esukhia's port of BDRC's EWTS converter) converts what it can and warns about the rest (an unknown
    character, a stack EWTS does not allow): a non-empty warning list means the Tibetan is not what was meant,
    so callers show the warnings instead of searching. Tibetan script typed here is a warning of its own."""
    import pyewts  # a dependency of lineclip; imported here, by the two commands that take Wylie

    text = normalize_query(text)
    if has_tibetan_script(text):
        return text, ["this is Tibetan script, not Wylie: search it as Tibetan"]
    warnings: list[str] = []
    try:
        tibetan = _ewts_converter(pyewts).toUnicode(text, warnings)
    except Exception as exc:  # noqa: BLE001 - pyewts fails on some input (`M`: IndexError): a warning like its own
        return "", [f"the converter failed on it ({type(exc).__name__})"]
    return normalize_query(tibetan), [" ".join(str(w).split()) for w in warnings]


@functools.lru_cache(maxsize=1)
def _ewts_converter(pyewts: Any) -> Any:
    return pyewts.pyewts()  # builds its tables once (tens of ms)


def normalize_query(text: str) -> str:
    """A query as the model reads a transcription (lineclip.manifest.normalize_text: NFC, whitespace runs); "" for
    one of only invisible characters (zero-width, joiners), which asks for nothing (lineclip.manifest.is_blank)."""
    from lineclip.manifest import is_blank, normalize_text

    text = normalize_text(text)
    return "" if is_blank(text) else text


def query_text(cfg: DictConfig) -> tuple[str, str | None]:
    """The Tibetan text of `query=` or `query_wylie=` (and the Wylie it came from), or UsageError / WylieError."""
    if cfg.query_wylie is not None:
        wylie = str(cfg.query_wylie)
        tibetan, warnings = tibetan_from_wylie(wylie)
        if warnings:
            raise WylieError(f"query_wylie={wylie!r} does not convert cleanly to Tibetan ({tibetan!r}): "
                             + "; ".join(warnings))
        if not tibetan:
            raise UsageError("query_wylie is empty")
        return tibetan, wylie
    text = normalize_query(str(cfg.query))
    if not text:
        raise UsageError("query is empty")
    if not has_tibetan_script(text):  # as the search page refuses it: the model reads Tibetan script only
        raise UsageError(f"query={text!r} has no Tibetan script: for transliteration use query_wylie='...' "
                         "(Wylie / EWTS)")
    return text, None


# The keys whose values are free text, taken literally on the command line (lineclip.cli.quote_overrides).
QUERY_KEYS = ("query", "query_wylie")


def has_tibetan_script(text: str) -> bool:
    """Whether `text` has a character of the Tibetan block: a text query without one (Latin, a transliteration
    typed into the Tibetan field) only ranks lines by noise, so the CLI and the page both refuse it."""
    return any("\u0f00" <= ch <= "\u0fff" for ch in text)


def load_query_image(path: str | Path, max_pixels: int | None = None) -> Image.Image:
    from lineclip.encoder import ImageReadError
    from lineclip.preprocess import DECODE_ERRORS, DEFAULT_MAX_IMAGE_PIXELS, load_image

    max_pixels = DEFAULT_MAX_IMAGE_PIXELS if max_pixels is None else max_pixels

    path = Path(path).expanduser()
    if not path.is_file():
        raise ImageReadError(f"query_image={path} does not exist" if not path.exists()
                             else f"query_image={path} is not a file")
    try:
        # decode now (a truncated file opens fine and fails only on its pixels), turned as training turns lines
        image = load_image(path, max_pixels)
    except DECODE_ERRORS as exc:
        raise ImageReadError(f"query_image={path} cannot be read as an image: {type(exc).__name__}: {exc}") from None
    return image


# ------------------------------------------------------------------------------------------------- output


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(1, width - 1)] + "…"


def format_hits(title: str, hits: list[Hit], text_width: int = 80) -> str:
    lines = [title, f"  {'rank':>4}  {'score':>7}  {'sample_id':<24}  text"]
    for hit in hits:
        extra = f" (+{len(hit.rows) - 1} lines)" if len(hit.rows) > 1 else ""
        lines.append(f"  {hit.rank:>4}  {hit.score:>7.4f}  {hit.sample_id:<24}  {_clip(hit.text, text_width)}{extra}")
    if not hits:
        lines.append("  (no results)")
    return "\n".join(lines)


def line_picture(path: str | Path, max_size: tuple[int, int] | None = None, fmt: str = "JPEG") -> bytes | None:
    """The line as the model saw it before preprocessing, encoded as `fmt` (at most `max_size`, aspect kept):
    read by lineclip.preprocess.load_image (regular files only, the pixel limit, EXIF orientation), high bit
    depths scaled, alpha flattened onto white. None when the file cannot be read."""
    from PIL import Image

    from lineclip.preprocess import DECODE_ERRORS, DEFAULT_MAX_IMAGE_PIXELS, load_image, rgb_array, to_8bit

    try:
        picture = Image.fromarray(rgb_array(to_8bit(load_image(path, DEFAULT_MAX_IMAGE_PIXELS))))
    except (*DECODE_ERRORS, FileNotFoundError):
        return None
    if max_size is not None:
        picture.thumbnail(max_size)
    buffer = io.BytesIO()
    picture.save(buffer, format=fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def _thumbnail_src(path: str, opts: Any) -> str | None:
    if not opts.thumbnails:
        return Path(path).absolute().as_uri() if Path(path).is_file() else None
    jpeg = line_picture(path, (opts.thumb_width, opts.thumb_height))
    return None if jpeg is None else "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin-bottom: 2em; }
th, td { border-bottom: 1px solid #ddd; padding: .4em .6em; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.bo { font-family: "Noto Serif Tibetan", "Jomolhari", "Microsoft Himalaya", "Kailasa", serif; font-size: 1.25em; }
.path, .meta { color: #777; font-size: .8em; word-break: break-all; }
img { display: block; max-width: 100%; border: 1px solid #eee; }
.missing { color: #b00; font-size: .85em; }
"""


def _hits_table(title: str, hits: list[Hit], opts: Any, show_images: bool = True) -> str:
    e = html.escape
    rows = []
    for hit in hits:
        src = _thumbnail_src(hit.image_path, opts) if show_images else None
        if src is not None:
            picture = f'<img src="{e(src)}" alt="{e(hit.sample_id)}">'
        elif show_images:
            picture = f'<div class="missing">image not readable: {e(hit.image_path)}</div>'
        else:
            picture = ""
        others = ""
        if len(hit.rows) > 1:
            others = f'<div class="meta">{len(hit.rows)} corpus lines carry this text</div>'
        ids = " / ".join(e(v) for v in (hit.doc_id, hit.page_id, hit.line_id) if v)
        rows.append(
            f'<tr data-sample-id="{e(hit.sample_id)}"><td class="num">{hit.rank}</td>'
            f'<td class="num">{hit.score:.4f}</td><td>{e(hit.sample_id)}<div class="meta">{ids}</div></td>'
            f'<td>{picture}<div class="bo" lang="bo">{e(hit.text)}</div>{others}'
            f'<div class="path">{e(hit.image_path)}</div></td></tr>')
    body = "\n".join(rows) or '<tr><td colspan="4">(no results)</td></tr>'
    return (f"<h2>{e(title)}</h2>\n<table>\n<tr><th>rank</th><th>score</th><th>sample_id</th><th>line</th></tr>\n"
            f"{body}\n</table>")


def render_html(query: dict[str, Any], sections: list[tuple[str, list[Hit], bool]], context: dict[str, str],
                opts: Any) -> str:
    """The results page. Every string from data (texts, ids, paths) goes through html.escape."""
    e = html.escape
    if query.get("text") is not None:
        query_html = f'<p class="bo" lang="bo">{e(query["text"])}</p>'
        if query.get("wylie") is not None:
            query_html += f'<p class="meta">from Wylie: {e(query["wylie"])}</p>'
        if query.get("truncated_to"):
            query_html += f'<p class="meta">encoded as its first {query["truncated_to"]} bytes (text_max_length)</p>'
    else:
        src = _thumbnail_src(query["image"], opts)
        query_html = (f'<img src="{e(src)}" alt="query line">' if src else "") + \
            f'<div class="path">{e(query["image"])}</div>'
    meta = "".join(f"<div><b>{e(k)}</b>: {e(v)}</div>" for k, v in context.items())
    tables = "\n".join(_hits_table(title, hits, opts, images) for title, hits, images in sections)
    return (f'<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>lineclip search</title>\n'
            f"<style>{_STYLE}</style>\n</head>\n<body>\n<h1>lineclip search</h1>\n<h2>Query</h2>\n{query_html}\n"
            f'<div class="meta">{meta}</div>\n{tables}\n</body>\n</html>\n')


def default_output(bundle_dir: Path, prefix: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = bundle_dir / f"{prefix}search_{stamp}.html"
    n = 2
    while path.exists():  # two searches in one second keep both pages
        path = bundle_dir / f"{prefix}search_{stamp}-{n}.html"
        n += 1
    return path


# ------------------------------------------------------------------------------------------------ command


def search(cfg: DictConfig) -> dict[str, Any]:
    """The command: validate, load model and corpus, run the query, print the tables, write the page."""
    check_model_args(cfg)
    if sum(q is not None for q in (cfg.query, cfg.query_wylie, cfg.query_image)) != 1:
        raise UsageError("give exactly one of query=... (text -> lines, Tibetan), query_wylie=... (the same in "
                         "Wylie) or query_image=path (line -> texts)")
    if cfg.top_k < 1 or cfg.text_batch_size < 1 or cfg.search.thumb_height < 1 or cfg.search.thumb_width < 1:
        raise UsageError("top_k, text_batch_size, search.thumb_height and search.thumb_width must be >= 1")
    from lineclip.bundle import check_bundle, resolve_bundle
    from lineclip.corpus import Corpus
    from lineclip.encoder import load_encoder

    ref = resolve_bundle(cfg.run_dir)
    check_bundle(ref)
    if cfg.search.html and cfg.search.output:
        from lineclip.artifacts import check_output_path, check_replaceable

        output = check_output_path(cfg.search.output, "search.output", inputs=[cfg.query_image or ""])
        check_replaceable(output, "search.output", "search")
    text, wylie = query_text(cfg) if cfg.query_image is None else (None, None)
    if wylie is not None:
        print(f"query_wylie {wylie!r} searched as {text}")
    image = load_query_image(cfg.query_image) if cfg.query_image is not None else None
    corpus = Corpus.load(cfg.corpus or ref.directory, cfg.search.nprobe, cfg.search.ef_search)
    encoder = load_encoder(cfg.run_dir, device=cfg.device)
    corpus.check_model(encoder)

    query: dict[str, Any] = {"text": text, "wylie": wylie, "image": str(Path(cfg.query_image).expanduser())
                             if image is not None else None}
    sections: list[tuple[str, list[Hit], bool]] = []
    if text is not None:
        n_bytes = len(text.encode("utf-8"))
        if n_bytes + 1 > encoder.text_max_length:
            from lineclip.batch import cut_at_char_boundary

            kept = cut_at_char_boundary(text.encode("utf-8"), encoder.text_max_length - 1)
            query["truncated_to"] = kept
            log.warning("query is %d bytes, longer than the model's text_max_length=%d (with </s>): only its first "
                        "%d bytes are encoded", n_bytes, encoder.text_max_length, kept)
        q = encoder.encode_texts([text], warn_truncated=False)[0]
        sections.append(("text → lines", lines_for_embedding(corpus, q, cfg.top_k), True))
    else:
        q = encoder.encode_images([image])[0]
        sections.append(("line → texts", texts_for_embedding(corpus, encoder, q, cfg.top_k, cfg.text_batch_size,
                                                             cfg.progress), False))
        sections.append(("line → similar lines", lines_for_embedding(corpus, q, cfg.top_k), True))

    for title, hits, _ in sections:
        print(format_hits(f"{title} ({corpus.name}, {len(corpus)} lines)", hits, cfg.search.text_width))
    result: dict[str, Any] = {"query": query, "sections": {title: hits for title, hits, _ in sections}, "html": None}
    if cfg.search.html:
        output = Path(cfg.search.output) if cfg.search.output else default_output(ref.directory, ref.prefix)
        context = {"model": encoder.bundle.label if encoder.bundle else str(cfg.run_dir),
                   "corpus": f"{corpus.directory} ({len(corpus)} lines, {corpus.info.get('kind', 'flat')})",
                   "top_k": str(cfg.top_k), "created": time.strftime("%Y-%m-%d %H:%M:%S")}
        write_text_atomic(output, render_html(query, sections, context, cfg.search))
        log.info("wrote %s", output)
        result["html"] = output
    return result


register_configs()
ConfigStore.instance().store(name="search_schema", node=SearchConfig)


@hydra_command("search", free_text=QUERY_KEYS)
def main(cfg: DictConfig) -> None:
    run_command(search, cfg)


if __name__ == "__main__":
    main()
