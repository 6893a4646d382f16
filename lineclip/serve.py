"""`python -m lineclip.serve run_dir=RUN [corpus=DIR] [port=8000] [host=127.0.0.1]`: a local search page.

The page searches one corpus (the run's training corpus, or `corpus=DIR` made by lineclip.index) with the run's
model, both loaded once at start:
- a text query, typed in Tibetan script or in Wylie / EWTS (converted by pyewts, the Tibetan it searched for
  shown; a conversion warning is shown instead of results), -> the lines whose images match it best;
- an uploaded line image -> the corpus lines that look most like it.
Results are line thumbnails with rank and score, the transcription with the query's syllables highlighted
(`<mark>`, by lineclip.phrases), doc / page / line ids and a link to the full line image, a page at a time.

What it lets a browser read: only the corpus's own line images, by result row number (`/thumb/<row>`,
`/line/<row>`), never a path from the request; the uploaded lines it holds for paging (by content hash); and
the bundled Tibetan font, so that the page reads in a browser without one. It binds 127.0.0.1 unless told
otherwise. Bad input (an empty or unconvertible query, an unreadable or oversized upload, a page past the
end) gets the page back with a one-line message and a 4xx status, never a traceback.

Web stack: Starlette + uvicorn (the optional `serve` extra, imported only by this command): a plain HTML form
rendered on the server, no JavaScript, so the page is testable with Starlette's TestClient and any browser.
"""

from __future__ import annotations

import hashlib
import html
import ipaddress
import logging
import os
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from lineclip.cli import UsageError, check_model_args, hydra_command, run_command
from lineclip.config import ServeConfig, asset_dir, register_configs
from lineclip.search import (
    Hit,
    has_tibetan_script,
    line_picture,
    lines_for_embedding,
    normalize_query,
    tibetan_from_wylie,
)

if TYPE_CHECKING:
    import numpy as np

    from lineclip.corpus import Corpus
    from lineclip.encoder import LineEncoder

log = logging.getLogger("lineclip.serve")

SERVE_EXTRA = "pip install -e '.[serve]'"
SCRIPTS = ("tibetan", "wylie")
FONT_FILE = "NotoSerifTibetan-Regular.ttf"  # lineclip/assets/fonts, SIL OFL 1.1 (licence beside it)
# The page runs no script, loads nothing from elsewhere and posts only to itself.
CONTENT_SECURITY_POLICY = ("default-src 'none'; img-src 'self'; font-src 'self'; style-src 'unsafe-inline'; "
                           "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")


def require_web_stack() -> None:
    """Starlette, uvicorn and python-multipart, or one line naming the command that installs them."""
    from importlib.util import find_spec

    missing = [pkg for pkg, module in (("starlette", "starlette"), ("uvicorn", "uvicorn"),
                                       ("python-multipart", "python_multipart")) if find_spec(module) is None]
    if missing:
        raise UsageError(f"lineclip.serve needs the serve extra ({', '.join(missing)} missing): {SERVE_EXTRA}")


