"""`python -m lineclip.synth out_dir=... n_lines=...`: synthetic Tibetan pecha lines for pretraining.

Each line is one corpus line, optionally cut at syllable boundaries, set in an OFL font through Pillow's
RAQM layout (the only Pillow layout that stacks Tibetan letters correctly), then degraded to look like a
scanned woodblock print or manuscript: parts of the neighbouring lines cut at the top and bottom, frame
rules, ink weight and bleed, worn blocks, paper colour and texture, rotation and baseline warp, blur,
noise and JPEG artefacts, or a scan-like black-and-white binarisation (as in the real dev lines). The
output is an OpenPecha-style dataset dir that `lineclip.manifest.read_manifest` reads as is:

    <out_dir>/train/lines/<id>.png   <out_dir>/train/meta/lines.jsonl
    <out_dir>/eval/lines/<id>.png    <out_dir>/eval/meta/lines.jsonl    (lines from pages never in train)

Every line is a pure function of (seed, line index) and the inputs, so the output is byte-identical for
any `workers` and `chunk_size`. Corpus lines are used in a seeded random order, each once before any is
used again (with a new cut and look), so `n_lines` may exceed the corpus size.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import re
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from PIL import Image, ImageDraw, ImageFont, features

from lineclip.cli import hydra_command
from lineclip.config import register_configs
from lineclip.files import usable_cpus
from lineclip.manifest import normalize_text
from lineclip.progress import Progress

log = logging.getLogger("lineclip.synth")

SPLITS = ("train", "eval")
STYLES = ("binarized", "paper")
FONT_SUFFIXES = (".ttf", ".otf", ".ttc")

# Pecha line-start marks (yig mgo + shad). "། །" becomes "༎" on lines written with double shads, which
# gives "༄༄༎", the form the real dev transcriptions use.
YIG_MGO = ("༄༅། །", "༄༅༅། །", "༄། །", "༄༄། །")
# A syllable with its trailing tsheg(s)/spaces: cutting between these never splits a syllable.
_SYLLABLE = re.compile(r"[^\u0f0b\u0f0c ]+[\u0f0b\u0f0c ]*|[\u0f0b\u0f0c ]+")
# Paper colours (RGB, 0..1): white, cream, yellowed, tan, grey, brown.
_PAPERS = np.array(
    [[0.94, 0.93, 0.90], [0.91, 0.86, 0.74], [0.86, 0.78, 0.60], [0.80, 0.70, 0.53],
     [0.80, 0.80, 0.78], [0.71, 0.60, 0.45]],
    dtype=np.float32,
)


@dataclass
class SynthConfig:
    """Schema of `conf/synth.yaml`; ranges are [low, high] and picked uniformly per line."""

    out_dir: str = MISSING
    n_lines: int = 1000  # train + eval
    seed: int = 0
    workers: int = 0  # processes; 0: one per CPU
    chunk_size: int = 16  # lines per task
    eval_fraction: float = 0.1  # eval lines are rendered from corpus pages that train never uses
    corpus: str = "${lineclip_asset:corpus}/derge_kangyur_lines.jsonl.gz"
    font: str = "${lineclip_asset:fonts}"  # a font file, or a dir whose fonts are all used (one per line)
    overwrite: bool = False
    grayscale: bool = False  # save paper-style lines as 8-bit grey too (binarized lines always are)
    progress: bool = True
    # Geometry of the saved image (real dev lines: 60-112 px high, ~18:1).
    height: list[int] = field(default_factory=lambda: [60, 112])
    aspect: list[float] = field(default_factory=lambda: [15.0, 24.0])  # target width / height (real: 14.5-24)
    p_short: float = 0.08  # a much shorter line (the end of a text), aspect from short_aspect
    short_aspect: list[float] = field(default_factory=lambda: [3.0, 13.0])
    # Text.
    p_cut: float = 0.8  # start at a random syllable instead of the corpus line's start
    p_yig_mgo: float = 0.1  # prefix a line-start mark (it is part of the transcription)
    p_double_shad: float = 0.5  # write "། །" as "༎" (the dev transcriptions' convention)
    # Look.
    p_binarized: float = 0.6  # black-and-white scan (like the dev lines); otherwise paper and ink colours
    p_neighbours: float = 0.95  # show the cut-off lines above and below
    p_frame: float = 0.7  # vertical frame rules at the line ends (a page's first/last line always has its rule)
    p_border: float = 0.9  # dark bands along the image edges, as nearly all real dev lines have
    p_jpeg: float = 0.7
    max_rotation_deg: float = 0.6
    max_warp: float = 0.03  # baseline warp amplitude, fraction of the image height
    degradation: float = 1.0  # scales every degradation; 0 renders clean lines


class SynthError(RuntimeError):
    """A setup problem (no RAQM, bad option, unreadable corpus or font); the message is one line."""


@dataclass(frozen=True)
class CorpusLine:
    text: str
    doc_id: str
    page_id: str
    line_id: int | str
    first_on_page: bool = False
    last_on_page: bool = False


@dataclass
class SynthReport:
    out_dir: str
    lines: dict[str, int]
    seconds: float
    lines_per_s: float
    workers: int
    manifests: dict[str, str]


def check_raqm() -> None:
    """Raise SynthError unless Pillow has RAQM; the basic layout would render broken Tibetan stacks."""
    if not features.check("raqm"):
        raise SynthError(
            "Pillow has no RAQM layout (PIL.features.check('raqm') is False), which Tibetan needs to stack "
            "letters; install the PyPI wheel (pip install --force-reinstall pillow) or build Pillow with libraqm"
        )


def load_corpus(path: str | Path) -> list[CorpusLine]:
    """Corpus lines from JSONL (`text` plus `volume`/`folio`/`line` or `doc_id`/`page_id`/`line_id`) or
    plain text (one line a line, grouped into 7-line pages), optionally gzipped."""
    path = Path(path)
    if not path.is_file():
        raise SynthError(f"corpus {path} is not a file")
    opener = gzip.open if path.suffix == ".gz" else open
    is_jsonl = ".jsonl" in path.suffixes or ".json" in path.suffixes
    rows: list[tuple[str, str, str, int | str]] = []
    with opener(path, "rt", encoding="utf-8") as handle:
        for line_no, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            if is_jsonl:
                try:
                    row = json.loads(raw)
                    text = normalize_text(row["text"])
                except (ValueError, KeyError, TypeError, AttributeError):
                    raise SynthError(f"{path}:{line_no}: not a JSON object with a string 'text'") from None
                doc = str(row.get("doc_id") or str(row.get("volume", path.stem)).removesuffix(".txt"))
                page = str(row.get("page_id") or f"{doc}:{row.get('folio', line_no // 7)}")
                line_id = row.get("line_id", row.get("line", line_no))
            else:
                text = normalize_text(raw)
                doc = path.name.split(".")[0]
                page, line_id = f"{doc}:{len(rows) // 7 + 1}", len(rows) % 7 + 1
            if text:
                rows.append((text, doc, page, line_id))
    if not rows:
        raise SynthError(f"corpus {path} has no text lines")
    lines = []
    for i, (text, doc, page, line_id) in enumerate(rows):
        first = i == 0 or rows[i - 1][2] != page
        last = i == len(rows) - 1 or rows[i + 1][2] != page
        lines.append(CorpusLine(text, doc, page, line_id, first, last))
    return lines


def find_fonts(path: str | Path) -> list[Path]:
    """The font file `path`, or every font file directly inside the dir `path`, sorted by name."""
    path = Path(path)
    if path.is_file():
        fonts = [path]
    elif path.is_dir():
        fonts = sorted(p for p in path.iterdir() if p.suffix.lower() in FONT_SUFFIXES)
    else:
        raise SynthError(f"font {path} is neither a font file nor a dir")
    if not fonts:
        raise SynthError(f"font dir {path} holds no {'/'.join(FONT_SUFFIXES)} file")
    for font in fonts:
        try:
            ImageFont.truetype(str(font), 20)
        except OSError as err:
            raise SynthError(f"font {font} cannot be loaded: {err}") from None
    return fonts


@lru_cache(maxsize=64)
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size, layout_engine=ImageFont.Layout.RAQM)


@lru_cache(maxsize=16)
def _font_metrics(path: str) -> tuple[float, float, float]:
    """(px per character of a typical line, top and bottom of the letter body (the headline to the foot of
    ཀ) relative to the baseline), per px of font size."""
    font = _font(path, 100)
    sample = "དཀོན་མཆོག་གསུམ་ལ་ཕྱག་འཚལ་ལོ། །གང་གིས་འཆིང་བ་སྒྲུབ་པའི་བྱང་ཆུབ་སེམས་དཔའ་རྣམས་"
    _, top, _, bottom = font.getbbox("ཀ", anchor="ls")
    return font.getlength(sample) / len(sample) / 100, top / 100, bottom / 100


def _uniform(rng: np.random.Generator, bounds: Sequence[float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell: float) -> np.ndarray:
    """Low-frequency noise in about [-1, 1]: a coarse random grid upsampled with cubic interpolation."""
    h, w = shape
    grid = rng.standard_normal((max(2, int(h / cell) + 2), max(2, int(w / cell) + 2))).astype(np.float32)
    return np.clip(cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC) * 0.6, -1.5, 1.5)


def _sparse_points(rng: np.random.Generator, shape: tuple[int, int], density: float) -> np.ndarray:
    """A float image with about density * pixels ones at random places (cheaper than thresholding noise)."""
    points = np.zeros(shape, np.float32)
    count = int(rng.binomial(shape[0] * shape[1], min(max(density, 0.0), 1.0)))
    points.flat[rng.integers(0, points.size, count)] = 1.0
    return points


def _draw_borders(rng: np.random.Generator, m: np.ndarray, scale: float) -> None:
    """Dark bands along the crop's edges, in place: nearly every real dev line has them at the top and
    bottom (1-7 % of the height, the scan's dark surround or the frame), a third at the ends (1-9 px)."""
    h, w = m.shape
    xs = np.arange(w, dtype=np.float32)
    for top in (True, False):
        base = h * _uniform(rng, (0.01, 0.07))
        ragged = base * (1 + 0.4 * np.sin(xs / _uniform(rng, (20, 200)) + _uniform(rng, (0, 6.3))))
        depth = int(math.ceil(float(ragged.max()))) + 1
        inside = np.arange(depth, dtype=np.float32)[:, None] < ragged[None, :]
        band = m[:depth] if top else m[::-1][:depth]  # a view, so the writes land in m
        band[inside] = 1.0
    for end in (slice(0, None), slice(None, None, -1)):
        if rng.random() < 0.35:
            m[:, end][:, :max(1, round(_uniform(rng, (1, 9)) * scale))] = 1.0


def _cut_text(rng: np.random.Generator, text: str, max_chars: int, p_cut: float) -> str:
    """A run of whole syllables of about `max_chars` characters (the start random with p_cut)."""
    units = _SYLLABLE.findall(text)
    if len(text) <= max_chars or len(units) < 2:
        return text
    ends = np.cumsum([len(u) for u in units])
    starts = ends - np.array([len(u) for u in units])
    latest_start = int(np.searchsorted(starts, len(text) - max_chars, side="right")) - 1
    begin = int(rng.integers(0, max(latest_start, 0) + 1)) if rng.random() < p_cut else 0
    stop = int(np.searchsorted(ends, starts[begin] + max_chars, side="right"))
    return "".join(units[begin:max(stop, begin + 1)])


def _shads(text: str, double: bool) -> str:
    return text.replace("། །", "༎ ") if double else text


def compose_text(rng: np.random.Generator, line: CorpusLine, max_chars: int, cfg: SynthConfig) -> tuple[str, bool]:
    """The transcription of one rendered line (normalised) and whether it uses double shads."""
    double = bool(rng.random() < cfg.p_double_shad)
    body = _cut_text(rng, line.text, max_chars, cfg.p_cut)
    prefix = ""
    if rng.random() < cfg.p_yig_mgo and not body.startswith("༄"):
        prefix = YIG_MGO[int(rng.integers(len(YIG_MGO)))]
        prefix = prefix.replace("། །", "༎") if double else prefix
    text = normalize_text(prefix + _shads(body, double))
    return (text if text else normalize_text(line.text)), double


def render_line(
    rng: np.random.Generator,
    corpus: Sequence[CorpusLine],
    index: int,
    fonts: Sequence[Path],
    cfg: SynthConfig,
) -> tuple[np.ndarray, str, str, str]:
    """Render corpus line `index`: (image, transcription, font file name, style).

    The image is uint8, H x W (grey) for style "binarized" and H x W x 3 (RGB) for style "paper".
    """
    line = corpus[index]
    k = cfg.degradation
    font_path = fonts[int(rng.integers(len(fonts)))]
    per_char, body_top, body_bottom = _font_metrics(str(font_path))

    # Geometry: render at `scale` times the output size, so that morphology and thresholds act on
    # sub-pixel detail and the final INTER_AREA downscale leaves scan-like grey edges.
    height = int(rng.integers(cfg.height[0], cfg.height[1] + 1))
    scale = _uniform(rng, (1.25, 1.6))
    crop_h = round(height * scale)
    # Proportions measured on the real dev lines: the letter body (headline to foot) is about 0.3 of
    # the image height, the line pitch about 0.5 of it, so vowels and stacks of the neighbouring lines
    # reach into the image; woodblock letters are also wider than the fonts' (stretch).
    size = max(8, round(crop_h * _uniform(rng, (0.28, 0.36)) / (body_bottom - body_top)))
    pitch = crop_h * _uniform(rng, (0.42, 0.55))
    stretch = _uniform(rng, (0.95, 1.35))
    short = rng.random() < cfg.p_short
    aspect = _uniform(rng, cfg.short_aspect if short else cfg.aspect)
    max_chars = max(4, int(aspect * crop_h / (per_char * size * stretch)))
    text, double = compose_text(rng, line, max_chars, cfg)
    font = _font(str(font_path), size)
    x0, _, x1, _ = font.getbbox(text, anchor="ls")

    pad_left = round(size * _uniform(rng, (0.3, 1.2)))
    pad_right = round(size * _uniform(rng, (0.3, 1.2)))
    width = pad_left + (x1 - x0) + pad_right
    margin = round(crop_h * 0.35)  # room for warp and rotation to pull content in from outside the crop
    canvas_h = crop_h + 2 * margin
    baseline = margin + crop_h / 2 - size * (body_top + body_bottom) / 2 + crop_h * _uniform(rng, (0.02, 0.1))
    ink = Image.new("L", (width, canvas_h), 0)
    draw = ImageDraw.Draw(ink)
    draw.text((pad_left - x0, baseline), text, font=font, fill=255, anchor="ls")

    # Neighbouring lines (the real ones of the same page), and frame rules around the text block.
    frame = rng.random() < cfg.p_frame
    rule = max(2, round(size * _uniform(rng, (0.05, 0.14))))
    if rng.random() < cfg.p_neighbours * min(k, 1.0):
        for step, is_edge in ((-1, line.first_on_page), (1, line.last_on_page)):
            y = baseline + step * pitch * _uniform(rng, (0.97, 1.03))
            if is_edge:  # the first or last line of a page: the page frame's heavy rule instead of a line
                edge = baseline + step * pitch * _uniform(rng, (0.5, 0.7))
                heavy = size * _uniform(rng, (0.1, 0.3))
                draw.rectangle((0, edge - heavy / 2, width, edge + heavy / 2), fill=255)
                continue
            neighbour = corpus[index + step]
            offset = pad_left - x0 + size * _uniform(rng, (-0.15, 0.15))
            # Only what fits the canvas: laying out the rest of a long line would be wasted time.
            visible = neighbour.text[:int(1.3 * width / (per_char * size)) + 8]
            draw.text((offset, y), _shads(visible, double), font=font, fill=255, anchor="ls")
    if frame:
        gap = size * _uniform(rng, (0.15, 0.6))
        draw.rectangle((pad_left - gap - rule, 0, pad_left - gap, canvas_h), fill=255)
        if rng.random() < 0.5:  # a double rule, as on many pecha frames
            inner = pad_left - gap - rule - max(3, rule)
            draw.rectangle((inner - max(1, rule // 2), 0, inner, canvas_h), fill=255)
        if not short:
            right = width - pad_right + gap
            draw.rectangle((right, 0, right + rule, canvas_h), fill=255)
    mask = np.asarray(ink)

    # Ink weight: woodblock strokes are heavier and more even than the fonts' (lighter impressions come
    # from the threshold below; eroding would wipe out the thin strokes of small sizes).
    weight = round(_uniform(rng, (0.4, 1.6)) * size / 40 * min(k, 1.0))
    if weight:
        mask = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3)), iterations=weight)

    mask = _warp(rng, mask, cfg, k, crop_h)  # rotation and baseline warp
    m = mask[margin:margin + crop_h].astype(np.float32) / 255.0
    if rng.random() < cfg.p_border * min(k, 1.0):
        _draw_borders(rng, m, scale)

    m = _bleed(rng, m, k, size)
    out_w = max(1, round(width * stretch * height / crop_h))
    img, style = _on_paper(rng, m, cfg, k, crop_h, out_w, height)
    out = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if rng.random() < cfg.p_jpeg * min(k, 1.0):
        quality = int(rng.integers(35, 91))
        ok, buf = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, quality])  # channel order is moot here
        if ok:
            out = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    return out, text, font_path.name, style


