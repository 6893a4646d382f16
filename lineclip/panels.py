"""What W&B shows beyond scalars: pure functions from embeddings, ranks and dataset rows to wandb objects.

- `retrieval_table`: a fixed set of val text queries (`table_queries`, seeded, the same in every validation and
  every run of a sweep) with their top-k retrieved line images, scores and hit marks, one row per query;
- `rank_histograms`: where the correct item ranks, both directions, over the whole val gallery;
- `input_images`: training inputs exactly as the towers receive them (pipeline, geometry and padding applied,
  the normalisation undone for display; the text decoded from the byte ids, truncation included);
- `model_artifact`: a bundle as a W&B model artifact.

lineclip.tracking decides when they are built (never with logger=none) and logs them through accelerate's W&B
tracker.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import wandb
from PIL import Image

from lineclip.batch import BYTE_OFFSET

# Thumbnails of retrieved lines: tall enough to read Tibetan stacks (real lines are 60-112 px high), and capped
# in width so that a 24:1 line stays a few tens of KB (every validation logs (1 + top_k) x queries of them).
THUMBNAIL_HEIGHT = 48
THUMBNAIL_MAX_WIDTH = 1152
HIT, MISS = "✓", "✗"


def table_queries(candidates: Sequence[int], n: int, seed: int) -> list[int]:
    """`n` of the `candidates` (val dataset indices), drawn with `seed` and returned ascending: a function of the
    val manifest and the seed alone, so every validation of a run and every run of a sweep shows the same rows."""
    candidates = np.asarray(candidates, dtype=np.int64)
    if n <= 0 or len(candidates) == 0:
        return []
    chosen = np.random.default_rng(seed).choice(candidates, size=min(n, len(candidates)), replace=False)
    return sorted(int(i) for i in chosen)


def top_matches(queries: torch.Tensor, gallery: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores and gallery rows of each query's `k` best items ([Q, k] each), best first (cosine for
    L2-normalised rows)."""
    scores = queries.float() @ gallery.float().T
    return torch.topk(scores, min(k, gallery.shape[0]), dim=1)


def line_thumbnail(path: str, height: int = THUMBNAIL_HEIGHT, max_width: int = THUMBNAIL_MAX_WIDTH) -> Image.Image:
    """A line image file as a person sees it (read as training reads it: EXIF orientation, high bit depths
    scaled, alpha on white), scaled to `height` (narrower if wider than `max_width`); grey ("L") when the file is
    grey, as binarised scans are (a third of the bytes for W&B to decode), else RGB. Decode errors propagate."""
    from lineclip.preprocess import DEFAULT_MAX_IMAGE_PIXELS, gray_array, load_image, rgb_array

    image = load_image(path, DEFAULT_MAX_IMAGE_PIXELS)
    grey = image.mode in ("1", "L", "LA", "F") or image.mode.startswith("I")
    image = Image.fromarray(gray_array(image) if grey else rgb_array(image))
    scale = min(height / image.height, max_width / image.width)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def retrieval_columns(top_k: int) -> list[str]:
    return ["query", "text", "line", "rank", "hits",
            *[f"{name}{j}" for j in range(1, top_k + 1) for name in ("top", "score", "hit")]]


def retrieval_table(
    query_rows: Sequence[int],
    image: torch.Tensor,
    text: torch.Tensor,
    ids: torch.Tensor,
    t2i_ranks: torch.Tensor,
    names: Sequence[str],
    texts: Sequence[str],
    thumbnail: Callable[[int], Any],
    top_k: int = 5,
) -> wandb.Table:
    """One row per text query (rows of the embedded val lines `image`/`text`, paired, `ids` equal for equal
    transcriptions): `query` (its name), `text`, `line` (its own line image, the answer), `rank` (of the best
    correct line, whole gallery), `hits` (correct lines among the top k), then per retrieved line j = 1..k
    `top{j}` (its image, captioned with score and name), `score{j}` (cosine) and `hit{j}` (its transcription
    equals the query's). `thumbnail(row)` gives a row's image for wandb (a path or an array)."""
    columns = retrieval_columns(top_k)
    table = wandb.Table(columns=columns)
    if len(query_rows) == 0:
        return table
    rows = torch.as_tensor(list(query_rows), dtype=torch.long)
    scores, found = top_matches(text[rows], image, top_k)
    for q, row in enumerate(rows.tolist()):
        hits = (ids[found[q]] == ids[row]).tolist()
        cells: list[Any] = [names[row], texts[row], wandb.Image(thumbnail(row), caption=names[row]),
                            int(t2i_ranks[row]), int(sum(hits))]
        for j, (col, score, hit) in enumerate(zip(found[q].tolist(), scores[q].tolist(), hits, strict=True)):
            caption = f"{j + 1}. {score:.3f} {HIT if hit else MISS} {names[col]}"
            cells += [wandb.Image(thumbnail(col), caption=caption), float(score), bool(hit)]
        cells += [None] * (len(columns) - len(cells))  # a gallery smaller than top_k
        table.add_data(*cells)
    return table