class PageError(Exception):
    """A request the page answers with a one-line message and a 4xx status."""

    def __init__(self, status: int, message: str, query: Query | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.query = status, message, query


class UploadTooLarge(Exception):
    """The request body passed max_upload_bytes while it was being read."""


@dataclass
class Query:
    """What was asked: a text (typed in `script`, searched as `text`) or an upload (by `upload` hash)."""

    typed: str = ""
    script: str = "tibetan"
    text: str | None = None  # the Tibetan searched for
    upload: str | None = None  # sha256 of an uploaded line image
    page: int = 1
    truncated_to: int | None = None  # bytes of the text the model read, when it is longer than text_max_length

    def link(self, page: int) -> str:
        params = {"upload": self.upload} if self.upload else {"q": self.typed, "script": self.script}
        return "/?" + urlencode({**params, "page": page})


@dataclass
class Results:
    query: Query
    hits: list[Hit]
    has_next: bool
    notes: list[str] = field(default_factory=list)


class LineSearch:
    """The model and the corpus, loaded once, answering the page's queries (one model call at a time)."""

    def __init__(self, encoder: LineEncoder, corpus: Corpus, cfg: DictConfig) -> None:
        self.encoder, self.corpus, self.cfg = encoder, corpus, cfg
        self._lock = threading.Lock()
        # Decoding an upload runs outside the model lock; this bounds how many do at once (serve.upload_workers).
        self._decoding = threading.BoundedSemaphore(max(1, int(cfg.upload_workers)))
        self._uploads: OrderedDict[str, tuple[np.ndarray, bytes | None]] = OrderedDict()

    @classmethod
    def load(cls, cfg: DictConfig) -> LineSearch:
        from lineclip.bundle import check_bundle, resolve_bundle
        from lineclip.corpus import Corpus
        from lineclip.encoder import load_encoder

        check_serve_args(cfg)
        ref = resolve_bundle(cfg.run_dir)
        check_bundle(ref)
        corpus = Corpus.load(cfg.corpus or ref.directory, cfg.nprobe, cfg.ef_search)
        encoder = load_encoder(cfg.run_dir, device=cfg.device)
        corpus.check_model(encoder)
        return cls(encoder, corpus, cfg)

    @property
    def label(self) -> str:
        model = self.encoder.bundle.label if self.encoder.bundle else str(self.cfg.run_dir)
        return f"{model} · corpus {self.corpus.name} ({len(self.corpus)} lines)"

    # ---------------------------------------------------------------------------------------------- queries

    def text_query(self, typed: str, script: str, page: int) -> Query:
        """The query as searched, or PageError(400) naming what is wrong with it."""
        query = Query(typed=typed, script=script, page=page)
        if script not in SCRIPTS:
            raise PageError(400, f"script={script!r} is not one of {', '.join(SCRIPTS)}", Query())
        if len(typed) > self.cfg.max_query_chars:
            raise PageError(400, f"the query has {len(typed)} characters; the limit is {self.cfg.max_query_chars} "
                                 "(max_query_chars)", query)
        if script == "wylie":
            text, warnings = tibetan_from_wylie(typed)
            if warnings:
                raise PageError(400, f"the Wylie does not convert cleanly (it reads as {text or 'nothing'}): "
                                     + "; ".join(warnings), query)
        else:
            text = normalize_query(typed)
            if text and not has_tibetan_script(text):  # as the CLI's query= refuses it
                raise PageError(400, "the query has no Tibetan script: to type transliteration, choose Wylie",
                                query)
        if not text:
            raise PageError(400, "the query is empty", query)
        query.text = text
        n_bytes = len(text.encode("utf-8"))
        if n_bytes + 1 > self.encoder.text_max_length:  # + </s>, as in training
            from lineclip.batch import cut_at_char_boundary

            query.truncated_to = cut_at_char_boundary(text.encode("utf-8"), self.encoder.text_max_length - 1)
        return query

    def text_results(self, query: Query) -> Results:
        assert query.text is not None
        with self._lock:
            embedding = self.encoder.encode_texts([query.text], warn_truncated=False)[0]
        results = self._page(query, embedding)
        if query.truncated_to:
            results.notes.append(f"the model reads only the first {query.truncated_to} bytes of this query "
                                 f"(its text_max_length is {self.encoder.text_max_length})")
        return results

    def add_upload(self, data: bytes, filename: str) -> str:
        """Embed an uploaded line image and keep it for paging; its key (content hash), or PageError(400)."""
        from lineclip.preprocess import DECODE_ERRORS, bytes_per_sample, image_header, load_image

        key = hashlib.sha256(data).hexdigest()
        with self._lock:
            if key in self._uploads:
                self._uploads.move_to_end(key)
                return key
        # load_image reads regular files (the same checks, pixel limit and EXIF turn as every line): a temp file.
        with tempfile.TemporaryDirectory(prefix="lineclip_upload_") as tmp, self._decoding:
            path = Path(tmp) / "line"
            path.write_bytes(data)
            try:
                width, height, mode = image_header(path)
                cost = width * height * bytes_per_sample(mode)
                if cost > self.cfg.max_upload_pixels:
                    depth = f", {8 * bytes_per_sample(mode)}-bit counted x{bytes_per_sample(mode)}" \
                        if bytes_per_sample(mode) > 1 else ""
                    raise PageError(400, f"{filename} is {width}x{height} pixels{depth}: more than this server's "
                                         f"max_upload_pixels={self.cfg.max_upload_pixels:,} (a line image is far "
                                         "smaller: crop it to the line)")
                image = load_image(path, self.encoder.max_image_pixels or None)
            except DECODE_ERRORS as exc:
                reason = _upload_error(exc, path, filename)
                raise PageError(400, f"{filename} cannot be read as an image: {reason}") from None
            thumb = line_picture(path, (self.cfg.thumb_width, self.cfg.thumb_height))
            with self._lock:
                embedding = self.encoder.encode_images([image])[0]
            del image
        with self._lock:
            self._uploads[key] = (embedding, thumb)
            while len(self._uploads) > self.cfg.upload_cache:
                self._uploads.popitem(last=False)
        return key

    def upload(self, key: str) -> tuple[np.ndarray, bytes | None]:
        with self._lock:
            held = self._uploads.get(key)
        if held is None:
            raise PageError(404, "this uploaded line is no longer held by the server (it keeps the last "
                                 f"{self.cfg.upload_cache}): upload it again")
        return held

    def upload_results(self, query: Query) -> Results:
        assert query.upload is not None
        return self._page(query, self.upload(query.upload)[0])

    def _page(self, query: Query, embedding: np.ndarray) -> Results:
        size = self.cfg.page_size
        last = min(self.cfg.max_results, len(self.corpus))
        if (query.page - 1) * size >= max(last, 1):
            raise PageError(400, f"page {query.page} is past the last result (at most {last} are shown)", query)
        wanted, skip = min(query.page * size, last), (query.page - 1) * size
        with self._lock:
            hits = lines_for_embedding(self.corpus, embedding, wanted, skip)
        return Results(query, hits, has_next=wanted < last and len(hits) == wanted - skip)

    # ---------------------------------------------------------------------------------------------- images

    def row_path(self, row: int) -> str:
        if not 0 <= row < len(self.corpus):
            raise PageError(404, f"no corpus line {row} (the corpus has {len(self.corpus)})")
        return str(self.corpus.meta["image_path"].iloc[row])


def _upload_error(exc: BaseException, path: Path, filename: str) -> str:
    """Why an upload did not decode, without the server's temporary file name."""
    from PIL import UnidentifiedImageError

    from lineclip.preprocess import TooManyPixels

    if isinstance(exc, UnidentifiedImageError):
        return "not an image, or a format Pillow does not read"
    if isinstance(exc, TooManyPixels):
        return "more pixels than the model's data.max_image_pixels"
    return " ".join(f"{type(exc).__name__}: {exc}".replace(str(path), filename).split())


# ---------------------------------------------------------------------------------------------------- page

# The tab's icon: a search lens, drawn (no text, so no font is needed), served by the page itself.
FAVICON_SVG = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16"><circle cx="6.5" cy="6.5" r="4.5" '
               'fill="#ffe066" stroke="#222" stroke-width="2"/><path d="M10 10l4.5 4.5" stroke="#222" '
               'stroke-width="2.5" stroke-linecap="round"/></svg>')