def _warp(rng: np.random.Generator, mask: np.ndarray, cfg: SynthConfig, k: float, crop_h: int) -> np.ndarray:
    """render_line's rotation (< 1 deg) and smooth baseline warp of the ink `mask` (canvas_h x width), in one remap."""
    canvas_h, width = mask.shape
    theta = math.radians(_uniform(rng, (-cfg.max_rotation_deg, cfg.max_rotation_deg)) * k)
    xs = np.arange(width, dtype=np.float32)
    warp = np.zeros(width, dtype=np.float32)
    for _ in range(2):
        period = _uniform(rng, (0.6, 4.0)) * crop_h * 4
        amp = _uniform(rng, (0.0, cfg.max_warp)) * crop_h * k
        warp += amp * np.sin(2 * np.pi * xs / period + _uniform(rng, (0, 2 * np.pi)))
    # Below 1 deg the horizontal part of a rotation moves pixels by under a pixel; the vertical part is
    # a shear, added to the warp (and a full map_x per pixel would cost as much as the rest together).
    warp += np.float32(math.tan(theta)) * (xs - width / 2)
    # A line segmenter would have cut a taller box around a more tilted line: keep the transcribed text
    # inside the crop by capping the total displacement.
    limit = 0.08 * crop_h
    if np.abs(warp).max() > limit:
        warp *= limit / np.abs(warp).max()
    map_x = np.broadcast_to(xs, (canvas_h, width))
    map_y = np.arange(canvas_h, dtype=np.float32)[:, None] + warp[None, :]
    return cv2.remap(mask, np.ascontiguousarray(map_x), map_y, cv2.INTER_LINEAR, borderValue=0)


