"""Sample sheet: synthetic lines from `lineclip.synth` stacked next to real dev lines, to judge the look.

    python experiments/synth_sample_sheet.py [--real ../shared/data/tibetan_lines_dev] [--out PNG] [key=value ...]

A dev tool: it reads the real lines from the shared dev set (nothing in lineclip/ or tests/ does). The
rows are shuffled (seeded) so that one looks at each line without knowing its source first; the left
margin then says which is which (S = synthetic, R = real).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

from omegaconf import OmegaConf
from PIL import Image, ImageDraw

from lineclip.synth import SynthConfig, generate

ROOT = Path(__file__).resolve().parent.parent


def synthetic_lines(n: int, seed: int, overrides: list[str]) -> list[Image.Image]:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = OmegaConf.merge(OmegaConf.structured(SynthConfig), {"out_dir": tmp, "n_lines": n, "seed": seed,
                                                                  "eval_fraction": 0.0, "progress": False},
                              OmegaConf.from_dotlist(overrides))
        report = generate(cfg)
        rows = [json.loads(line) for line in Path(report.manifests["train"]).read_text("utf-8").splitlines()]
        return [Image.open(Path(tmp) / row["line_path"]).convert("RGB") for row in rows]


def real_lines(root: Path, n: int, seed: int) -> list[Image.Image]:
    rows = [json.loads(line) for line in (root / "train" / "meta" / "lines.jsonl").read_text("utf-8").splitlines()]
    picked = random.Random(seed).sample(rows, n)
    return [Image.open(root / row["line_path"]).convert("RGB") for row in picked]


def sheet(rows: list[tuple[str, Image.Image]], width: int, gap: int = 8, label_w: int = 28) -> Image.Image:
    """Each line at its own size scaled by one common factor (so relative sizes stay true)."""
    factor = width / max(image.width for _, image in rows)
    scaled = [(tag, image.resize((round(image.width * factor), round(image.height * factor)), Image.LANCZOS))
              for tag, image in rows]
    height = sum(image.height + gap for _, image in scaled) + gap
    canvas = Image.new("RGB", (label_w + width + gap, height), (90, 90, 90))
    draw = ImageDraw.Draw(canvas)
    y = gap
    for tag, image in scaled:
        draw.text((8, y + image.height // 2 - 6), tag, fill=(255, 255, 0) if tag == "S" else (0, 255, 255))
        canvas.paste(image, (label_w, y))
        y += image.height + gap
    return canvas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", type=Path, default=ROOT.parent / "shared" / "data" / "tibetan_lines_dev")
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "synth_samples.png")
    parser.add_argument("--n-synth", type=int, default=8)
    parser.add_argument("--n-real", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=int, default=1400, help="sheet width of the widest line, px")
    parser.add_argument("overrides", nargs="*", help="SynthConfig overrides, e.g. p_binarized=0.5")
    args = parser.parse_args()

    rows = [("S", image) for image in synthetic_lines(args.n_synth, args.seed, args.overrides)]
    rows += [("R", image) for image in real_lines(args.real, args.n_real, args.seed)]
    random.Random(args.seed).shuffle(rows)
    image = sheet(rows, args.width)
    # A 128-colour palette keeps the sheet small; the lines are nearly grey anyway.
    image.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(args.out, optimize=True)
    print(f"{args.out}: {image.width}x{image.height}, {args.out.stat().st_size // 1024} KB")


if __name__ == "__main__":
    main()
