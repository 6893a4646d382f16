"""Line image preprocessing: binarisation pipelines, bucketed geometry and the tensor transform.

Every line is turned into a tensor that depends on that line alone: it is resized to a fixed height, its
width capped, then padded on white up to a width bucket that is a multiple of the ViT patch. A sampler can
group lines of one bucket into a batch (``LineImageTransform.bucket_of`` needs only the header size), so no
batch-level padding is ever needed and an embedding never depends on its batch neighbours.

The work is done on uint8 numpy arrays with OpenCV; PIL is only the input/output type. Binarised pipelines
keep a single channel until normalisation, which is where the three channels are produced.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO

import cv2
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

PIPELINES: tuple[str, ...] = ("none", "pb", "bdrc")
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# Constants of the reference pipelines; artifacts trained with them are read by the Workbench, so they are
# fixed here rather than configurable.
PB_PAD = 8
PB_HEIGHT = 192
BDRC_BLOCK_SIZE = 51
BDRC_C = 13

# Augmentation ranges: deliberately mild, a line must stay readable and keep its bucket.
_AUG_CONTENT_SCALE = (0.9, 1.0)
_AUG_CONTRAST = (0.85, 1.15)
_AUG_BRIGHTNESS = (-20.0, 20.0)


# A line image is a few hundred thousand pixels; a file claiming far more is a decompression bomb or a page,
# and decoding it would cost gigabytes (data.max_image_pixels; PIL's own limit is 89M with a mere warning).
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
_EXIF_ORIENTATION = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


# What a broken image file raises in PIL: truncated data and bad headers (OSError, of which
# UnidentifiedImageError is a subclass), nonsense sizes/modes (ValueError), absurd dimensions. Anything else a
# plugin raises on hostile bytes (SyntaxError for a garbled PNG chunk, TypeError, struct.error ...) is turned into
# UndecodableImage (a ValueError) by `open_image`'s callers here, so that these four cover every bad file.
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    UnidentifiedImageError,
    ValueError,
    Image.DecompressionBombError,
)

# The raster formats a line image may be in; no other Pillow plugin is ever tried. Pillow would otherwise open
# EPS (running Ghostscript on the file's PostScript when `gs` is on PATH), and a dozen formats no scan comes in.
# Pillow's plugin names (a JPEG with a multi-picture extension opens through JPEG's and reads as MPO).
LINE_IMAGE_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "TIFF", "WEBP", "BMP", "GIF", "PPM", "JPEG2000")
# Modes the transform converts itself; a decoded image in any other (LAB, HSV ...) is converted to RGB at decode
# time, where a failure is a counted bad image rather than an error in the middle of a batch.
_TRANSFORM_MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "I",
                              "F"})


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class NotARegularFile(OSError):
    """A FIFO, device or socket where an image file was expected: refused before any byte is read."""


class TooManyPixels(ValueError):
    """An image whose header claims more pixels than the limit; refused before its pixels are decoded."""


class UndecodableImage(ValueError):
    """A line image that Pillow failed on with an error other than OSError/ValueError (a SyntaxError for a garbled
    PNG chunk, a TypeError ...): counted and skipped like any other corrupt image."""


def open_image(handle: BinaryIO) -> Image.Image:
    """`Image.open` restricted to LINE_IMAGE_FORMATS: the one place lineclip opens a line image (headers, pixels,
    thumbnails, uploads, shard members). Another format is UnidentifiedImageError, before any byte of it is
    interpreted by a plugin."""
    return Image.open(handle, formats=LINE_IMAGE_FORMATS)


@contextlib.contextmanager
def _decoding(name: str | os.PathLike) -> Iterator[None]:
    """Whatever Pillow raises on a bad file becomes one of DECODE_ERRORS (an UndecodableImage naming the file and
    the original error), so that every caller's `except DECODE_ERRORS` skips and counts it."""
    try:
        yield
    except DECODE_ERRORS:
        raise
    except Exception as exc:  # noqa: BLE001 - SyntaxError, TypeError, struct.error, IndexError, RecursionError ...
        raise UndecodableImage(f"{name}: {type(exc).__name__}: {' '.join(str(exc).split())}") from exc


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """Open a file for reading only if it is a regular file. O_NONBLOCK: opening a FIFO does not wait for a
    writer; the fstat then refuses it (and devices, sockets) before anything is read."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) \
                else "a directory" if stat.S_ISDIR(mode) else "not a regular file"
            raise NotARegularFile(errno.EINVAL, f"{kind}, not an image file", str(path))
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation (1-8) found in the file's header, without decoding pixels: JPEG/TIFF/WebP EXIF, and a
    PNG eXIf chunk placed before the image data. 1 when there is none or it is unreadable."""
    try:
        if image.format == "PNG":  # PngImageFile.getexif() would decode the whole image to find a late chunk
            raw = image.info.get("exif")
            if not raw:
                return 1
            exif = Image.Exif()
            exif.load(raw)
        else:
            exif = image.getexif()
        value = exif.get(_EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block is no reason to lose the line
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _check_pixels(width: int, height: int, max_pixels: int | None, path: str | os.PathLike) -> None:
    if max_pixels and width * height > max_pixels:
        raise TooManyPixels(f"{path}: {width}x{height} = {width * height} pixels > data.max_image_pixels={max_pixels}")


def image_size(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """(width, height) as the model will see the image (EXIF orientation applied), from the header only. Raises
    NotARegularFile, TooManyPixels or what PIL raises on a broken header."""
    with open_regular(path) as handle, _decoding(path), open_image(handle) as image:
        width, height = image.size
        _check_pixels(width, height, max_pixels, path)
        return (height, width) if exif_orientation(image) in (5, 6, 7, 8) else (width, height)


def bytes_per_sample(mode: str) -> int:
    """Bytes of one decoded sample in a Pillow mode: 2 for 16-bit grey (I;16*), 4 for 32-bit (I, F), else 1."""
    return 2 if mode.startswith("I;16") else 4 if mode in ("I", "F") else 1


def image_header(path: str | os.PathLike) -> tuple[int, int, str]:
    """(width, height, mode) of a line image file from its header, as stored (no EXIF turn); nothing decoded.
    Raises only DECODE_ERRORS (and FileNotFoundError, NotARegularFile: OSErrors)."""
    with open_regular(path) as handle, _decoding(path), open_image(handle) as image:
        return image.width, image.height, image.mode


def header_size(item: str | os.PathLike | Image.Image,
                max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[int, int] | BaseException:
    """`image_size` that never raises for a bad file: the (width, height) the model sees, or the exception that
    refuses the image (FileNotFoundError, NotARegularFile, TooManyPixels, a broken header). A PIL image is
    taken as given. Training (lineclip.batch) and inference (lineclip.encoder) both read headers here."""
    if isinstance(item, Image.Image):
        return item.size
    try:
        return image_size(item, max_pixels)  # the header only; pixels are decoded in the batch that needs them
    except DECODE_ERRORS as exc:
        return exc


def load_image(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """A line image file, decoded and turned by its EXIF orientation: what training, encoding and the search
    page's thumbnails all use, so all three see the same line. Modes are left to the transform."""
    with open_regular(path) as handle:
        return decode_image(handle, max_pixels, path)


def decode_image(handle: BinaryIO, max_pixels: int | None, name: str | os.PathLike) -> Image.Image:
    """`load_image` of an open binary file (a line image inside a tar shard, lineclip.shards); `name` for errors."""
    with _decoding(name), open_image(handle) as image:
        _check_pixels(*image.size, max_pixels, name)
        orientation = exif_orientation(image)
        image.load()  # inside the try of the caller: a truncated file opens fine and fails only here
        if image.mode not in _TRANSFORM_MODES and not image.mode.startswith("I;16"):
            image = image.convert("RGB")  # ValueError here for a mode Pillow cannot convert: a counted bad image
        return image.transpose(_TRANSPOSE[orientation]) if orientation in _TRANSPOSE else image


def to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit grey (I;16*, I) and float (F) images scaled to 8 bits over their real range; PIL's own
    convert("L") clips them at 255, which turns a 16-bit scan into two grey levels."""
    if not (image.mode.startswith("I") or image.mode == "F"):
        return image
    values = np.asarray(image).astype(np.float64)
    if image.mode.startswith("I;16"):
        scale = 257.0  # 65535 -> 255
    else:
        top = float(values.max()) if values.size else 0.0
        if image.mode == "F" and top <= 1.0:
            scale = 1.0 / 255.0
        elif top <= 255.0:
            scale = 1.0
        elif top <= 65535.0:
            scale = 257.0
        else:
            scale = top / 255.0
    return Image.fromarray(np.clip(np.rint(values / scale), 0, 255).astype(np.uint8))


def _round_scaled(n: int, num: int, den: int) -> int:
    """round(n * num / den), halves up, at least 1; integer arithmetic so that every caller that predicts a
    size (samplers, ``pipeline_size``) gets exactly the size the resize produces."""
    return max(1, (2 * n * num + den) // (2 * den))


def _check_pipeline(pipeline: str) -> None:
    if pipeline not in PIPELINES:
        raise ValueError(f"unknown preprocessing pipeline {pipeline!r}; expected one of {PIPELINES}")


def _flatten_alpha(image: Image.Image) -> Image.Image:
    image = to_8bit(image)
    # Transparent pixels often hold black RGB; scans with alpha must read as paper (white), not ink.
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image


def gray_array(image: Image.Image) -> np.ndarray:
    """8-bit grey pixels, transparency flattened onto white (what the binarising pipelines start from)."""
    image = _flatten_alpha(image)
    if image.mode != "L":
        image = image.convert("L")
    return np.asarray(image)


def rgb_array(image: Image.Image) -> np.ndarray:
    """8-bit RGB pixels, transparency flattened onto white."""
    image = _flatten_alpha(image)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image)


def _pb_size(width: int, height: int) -> tuple[int, int]:
    return _round_scaled(width + 2 * PB_PAD, PB_HEIGHT, height + 2 * PB_PAD), PB_HEIGHT


def _pipeline_array(image: Image.Image, pipeline: str) -> np.ndarray:
    """uint8 array after the pipeline: HxW for the binarising pipelines, HxWx3 for ``none``."""
    _check_pipeline(pipeline)
    if pipeline == "none":
        return rgb_array(image)
    gray = gray_array(image)
    if pipeline == "bdrc":
        return cv2.adaptiveThreshold(
            gray, 255, cv2.ADAPTIVE_THRESH_GAUSSIAN_C, cv2.THRESH_BINARY, BDRC_BLOCK_SIZE, BDRC_C
        )
    # pb: Otsu expects dark ink on light paper, so negatives (white on black) are flipped first.
    if 2 * np.count_nonzero(gray < 128) > gray.size:
        gray = 255 - gray
    padded = cv2.copyMakeBorder(gray, PB_PAD, PB_PAD, PB_PAD, PB_PAD, cv2.BORDER_CONSTANT, value=255)
    out_w, out_h = _pb_size(gray.shape[1], gray.shape[0])
    resized = cv2.resize(padded, (out_w, out_h), interpolation=cv2.INTER_CUBIC)
    _, binary = cv2.threshold(resized, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return binary


def _to_pil_rgb(array: np.ndarray) -> Image.Image:
    if array.ndim == 2:
        return Image.fromarray(array, mode="L").convert("RGB")
    return Image.fromarray(array, mode="RGB")


def apply_pipeline(image: Image.Image, pipeline: str) -> Image.Image:
    """Apply a preprocessing pipeline (``none``, ``pb`` or ``bdrc``) and return an RGB image.

    ``pb`` and ``bdrc`` return binary images (values 0 and 255 only); ``pb`` changes the size (see
    ``LineImageTransform.pipeline_size``), the others keep it.
    """
    return _to_pil_rgb(_pipeline_array(image, pipeline))


@dataclass(frozen=True)
class LineGeometry:
    """Target geometry of a line image: fixed height, capped width, width padded up to a bucket.

    ``target_height`` must be a multiple of ``patch_multiple``: otherwise the last rows fall outside the
    patch grid and the model never sees them (a defect of the reference's 64 px with patch 14).
    """

    target_height: int = 56
    max_width: int = 1024
    width_buckets: tuple[int, ...] = (256, 384, 512, 768, 1024)
    patch_multiple: int = 14

    def __post_init__(self) -> None:
        # Configs (Hydra/OmegaConf) hand over lists; a tuple keeps the dataclass hashable and immutable.
        object.__setattr__(self, "width_buckets", tuple(sorted(int(b) for b in self.width_buckets)))
        if self.patch_multiple < 1:
            raise ValueError(f"patch_multiple must be >= 1, got {self.patch_multiple}")
        if self.target_height < 1 or self.target_height % self.patch_multiple:
            raise ValueError(
                f"target_height must be a positive multiple of patch_multiple={self.patch_multiple}, "
                f"got {self.target_height}"
            )
        if self.max_width < 1:
            raise ValueError(f"max_width must be >= 1, got {self.max_width}")
        if any(b < 1 for b in self.width_buckets):
            raise ValueError(f"width buckets must be positive, got {self.width_buckets}")

    def bucket_width(self, content_width: int) -> int:
        """Smallest bucket (rounded up to the patch) that holds ``content_width``; wider content is rounded
        up to a multiple of the patch."""
        for bucket in self.width_buckets:
            rounded = round_up(bucket, self.patch_multiple)
            if rounded >= content_width:
                return rounded
        return round_up(max(1, content_width), self.patch_multiple)

    def content_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of the resized content: height ``target_height`` keeping aspect, unless that makes
        it wider than ``max_width``, in which case width ``max_width`` and a smaller height. Never crops."""
        if width < 1 or height < 1:
            raise ValueError(f"image size must be positive, got {width}x{height}")
        new_w = _round_scaled(width, self.target_height, height)
        if new_w <= self.max_width:
            return new_w, self.target_height
        return self.max_width, min(self.target_height, _round_scaled(height, self.max_width, width))

    def canvas_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of the padded canvas for content of an image of ``width`` x ``height``."""
        content_w, _ = self.content_size(width, height)
        return self.bucket_width(content_w), self.target_height


class LineImageTransform:
    """PIL line image -> normalised float32 tensor ``[3, target_height, bucket_width]``.

    With ``augment=False`` the output is a deterministic function of the image alone. With ``augment=True``
    the jitter is mild and the output shape is that of the un-augmented image, so bucketing stays valid.
    ``seed=None`` draws from the global ``random`` module, which PyTorch reseeds in each DataLoader worker.
    """

    def __init__(
        self,
        pipeline: str = "bdrc",
        geometry: LineGeometry | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        augment: bool = False,
        seed: int | None = None,
    ) -> None:
        _check_pipeline(pipeline)
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values each, got {tuple(mean)} and {tuple(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {tuple(std)}")
        self.pipeline = pipeline
        self.geometry = geometry if geometry is not None else LineGeometry()
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.augment = augment
        self.seed = seed
        self._rng: random.Random | None = random.Random(seed) if seed is not None else None
        # (x / 255 - mean) / std == x * scale + offset: one fused multiply-add per channel.
        std_arr = np.asarray(self.std, dtype=np.float64)
        self._scale = (1.0 / (255.0 * std_arr)).astype(np.float32)
        self._offset = (-np.asarray(self.mean, dtype=np.float64) / std_arr).astype(np.float32)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(pipeline={self.pipeline!r}, geometry={self.geometry}, mean={self.mean}, "
            f"std={self.std}, augment={self.augment}, seed={self.seed})"
        )

    def pipeline_size(self, width: int, height: int) -> tuple[int, int]:
        """Size of an image of ``width`` x ``height`` after ``apply_pipeline``, without decoding it."""
        if self.pipeline == "pb":
            return _pb_size(width, height)
        return width, height

    def bucket_of(self, width: int, height: int) -> int:
        """Canvas (tensor) width of an image of this original size."""
        return self.geometry.canvas_size(*self.pipeline_size(width, height))[0]

    def _uniform(self, low: float, high: float) -> float:
        return (self._rng or random).uniform(low, high)

    def _canvas_array(self, image: Image.Image) -> np.ndarray:
        array = _pipeline_array(image, self.pipeline)
        height, width = array.shape[:2]
        geometry = self.geometry
        canvas_w, canvas_h = geometry.canvas_size(width, height)
        content_w, content_h = geometry.content_size(width, height)
        if self.augment:
            # Shrinking only: the content still fits the bucket computed from the original size.
            factor = self._uniform(*_AUG_CONTENT_SCALE)
            content_w = max(1, round(content_w * factor))
            content_h = max(1, round(content_h * factor))
        # INTER_AREA averages when shrinking (no aliasing of thin strokes); cubic when enlarging.
        interpolation = cv2.INTER_AREA if content_h <= height else cv2.INTER_CUBIC
        if (content_w, content_h) != (width, height):
            array = cv2.resize(array, (content_w, content_h), interpolation=interpolation)
        canvas = np.full((canvas_h, canvas_w) + array.shape[2:], 255, dtype=np.uint8)
        top = (canvas_h - content_h) // 2
        canvas[top : top + content_h, :content_w] = array
        if self.augment:
            # Jitter the whole canvas so the padding keeps the paper's tone.
            contrast = self._uniform(*_AUG_CONTRAST)
            brightness = self._uniform(*_AUG_BRIGHTNESS)
            lut = np.clip((np.arange(256) - 127.5) * contrast + 127.5 + brightness, 0, 255)
            canvas = cv2.LUT(canvas, lut.round().astype(np.uint8))
        return canvas

    def to_canvas(self, image: Image.Image) -> Image.Image:
        """The padded RGB canvas that ``__call__`` normalises (useful to inspect what the model sees)."""
        return _to_pil_rgb(self._canvas_array(image))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        canvas = self._canvas_array(image)
        out = np.empty((3,) + canvas.shape[:2], dtype=np.float32)
        for c in range(3):
            channel = canvas if canvas.ndim == 2 else canvas[:, :, c]
            np.multiply(channel, self._scale[c], out=out[c], dtype=np.float32)
            out[c] += self._offset[c]
        return torch.from_numpy(out)