def _bleed(rng: np.random.Generator, m: np.ndarray, k: float, size: int) -> np.ndarray:
    """render_line's bleed and rough edges of the ink coverage `m` (0..1): blur, add grain, then a soft threshold
    (ink spreading into paper fibres); worn blocks; spatter. None of it at degradation 0."""
    if k <= 0:
        return m
    shape = m.shape
    m = cv2.GaussianBlur(m, (0, 0), _uniform(rng, (0.5, 1.3)) * size / 40)
    grain = cv2.GaussianBlur(rng.standard_normal(shape, dtype=np.float32), (0, 0), 0.8)
    m = m + grain * _uniform(rng, (0.05, 0.25)) * k
    m = np.clip((m - _uniform(rng, (0.35, 0.55))) / 0.12 + 0.5, 0.0, 1.0)
    # Worn blocks and dry ink: low-frequency fading plus small gaps.
    wear = _uniform(rng, (0.0, 0.45)) * k
    m *= 1.0 - wear * (0.5 + 0.5 * _smooth_noise(rng, shape, size * 1.5))
    holes = _smooth_noise(rng, shape, max(2.0, size / 10)) > _uniform(rng, (1.0, 1.6))
    m[holes] *= 0.15
    # Ink spatter and dirt.
    spots = _sparse_points(rng, shape, _uniform(rng, (0.0, 4e-4)) * k)
    spots = cv2.GaussianBlur(spots, (0, 0), _uniform(rng, (0.7, 1.6)))
    m = np.maximum(m, np.clip(spots * 12.0, 0.0, 1.0))
    return np.clip(m, 0.0, 1.0)