_STYLE = """
@font-face { font-family: "Noto Serif Tibetan (lineclip)"; src: url("/font/tibetan.ttf") format("truetype"); }
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 80em; padding: 0 1em; color: #222; }
header p { color: #666; margin-top: -.6em; font-size: .9em; }
form { margin: .6em 0; display: flex; gap: .6em; align-items: center; flex-wrap: wrap; }
/* min-width 0: the box shrinks to a phone's width (its clear button in view); line-height: the Tibetan font's
   normal one is ~3x the text, which made the box three lines tall */
input[type=search] { flex: 1 1 16em; min-width: 0; max-width: 100%; box-sizing: border-box; font-size: 1.3em;
                     padding: .25em .4em; line-height: 1.7; }
.bo, input[type=search] { font-family: "Noto Serif Tibetan (lineclip)", "Noto Serif Tibetan", "Jomolhari", serif; }
.bo { font-size: 1.35em; line-height: 1.7; padding-bottom: .3em; }
button { font-size: 1em; padding: .35em .9em; }
table { border-collapse: collapse; width: 100%; margin: 1em 0; }
th, td { border-bottom: 1px solid #ddd; padding: .4em .6em; text-align: left; vertical-align: top; }
.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; width: 4em; }
td img { display: block; max-width: 100%; border: 1px solid #eee; }
/* inline-block: the mark's background is its own line box (line-height 1.25), not the Tibetan font's content
   area, which is ~3x the text height and covered the thumbnail above */
mark { background: #ffe066; padding: 0 .05em; display: inline-block; line-height: 1.25; max-width: 100%; }
.meta { color: #777; font-size: .82em; }
/* a long id or an unbroken run of text wraps where it must rather than widen a phone's page */
.bo, .meta { overflow-wrap: anywhere; }
.error { background: #fde8e8; border: 1px solid #e0a0a0; color: #900; padding: .6em .9em; }
.note { background: #fff8e0; border: 1px solid #e8d8a0; padding: .4em .9em; }
.searched { margin: .5em 0; }
nav a, nav span { margin-right: 1em; }
/* A phone: each result is the thumbnail at the full width, rank and score one short line above it */
@media (max-width: 40em) {
  body { margin: .6em auto; padding: 0 .5em; }
  h1 { font-size: 1.4em; }
  #results, #results tbody, #results tr, #results td { display: block; width: auto; }
  #results tr:first-child { display: none; }
  #results tr.hit { display: flex; flex-wrap: wrap; border-bottom: 1px solid #ddd; padding: .4em 0; }
  #results td { border: 0; padding: .1em .2em; }
  #results td.num { width: auto; color: #666; font-size: .9em; }
  #results td.num:first-child::before { content: "#"; }
  #results td.num + td.num::before { content: "score "; }
  #results td:last-child { flex: 1 1 100%; }
  /* a line image is wide and low: shown at the page's width, scaled up if need be, it stays readable */
  #results td img { width: 100%; box-sizing: border-box; }
}
"""