def rank_bins(n_gallery: int, max_bins: int = 64) -> np.ndarray:
    """Edges of equal-width bins over ranks 1..n_gallery, each bin a whole number of ranks (W&B draws only
    equal-width bins), at most `max_bins`."""
    width = max(1, -(-n_gallery // max_bins))
    return np.arange(1, n_gallery + width + 1, width, dtype=np.float64)


def rank_histograms(ranks: dict[str, torch.Tensor], n_gallery: int, prefix: str = "val/") -> dict[str, Any]:
    """Per direction (`i2t`, `t2i`) the histogram of the correct item's rank (`{prefix}t2i_rank`: ranks 1..N in
    equal bins) and of its log10 (`{prefix}t2i_log10_rank`: 0 is rank 1, 1 rank 10, 2 rank 100), which shows the
    head of the distribution that the linear bins lump together on a large gallery."""
    out: dict[str, Any] = {}
    for name, r in ranks.items():
        values = r.double().numpy()
        out[f"{prefix}{name}_rank"] = wandb.Histogram(np_histogram=np.histogram(values, bins=rank_bins(n_gallery)))
        top = max(np.log10(max(n_gallery, 1)), 1e-3)
        out[f"{prefix}{name}_log10_rank"] = wandb.Histogram(
            np_histogram=np.histogram(np.log10(values), bins=32, range=(0.0, top)))
    return out


def tower_texts(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[str]:
    """The texts the text tower reads, decoded back from ByT5 byte ids (lineclip.batch.byte_encode; padding
    and </s> dropped): after any truncation to text.max_length, which always cuts at a character boundary."""
    out = []
    for ids, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
        data = bytes(i - BYTE_OFFSET for i, m in zip(ids, mask, strict=True) if m and i >= BYTE_OFFSET)
        out.append(data.decode("utf-8", errors="replace"))
    return out


def tower_images(pixel_values: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """[B, 3, H, W] normalised pixels -> [B, H, W, 3] uint8: the normalisation undone, nothing else (the
    pipeline's binarisation, the resize and the white padding to the bucket width stay as the tower sees them)."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32)[None, :, None, None]
    std_t = torch.as_tensor(std, dtype=torch.float32)[None, :, None, None]
    pixels = (pixel_values.detach().float().cpu() * std_t + mean_t).clamp(0, 1)
    return (pixels * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def input_images(pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 mean: Sequence[float], std: Sequence[float], names: Sequence[str], n: int = 16) -> list[wandb.Image]:
    """The first `n` lines of a training batch as wandb images (W&B draws a list as a grid), each captioned with
    its name, canvas size and the text the text tower reads."""
    n = min(n, len(pixel_values))
    images = tower_images(pixel_values[:n], mean, std)
    texts = tower_texts(input_ids[:n], attention_mask[:n])
    return [wandb.Image(images[i], caption=f"{names[i]} ({images[i].shape[1]}x{images[i].shape[0]}): {texts[i]}")
            for i in range(n)]


def model_artifact(name: str, output_dir: Path, prefix: str, entries: Sequence[str], metadata: dict[str, Any],
                   policy: str = "mutable") -> wandb.Artifact:
    """A W&B model artifact of the bundle `output_dir/<prefix>*`: each entry under its name without the prefix,
    so a downloaded artifact is a run dir `lineclip.load_encoder` reads. `policy="immutable"` references the files
    in place (no staging copy; they must not change until uploaded), "mutable" copies them to W&B's staging dir.
    A missing entry is an error, not a smaller artifact."""
    artifact = wandb.Artifact(name, type="model", metadata=metadata)
    for entry in entries:
        path = output_dir / f"{prefix}{entry}"
        if path.is_dir():
            artifact.add_dir(str(path), name=entry, policy=policy)
        elif path.is_file():
            artifact.add_file(str(path), name=entry, policy=policy)
        else:
            raise FileNotFoundError(f"{path}: bundle entry missing, cannot log the model artifact")
    return artifact