def _on_paper(rng: np.random.Generator, m: np.ndarray, cfg: SynthConfig, k: float, crop_h: int, out_w: int,
              height: int) -> tuple[np.ndarray, str]:
    """render_line's ink coverage `m` printed on paper and scanned at out_w x height: (float image 0..1, style).
    Paper: colour, uneven tone, fibres and stains; ink: near black or brown, not quite opaque."""
    shape = m.shape
    style = "binarized" if rng.random() < cfg.p_binarized else "paper"
    paper = _PAPERS[int(rng.integers(len(_PAPERS)))] + rng.uniform(-0.04, 0.04, 3).astype(np.float32)
    tone = _smooth_noise(rng, shape, crop_h * _uniform(rng, (0.5, 3.0))) * _uniform(rng, (0.01, 0.08)) * k
    fibres = _sparse_points(rng, shape, 0.02)
    length = int(rng.integers(3, 9))
    kernel = np.zeros((length, length), np.float32)
    cv2.line(kernel, (0, int(rng.integers(length))), (length - 1, int(rng.integers(length))), 1.0, 1)
    fibres = cv2.filter2D(fibres, -1, kernel / kernel.sum()) * _uniform(rng, (-0.5, 0.5)) * k
    shade = tone + fibres
    if rng.random() < 0.2 * k:  # a stain
        shade -= np.clip(_smooth_noise(rng, shape, crop_h) - 0.6, 0.0, None) * _uniform(rng, (0.1, 0.3))
    ink_rgb = np.array([0.08, 0.07, 0.06], np.float32) + rng.uniform(0.0, 0.12) * np.array([1.0, 0.7, 0.4])
    alpha = m * _uniform(rng, (0.85, 1.0))
    if style == "binarized":
        # A bilevel scan of the same page, in grey only (its colours would be thrown away).
        ink_level, paper_level = float(ink_rgb.mean()), float(paper.mean())
        grey = (paper_level + shade) * (1.0 - alpha) + ink_level * alpha
        # Between ink and paper: a high threshold makes bold strokes, a low one thin and broken ones.
        threshold = ink_level + (paper_level - ink_level) * _uniform(rng, (0.35, 0.8))
        img = cv2.resize((grey > threshold).astype(np.float32), (out_w, height), interpolation=cv2.INTER_AREA)
        img = cv2.GaussianBlur(img, (0, 0), _uniform(rng, (0.05, 0.5)) * max(k, 0.01))  # scanner optics
    else:
        img = (paper[None, None, :] + shade[..., None]) * (1.0 - alpha[..., None]) + ink_rgb * alpha[..., None]
        img = cv2.GaussianBlur(img, (0, 0), _uniform(rng, (0.3, 0.9)) * max(k, 0.01))
        img = cv2.resize(img, (out_w, height), interpolation=cv2.INTER_AREA)
        img += rng.standard_normal((height, out_w, 1), dtype=np.float32) * _uniform(rng, (0, 0.03)) * k
    return img, style