def highlighted(text: str, phrase: str | None) -> str:
    """`text`, HTML-escaped, with each run of the phrase's syllables in it wrapped in <mark>."""
    from lineclip.phrases import phrase_spans

    e, out, start = html.escape, [], 0
    for a, b in phrase_spans(text, phrase) if phrase else []:
        out += [e(text[start:a]), "<mark>", e(text[a:b]), "</mark>"]
        start = b
    return "".join(out) + e(text[start:])


def _results_html(results: Results) -> str:
    e, query = html.escape, results.query
    rows = []
    for hit in results.hits:
        ids = " / ".join(f"{name} {e(value)}" for name, value in
                         (("doc", hit.doc_id), ("page", hit.page_id), ("line", hit.line_id)) if value)
        rows.append(
            f'<tr class="hit" data-row="{hit.row}" data-sample-id="{e(hit.sample_id)}">'
            f'<td class="num">{hit.rank}</td><td class="num">{hit.score:.4f}</td>'
            f'<td><a href="/line/{hit.row}"><img src="/thumb/{hit.row}" alt="line {e(hit.sample_id)}"></a>'
            f'<div class="bo" lang="bo">{highlighted(hit.text, query.text)}</div>'
            f'<div class="meta">{ids}{" · " if ids else ""}{e(hit.sample_id)} · '
            f'<a href="/line/{hit.row}">full image</a></div></td></tr>')
    first = results.hits[0].rank if results.hits else 0
    last = results.hits[-1].rank if results.hits else 0
    nav = [f'<span class="count">results {first}–{last}</span>']
    if query.page > 1:
        nav.append(f'<a rel="prev" href="{e(query.link(query.page - 1))}">← previous</a>')
    if results.has_next:
        nav.append(f'<a rel="next" href="{e(query.link(query.page + 1))}">next →</a>')
    body = "\n".join(rows) or '<tr><td colspan="3">(no results)</td></tr>'
    head = '<tr><th class="num">rank</th><th class="num">score</th><th>line</th></tr>'
    return (f'<nav>{"".join(nav)}</nav>\n<table id="results">\n{head}\n{body}\n</table>\n'
            f"<nav>{''.join(nav[1:])}</nav>")


