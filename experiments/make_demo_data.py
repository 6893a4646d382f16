"""Build the small demo dataset bundled in ``lineclip/assets/demo`` from an OpenPecha-style line dataset.

One-off script (kept for provenance and to rebuild the demo). It takes lines from the source's train and eval
splits separately, so the demo's eval pages stay disjoint from its train pages, spreads the chosen lines over
the source pages (round robin over pages, random order within a page), downscales every image to the target
height and writes it as a grayscale JPEG. The selection and the files are deterministic for a given seed.

    python experiments/make_demo_data.py --src /path/to/tibetan_lines_dev --out lineclip/assets/demo \
        --n-train 160 --n-eval 40 --quality 40 --overwrite
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
from collections import Counter, defaultdict
from pathlib import Path

from PIL import Image

SPLITS = ("train", "eval")


def read_rows(manifest: Path) -> list[dict]:
    with manifest.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def spread_over_pages(rows: list[dict], count: int, rng: random.Random) -> list[dict]:
    """``count`` rows taken round robin over pages, so that every page contributes before any gives a
    second line; the partial last round falls on randomly ordered pages. Returned in manifest order."""
    if count > len(rows):
        raise SystemExit(f"asked for {count} lines but the split has only {len(rows)}")
    by_page: dict[str, list[int]] = defaultdict(list)
    for index, row in enumerate(rows):
        by_page[str(row["page_id"])].append(index)
    pages = sorted(by_page)
    rng.shuffle(pages)
    for page in pages:
        rng.shuffle(by_page[page])
    chosen: list[int] = []
    depth = 0
    while len(chosen) < count:
        for page in pages:
            if depth < len(by_page[page]) and len(chosen) < count:
                chosen.append(by_page[page][depth])
        depth += 1
    return [rows[i] for i in sorted(chosen)]


def resolve_image(src: Path, split: str, line_path: str) -> Path:
    for candidate in (src / line_path, src / split / line_path):
        if candidate.is_file():
            return candidate
    raise SystemExit(f"image not found for {line_path!r} under {src}")


def shrink(image: Image.Image, height: int) -> Image.Image:
    """Grayscale, downscaled to ``height`` keeping aspect; smaller images are left as they are."""
    image = image.convert("L")
    if image.height <= height:
        return image
    width = max(1, (2 * image.width * height + image.height) // (2 * image.height))
    return image.resize((width, height), Image.Resampling.LANCZOS)


def build_split(src: Path, out: Path, split: str, count: int, args: argparse.Namespace) -> list[dict]:
    rows = read_rows(src / split / "meta" / "lines.jsonl")
    # One RNG per split keeps the train selection unchanged when only --n-eval changes.
    rng = random.Random(f"{args.seed}:{split}")
    chosen = spread_over_pages(rows, count, rng)
    lines_dir = out / split / "lines"
    meta_dir = out / split / "meta"
    lines_dir.mkdir(parents=True)
    meta_dir.mkdir(parents=True)
    out_rows = []
    for row in chosen:
        source = resolve_image(src, split, row["line_path"])
        with Image.open(source) as im:
            small = shrink(im, args.height)
        name = Path(row["line_path"]).name
        # Progressive + optimised Huffman tables: a few percent smaller at no loss.
        small.save(lines_dir / name, "JPEG", quality=args.quality, optimize=True, progressive=True)
        out_row = dict(row)
        out_row["line_path"] = f"{split}/lines/{name}"
        out_row["width"], out_row["height"] = small.size
        out_rows.append(out_row)
    with (meta_dir / "lines.jsonl").open("w", encoding="utf-8") as f:
        for out_row in out_rows:
            f.write(json.dumps(out_row, ensure_ascii=False) + "\n")
    return out_rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, required=True, help="OpenPecha-style dataset dir (train/, eval/)")
    parser.add_argument("--out", type=Path, required=True, help="output dataset dir (lineclip/assets/demo)")
    parser.add_argument("--n-train", type=int, default=160)
    parser.add_argument("--n-eval", type=int, default=40)
    parser.add_argument("--height", type=int, default=56, help="maximum stored image height in px")
    parser.add_argument("--quality", type=int, default=40, help="JPEG quality")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace <out>/train and <out>/eval")
    args = parser.parse_args(argv)

    for split in SPLITS:
        target = args.out / split
        if target.exists():
            if not args.overwrite:
                raise SystemExit(f"{target} exists; pass --overwrite to replace it")
            shutil.rmtree(target)

    built = {
        split: build_split(args.src, args.out, split, count, args)
        for split, count in zip(SPLITS, (args.n_train, args.n_eval), strict=True)
    }
    train_pages = {r["page_id"] for r in built["train"]}
    eval_pages = {r["page_id"] for r in built["eval"]}
    if train_pages & eval_pages:
        raise SystemExit(f"train and eval share pages: {sorted(train_pages & eval_pages)}")

    total = 0
    for split, rows in built.items():
        size = sum((args.out / r["line_path"]).stat().st_size for r in rows)
        total += size
        collections = dict(sorted(Counter(r["collection"] for r in rows).items()))
        pages = len({r["page_id"] for r in rows})
        print(f"{split}: {len(rows)} lines from {pages} pages {collections}, {size / 1e6:.2f} MB of images")
    print(f"total image bytes: {total / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