# ---------------------------------------------------------------------------------------------------------
# The dataset: which corpus line each index renders, parallel rendering, manifests.


@dataclass
class _Job:
    cfg: SynthConfig
    corpus: list[CorpusLine]
    fonts: list[Path]
    out_dir: Path
    n_train: int
    pools: dict[str, list[int]]


_JOB: _Job | None = None


def _init_worker(job: _Job) -> None:
    global _JOB
    _JOB = job
    cv2.setNumThreads(1)  # the pool already uses every core; cv2's own threads would only contend


def line_seed(seed: int, index: int) -> np.random.Generator:
    """The generator of line `index`: independent of every other line, so any worker may render it."""
    return np.random.default_rng([seed, 1, index])


def _render_chunk(bounds: tuple[int, int]) -> list[tuple[str, dict[str, Any]]]:
    job = _JOB
    assert job is not None, "worker not initialised"
    rows = []
    for index in range(*bounds):
        split = "train" if index < job.n_train else "eval"
        pool = job.pools[split]
        position = index if split == "train" else index - job.n_train
        corpus_index = pool[position % len(pool)]
        image, text, font, style = render_line(line_seed(job.cfg.seed, index), job.corpus, corpus_index,
                                               job.fonts, job.cfg)
        sample_id = f"synth_{index:07d}"
        rel = f"{split}/lines/{sample_id}.png"
        # Binarized lines are grey anyway: one channel is a third of the disk and of the PNG encoding time.
        pil = Image.fromarray(image)
        if job.cfg.grayscale or style == "binarized":
            pil = pil.convert("L")
        pil.save(job.out_dir / rel, compress_level=3)  # zlib level 3: about as small as 6, twice as fast
        source = job.corpus[corpus_index]
        rows.append((split, {
            "id": sample_id, "line_path": rel, "text": text, "font": font, "style": style,
            "doc_id": source.doc_id, "page_id": source.page_id, "line_id": source.line_id,
            "width": pil.width, "height": pil.height,
        }))
    return rows