def render_page(label: str, query: Query | None = None, results: Results | None = None,
                error: str | None = None) -> str:
    """The whole page: the two forms (filled in with the query), then the error or the results."""
    e = html.escape
    query = query or Query()
    checked = {s: " checked" if query.script == s else "" for s in SCRIPTS}
    parts = [
        f"<header><h1>lineclip search</h1><p>{e(label)}</p></header>",
        '<form id="text-search" method="get" action="/">'
        f'<input type="search" name="q" value="{e(query.typed)}" lang="bo" autofocus '
        'placeholder="བཀྲ་ཤིས་བདེ་ལེགས  or  bkra shis bde legs" aria-label="query">'
        f'<label><input type="radio" name="script" value="tibetan"{checked["tibetan"]}> Tibetan</label>'
        f'<label><input type="radio" name="script" value="wylie"{checked["wylie"]}> Wylie</label>'
        '<button type="submit">Search</button></form>',
        '<form id="image-search" method="post" action="/image" enctype="multipart/form-data">'
        '<label>or a line image (choose or drop a file): <input type="file" name="image" accept="image/*"></label>'
        '<button type="submit">Search by image</button></form>',
    ]
    if error is not None:
        parts.append(f'<p class="error" role="alert">{e(error)}</p>')
    if results is not None:
        if query.upload:
            parts.append(f'<div class="searched">lines like: <img src="/upload/{e(query.upload)}" alt="query line">'
                         "</div>")
        else:
            searched = f'searched for <span class="bo" lang="bo" id="searched">{e(query.text or "")}</span>'
            if query.script == "wylie":
                searched += f' <span class="meta">(Wylie: {e(query.typed)})</span>'
            parts.append(f'<div class="searched">{searched}</div>')
        parts += [f'<p class="note">{e(note)}</p>' for note in results.notes]
        parts.append(_results_html(results))
    title = f"{query.text} – lineclip search" if query.text else "lineclip search"
    return (f'<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{e(title)}</title>\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n<style>{_STYLE}</style>\n'
            '<link rel="icon" href="/favicon.svg" type="image/svg+xml">\n'
            "</head>\n<body>\n" + "\n".join(parts) + "\n</body>\n</html>\n")


# ----------------------------------------------------------------------------------------------------- app


# Digits a page or row number may have: more is no page or row of any corpus (and int() of 4,300+ digits raises).
_MAX_DIGITS = 12


def _number(value: str) -> int | None:
    """`value` as a non-negative number when it is ASCII digits only (str.isdigit also takes '²' and other Unicode
    digits, which int() refuses), else None."""
    if not value or len(value) > _MAX_DIGITS or not value.isascii() or not value.isdigit():
        return None
    return int(value)


def _page_number(value: str | None) -> int:
    if value is None:
        return 1
    number = _number(value)
    if number is None or number < 1:
        raise PageError(400, f"page={value[:20]!r} is not a page number (1, 2, ...)")
    return number


def _row_number(value: str) -> int:
    number = _number(value)
    if number is None:
        raise PageError(404, f"no corpus line {value[:20]!r}")
    return number


