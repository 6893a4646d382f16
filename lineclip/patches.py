"""How a line image becomes tokens: DINOv2's patch geometry and its learned position table.

A patch is square (an int, the DINOv2 default) or a (height, width) strip such as [32, 4]: on a 32 px line,
one full-height token per 4 px column, as line readers (CRNN, SVTR, HTR-VT) tokenise, and half the tokens of
8x8 patches. Widths are padded to the patch *width* (`preprocess.patch_multiple`), heights are the patch
height's multiple (`preprocess.target_height`), so the Workbench's integer `patch_multiple` still describes
a bundle. Pure arithmetic: no torch, no transformers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# The first transformers release whose DINOv2 position interpolation takes a (height, width) patch (5.17 and
# before divide by `config.patch_size` as one int and crash): what a strip tokenizer such as [32, 4] needs, in
# training and in whatever loads its bundle (the Workbench's AutoModel.from_pretrained). Checked on the wheels.
MIN_TRANSFORMERS_FOR_STRIPS = "5.18.0"


def patch_hw(patch_size: int | Sequence[int]) -> tuple[int, int]:
    """DINOv2's patch as (height, width): an int is a square patch, a pair such as [32, 4] a full-height strip
    of a 32 px line (one token per 4 px column, as line readers tokenise)."""
    if isinstance(patch_size, int):
        return patch_size, patch_size
    height, width = (int(v) for v in patch_size)
    return height, width


def position_grid(image_size: int | Sequence[int], patch_size: int | Sequence[int]) -> tuple[int, float]:
    """DINOv2's learned position table: (number of positions, side of the square grid transformers reshapes
    it to before resampling it to each image's token grid). A side that is not whole crashes transformers."""
    ih, iw = patch_hw(image_size)
    ph, pw = patch_hw(patch_size)
    positions = (ih // ph) * (iw // pw)
    return positions, math.sqrt(positions)


def position_table_problem(image_size: int | Sequence[int], patch_size: int | Sequence[int],
                           target_height: int, max_width: int) -> tuple[str, bool] | None:
    """What is wrong with a tower's position table for lines of `target_height` x up to `max_width` px, and
    whether it is fatal; None when the table can give every token of the widest line a position of its own.

    transformers reshapes the table to a square grid and resamples it bicubically to each image's token grid:
    a grid narrower than a line's token columns blurs neighbouring columns into nearly one position (a 4x4 table
    stretched over 32 columns: adjacent cosine 0.98), and a reader needs to know where a glyph is."""
    positions, side = position_grid(image_size, patch_size)
    ph, pw = patch_hw(patch_size)
    if side != int(side):
        return (f"the image tower's position table has {positions} positions (image_size {image_size}, patch "
                f"{patch_size}), not a square number: transformers cannot resample it; choose image_size so that "
                f"(height/patch height) x (width/patch width) is a square", True)
    columns, rows = max_width // pw, target_height // ph
    if side < max(columns, rows):
        return (f"the image tower's position table is a {int(side)}x{int(side)} grid (image_size {image_size}, "
                f"patch {patch_size}) but the widest line has {columns} token columns and {rows} rows: "
                f"neighbouring tokens get nearly the same position; set model.config.image_size so the grid side "
                f"is >= {max(columns, rows)}", False)
    return None


def check_patch_geometry(patch_size: int | Sequence[int], target_height: int, patch_multiple: int,
                         where: str, transformers_version: str | None = None) -> None:
    """A line of `target_height` px padded to `patch_multiple` px must tile into whole patches, and a
    non-square patch needs a transformers that can resample positions for it; raises ValueError with one
    line naming `where` otherwise."""
    ph, pw = patch_hw(patch_size)
    if ph != pw and transformers_version is not None and _release(transformers_version) < _release(
            MIN_TRANSFORMERS_FOR_STRIPS):
        raise ValueError(f"{where}={patch_size} (a non-square patch) needs transformers >= "
                         f"{MIN_TRANSFORMERS_FOR_STRIPS}, installed {transformers_version}")
    if pw != patch_multiple:
        raise ValueError(f"preprocess.patch_multiple={patch_multiple} differs from {where}={patch_size} "
                         f"(its width is {pw}): widths are padded to the patch width")
    if target_height % ph:
        raise ValueError(f"preprocess.target_height={target_height} is not a multiple of the height of "
                         f"{where}={patch_size} ({ph}): the bottom rows would never be seen")


def _release(version: str) -> tuple[int, ...]:
    """'5.18.0.dev0' -> (5, 18, 0): enough to order releases without a packaging dependency."""
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit()) if not piece.isdigit() else piece
        parts.append(int(digits or 0))
    return tuple(parts)