def _check(cfg: SynthConfig) -> None:
    if cfg.n_lines < 1:
        raise SynthError(f"n_lines must be >= 1, got {cfg.n_lines}")
    if cfg.seed < 0 or cfg.workers < 0 or cfg.chunk_size < 1:
        raise SynthError("seed and workers must be >= 0 and chunk_size >= 1")
    if not 0.0 <= cfg.eval_fraction < 1.0:
        raise SynthError(f"eval_fraction must be in [0, 1), got {cfg.eval_fraction}")
    for name in ("height", "aspect", "short_aspect"):
        bounds = getattr(cfg, name)
        if len(bounds) != 2 or not 0 < bounds[0] <= bounds[1]:
            raise SynthError(f"{name} must be [low, high] with 0 < low <= high, got {list(bounds)}")
    if cfg.height[0] < 8:
        raise SynthError(f"height must be >= 8 px, got {list(cfg.height)}")
    for name in ("p_short", "p_cut", "p_yig_mgo", "p_double_shad", "p_binarized", "p_neighbours", "p_frame",
                 "p_border", "p_jpeg"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise SynthError(f"{name} must be a probability in [0, 1], got {getattr(cfg, name)}")
    if cfg.degradation < 0 or cfg.max_rotation_deg < 0 or cfg.max_warp < 0:
        raise SynthError("degradation, max_rotation_deg and max_warp must be >= 0")


def _split_pages(corpus: Sequence[CorpusLine], seed: int, eval_fraction: float) -> dict[str, list[int]]:
    """Shuffled corpus indices per split; eval lines come from whole pages that train never sees."""
    rng = np.random.default_rng([seed, 0])
    pages = list(dict.fromkeys(line.page_id for line in corpus))
    order = [pages[i] for i in rng.permutation(len(pages))]
    n_eval = 0 if eval_fraction == 0 else min(len(pages) - 1, max(1, round(eval_fraction * len(pages))))
    if eval_fraction > 0 and n_eval < 1:
        raise SynthError("eval_fraction > 0 needs a corpus with at least two pages")
    eval_pages = set(order[:n_eval])
    pools = {split: [i for i, line in enumerate(corpus) if (line.page_id in eval_pages) == (split == "eval")]
             for split in SPLITS}
    return {split: [pool[i] for i in rng.permutation(len(pool))] for split, pool in pools.items()}


def _chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(n, start + size)


def resolve_config(cfg: SynthConfig | DictConfig) -> SynthConfig:
    """A SynthConfig with interpolations such as `${lineclip_asset:fonts}` resolved and types checked."""
    node = cfg if isinstance(cfg, DictConfig) else OmegaConf.structured(cfg)
    try:
        resolved = OmegaConf.to_object(node)
    except OmegaConfBaseException as err:
        raise SynthError(f"bad synth config: {str(err).splitlines()[0]}") from None
    assert isinstance(resolved, SynthConfig)
    return resolved


def generate(cfg: SynthConfig | DictConfig) -> SynthReport:
    """Render `cfg.n_lines` lines into `cfg.out_dir` and write the manifests; see the module docstring."""
    check_raqm()
    cfg = resolve_config(cfg)
    _check(cfg)
    corpus = load_corpus(cfg.corpus)
    fonts = find_fonts(cfg.font)
    out_dir = Path(cfg.out_dir)
    n_eval = round(cfg.n_lines * cfg.eval_fraction)
    counts = {"train": cfg.n_lines - n_eval, "eval": n_eval}
    manifests = {split: out_dir / split / "meta" / "lines.jsonl" for split in SPLITS if counts[split]}
    # Every split of an earlier run goes, not only those written now: a stale eval split would be read
    # as part of the new dataset.
    for split in SPLITS:
        old = out_dir / split / "meta" / "lines.jsonl"
        if old.exists() or (out_dir / split / "lines").exists():
            if not cfg.overwrite:
                raise SynthError(f"{out_dir / split} already holds a dataset; pass overwrite=true to replace it")
            shutil.rmtree(out_dir / split / "lines", ignore_errors=True)
            old.unlink(missing_ok=True)
    for manifest in manifests.values():
        (manifest.parent.parent / "lines").mkdir(parents=True, exist_ok=True)
        manifest.parent.mkdir(parents=True, exist_ok=True)

    job = _Job(cfg, corpus, fonts, out_dir, counts["train"], _split_pages(corpus, cfg.seed, cfg.eval_fraction))
    chunks = list(_chunks(cfg.n_lines, cfg.chunk_size))
    workers = min(cfg.workers or usable_cpus(), len(chunks))
    start = time.perf_counter()
    with ExitStack() as stack:
        handles = {split: stack.enter_context(manifest.open("w", encoding="utf-8"))
                   for split, manifest in manifests.items()}
        bar = stack.enter_context(Progress(cfg.n_lines, unit="line", desc="synth", enabled=cfg.progress))
        if workers == 1:
            _init_worker(job)
            results: Iterator[list[tuple[str, dict[str, Any]]]] = map(_render_chunk, chunks)
        else:
            # Leaving the block terminates the pool, so an error or Ctrl-C never leaves workers behind. Spawned,
            # not forked: a fork of a process that already runs threads (torch, W&B) can deadlock in the child.
            pool = stack.enter_context(get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(job,)))
            results = pool.imap(_render_chunk, chunks)  # ordered, so the manifests follow the index order
        for rows in results:
            for split, row in rows:
                handles[split].write(json.dumps(row, ensure_ascii=False) + "\n")
            bar.update(len(rows))
    seconds = time.perf_counter() - start
    return SynthReport(
        out_dir=str(out_dir), lines={s: c for s, c in counts.items() if c}, seconds=round(seconds, 3),
        lines_per_s=round(cfg.n_lines / max(seconds, 1e-9), 2), workers=workers,
        manifests={split: str(path) for split, path in manifests.items()},
    )


register_configs()  # the ${lineclip_asset:NAME} resolver used by the defaults
ConfigStore.instance().store(name="synth_schema", node=SynthConfig)


@hydra_command("synth")
def main(cfg: DictConfig) -> None:
    try:
        report = generate(cfg)
    except SynthError as err:
        # A one-line reason and a non-zero exit, not a traceback.
        log.error("%s", err)
        sys.exit(2)
    counts = ", ".join(f"{split} {count}" for split, count in report.lines.items())
    log.info("wrote %s lines (%s) to %s in %.1f s: %.1f lines/s with %d worker(s)", sum(report.lines.values()),
             counts, report.out_dir, report.seconds, report.lines_per_s, report.workers)
    log.info("report: %s", json.dumps(asdict(report)))


if __name__ == "__main__":
    main()