def build_app(engine: LineSearch) -> Any:
    """The Starlette app over a loaded LineSearch."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.formparsers import MultiPartException
    from starlette.requests import Request
    from starlette.responses import FileResponse, HTMLResponse, RedirectResponse, Response
    from starlette.routing import Route

    cfg = engine.cfg
    headers = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff"}

    def page(status: int = 200, **kwargs: Any) -> HTMLResponse:
        return HTMLResponse(render_page(engine.label, **kwargs), status_code=status, headers=headers)

    async def home(request: Request) -> Response:
        params = request.query_params
        page_number = _page_number(params.get("page"))
        if params.get("upload") is not None:
            key = params["upload"]
            if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
                raise PageError(400, "upload= is not an uploaded line's key")
            query = Query(upload=key, page=page_number)
            return page(query=query, results=await run_in_threadpool(engine.upload_results, query))
        typed = params.get("q")
        if typed is None:
            return page()
        query = engine.text_query(typed, params.get("script", "tibetan"), page_number)
        return page(query=query, results=await run_in_threadpool(engine.text_results, query))

    async def image_search(request: Request) -> Response:
        limit = cfg.max_upload_bytes
        too_large = PageError(413, f"the upload is larger than {limit:,} bytes (max_upload_bytes)")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise too_large
        received = 0

        async def receive() -> Any:  # the body without a Content-Length is counted as it arrives
            nonlocal received
            message = await request.receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise UploadTooLarge
            return message

        try:
            async with Request(request.scope, receive).form(max_files=1, max_fields=4) as form:
                upload = form.get("image")
                if not hasattr(upload, "read") or not upload.filename:
                    raise PageError(400, "choose a line image file to search with")
                data = await upload.read()
                filename = os.path.basename(upload.filename)
        except UploadTooLarge:
            raise too_large from None
        except MultiPartException as exc:
            raise PageError(400, f"the upload is not a valid form: {exc.message}") from None
        if not data:
            raise PageError(400, f"{filename} is empty")
        key = await run_in_threadpool(engine.add_upload, data, filename)
        return RedirectResponse(Query(upload=key).link(1), status_code=303)

    def thumbnail(request: Request) -> Response:
        return _picture(request, (cfg.thumb_width, cfg.thumb_height), "JPEG", "image/jpeg")

    def full_line(request: Request) -> Response:
        return _picture(request, None, "PNG", "image/png")

    def _picture(request: Request, size: tuple[int, int] | None, fmt: str, media_type: str) -> Response:
        row = _row_number(request.path_params["row"])
        path = engine.row_path(row)  # the corpus's own recorded path, by row only
        data = line_picture(path, size, fmt)
        if data is None:
            raise PageError(404, f"the image of corpus line {row} cannot be read")
        return Response(data, media_type=media_type, headers={"Cache-Control": "private, max-age=3600"})

    def upload_picture(request: Request) -> Response:
        thumb = engine.upload(request.path_params["key"])[1]
        if thumb is None:
            raise PageError(404, "no picture of this upload")
        return Response(thumb, media_type="image/jpeg")

    def font(request: Request) -> Response:
        return FileResponse(asset_dir("fonts") / FONT_FILE, media_type="font/ttf",
                            headers={"Cache-Control": "public, max-age=86400"})

    async def page_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, PageError)
        if request.url.path != "/" and request.url.path != "/image":  # an image: a short text, not a page
            return Response(exc.message, status_code=exc.status, media_type="text/plain; charset=utf-8")
        return page(exc.status, query=exc.query, error=exc.message)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return page(exc.status_code, error=f"{exc.status_code}: {exc.detail}")

    async def server_error(request: Request, exc: Exception) -> Response:
        log.error("%s %s failed: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        return page(500, error="the server failed to answer this request (its log says why)")

    def favicon(request: Request) -> Response:
        return Response(FAVICON_SVG, media_type="image/svg+xml", headers={"Cache-Control": "public, max-age=86400"})

    routes = [
        Route("/", home, methods=["GET"]),
        Route("/favicon.svg", favicon, methods=["GET"]),
        Route("/favicon.ico", favicon, methods=["GET"]),  # what a browser asks for when a page names no icon
        Route("/image", image_search, methods=["POST"]),
        # {row} as text, parsed by _row_number: Starlette's int convertor takes any digits and int() fails on
        # 5,000 of them (a 500); here any row that is not one is a 404.
        Route("/thumb/{row}", thumbnail, methods=["GET"]),
        Route("/line/{row}", full_line, methods=["GET"]),
        Route("/upload/{key:str}", upload_picture, methods=["GET"]),
        Route("/font/tibetan.ttf", font, methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={PageError: page_error, HTTPException: http_error,
                                                        Exception: server_error})


# ------------------------------------------------------------------------------------------------- command


def check_serve_args(cfg: DictConfig) -> None:
    check_model_args(cfg)
    if not 0 <= cfg.port <= 65535:
        raise UsageError(f"port must be in 0..65535, got {cfg.port}")
    positive = ("page_size", "max_results", "max_upload_bytes", "max_query_chars", "thumb_height", "thumb_width",
                "upload_cache", "max_upload_pixels", "upload_workers")
    bad = [f"{key}={cfg[key]}" for key in positive if cfg[key] < 1]
    if bad:
        raise UsageError(f"{', '.join(bad)}: must be >= 1")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_port(host: str, port: int) -> None:
    """Fail now, in one line, if (host, port) cannot be bound, rather than after loading the model (uvicorn
    would then log the error and exit 3). Bound as uvicorn binds it, then released."""
    import socket

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        raise UsageError(f"cannot serve on host={host} port={port}: {exc.strerror or exc}") from None


def serve(cfg: DictConfig) -> None:
    """The command: check, load model and corpus once, then serve until interrupted."""
    check_serve_args(cfg)
    require_web_stack()
    check_port(cfg.host, cfg.port)
    import uvicorn

    engine = LineSearch.load(cfg)
    app = build_app(engine)
    if not is_loopback(cfg.host):
        log.warning("host=%s: anyone who can reach this machine's port %d can search %s and see its line images",
                    cfg.host, cfg.port, engine.corpus.directory)
    log.info("loaded %s; starting the page (uvicorn prints its address; Ctrl-C stops)", engine.label)
    # log_config=None: uvicorn's loggers go through the command's own console logging (one format).
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_config=None, log_level="info", server_header=False)


register_configs()
ConfigStore.instance().store(name="serve_schema", node=ServeConfig)


@hydra_command("serve")
def main(cfg: DictConfig) -> None:
    run_command(serve, cfg)


if __name__ == "__main__":
    main()
