"""Load a trained bundle and embed line images and transcriptions with it.

``LineEncoder.load(path)`` accepts
- a finished run dir (its final bundle, the files without a prefix);
- a checkpoint bundle by prefix: ``run/checkpoint_step_0000002_`` (the trailing ``_`` may be left out);
- the path of any file or folder of a bundle, e.g. ``run/checkpoint_step_0000002_training_config.json``.

Everything that decides what the model sees comes from the bundle itself: preprocessing pipeline, geometry
and ``text_max_length`` from its ``training_config.json``, mean/std from the backbone's
``preprocessor_config.json``. Images go through the eval ``LineImageTransform`` (no augmentation) and texts
through ``normalize_text`` + ``lineclip.batch.byte_encode``, exactly as in training, so an embedding made
here equals the one made during validation or export.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from lineclip.batch import BucketBatchSampler, byte_encode, count_truncated
from lineclip.bundle import (
    BACKBONE,
    CONFIG,
    BundleError,
    BundleRef,
    check_bundle,
    load_model,
    model_fingerprint,
    resolve_bundle,
)
from lineclip.files import first_line, usable_cpus
from lineclip.manifest import normalize_text
from lineclip.preprocess import (
    DECODE_ERRORS,
    DEFAULT_MAX_IMAGE_PIXELS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    LineGeometry,
    LineImageTransform,
    header_size,
    load_image,
)
from lineclip.towers import DualEncoder

log = logging.getLogger(__name__)

ImageInput = str | os.PathLike | Image.Image


class ImageReadError(ValueError):
    """A line image that cannot be opened or decoded; the message is one line naming the file."""


class DeviceError(ValueError):
    """A device that this machine does not have."""


def _max_image_pixels(config: dict[str, Any]) -> int:
    """The run's own pixel limit (its data.max_image_pixels; null there: none, 0 here), else lineclip's default."""
    resolved = config.get("config")
    data = resolved.get("data") if isinstance(resolved, dict) else None
    if not isinstance(data, dict) or "max_image_pixels" not in data:
        return DEFAULT_MAX_IMAGE_PIXELS
    limit = data["max_image_pixels"]
    if limit is None:
        return 0
    return limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else DEFAULT_MAX_IMAGE_PIXELS


def _text_max_length(config: dict[str, Any]) -> int:
    value = config.get("text_max_length")
    if value is None:  # bundles written before the key existed keep it in the resolved config only
        resolved = config.get("config")
        text = resolved.get("text") if isinstance(resolved, dict) else None
        value = text.get("max_length") if isinstance(text, dict) else None
    if not isinstance(value, int) or value < 1:
        raise BundleError(f"training_config.json has no usable text_max_length (got {value!r})")
    return value


def _mean_std(backbone_dir: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    path = backbone_dir / "preprocessor_config.json"
    if not path.exists():
        log.warning("%s is missing; normalising with ImageNet mean/std (DINOv2's own)", path)
        return IMAGENET_MEAN, IMAGENET_STD
    try:
        blob = json.loads(path.read_text(encoding="utf-8"))
        return tuple(float(v) for v in blob["image_mean"]), tuple(float(v) for v in blob["image_std"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"cannot read image_mean/image_std from {path}: {exc}") from None


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str | torch.device | None) -> torch.device:
    """The device to run on (default: cuda when available), or DeviceError before any weights are read."""
    try:
        resolved = torch.device(device or default_device())
    except RuntimeError as exc:
        raise DeviceError(f"device={device!r}: {first_line(exc)}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device={device} but CUDA is not available here (torch {torch.__version__})")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise DeviceError(f"device={device} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return resolved


def _header_size(item: ImageInput, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[int, int] | str:
    """(width, height) as the model sees it (EXIF orientation applied, as in training), or why the image cannot be
    used (no such file, not a regular file, more pixels than the limit, a broken header)."""
    size = header_size(item, max_pixels)
    if isinstance(size, FileNotFoundError):
        return "no such file"
    return first_line(size) if isinstance(size, BaseException) else size


class _Images(torch.utils.data.Dataset):
    """Paths or PIL images -> (tensor or None, index, error). Never raises on a bad file. A PIL image is used as
    given; a path is read as training reads it (lineclip.preprocess.load_image)."""

    def __init__(self, items: Sequence[ImageInput], transform: LineImageTransform,
                 max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> None:
        self.items, self.transform, self.max_pixels = items, transform, max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int, str]:
        item = self.items[index]
        if isinstance(item, Image.Image):
            return self.transform(item), index, ""
        try:
            image = load_image(item, self.max_pixels)  # a truncated file opens fine and fails only on load
        except DECODE_ERRORS as exc:
            return None, index, first_line(exc)
        return self.transform(image), index, ""


def _collate(items: list[tuple[torch.Tensor | None, int, str]]) -> dict[str, Any]:
    good = [item for item in items if item[0] is not None]
    return {
        "pixel_values": torch.stack([item[0] for item in good]) if good else None,
        "indices": [item[1] for item in good],
        "failed": [(item[1], item[2]) for item in items if item[0] is None],
    }


class LineEncoder:
    """A trained dual encoder with its own preprocessing: images and texts in, L2-normalised float32 out.

    Scores between the two are cosine similarities (``image_emb @ text_emb.T``); the training temperature is
    irrelevant to ranking and is not stored in a bundle.
    """

    def __init__(
        self,
        model: DualEncoder,
        transform: LineImageTransform,
        text_max_length: int,
        training_config: dict[str, Any],
        bundle: BundleRef | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        self.device = check_device(device)
        self.model = model.to(self.device).eval()
        self.transform = transform
        self.text_max_length = text_max_length
        self.training_config = training_config
        self.bundle = bundle
        self.max_image_pixels = _max_image_pixels(training_config)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None) -> LineEncoder:
        """Load a run dir's final bundle, or a checkpoint bundle by prefix or by any of its files."""
        device = check_device(device)
        ref = resolve_bundle(path)
        config = check_bundle(ref)
        mean, std = _mean_std(ref.path(BACKBONE))
        try:
            geometry = LineGeometry(int(config["target_height"]), int(config["max_width"]),
                                    tuple(config["width_buckets"]), int(config["patch_multiple"]))
            transform = LineImageTransform(str(config["image_preprocess_pipeline"]), geometry, mean, std)
        except (TypeError, ValueError) as exc:
            raise BundleError(f"{ref.path(CONFIG)}: {first_line(exc)}") from None
        text_max_length = _text_max_length(config)
        model = load_model(ref, geometry.patch_multiple)
        log.info("loaded %s (step %s, %s pipeline, height %d, text_max_length %d) on %s", ref.label,
                 config.get("global_step", "?"), transform.pipeline, geometry.target_height, text_max_length,
                 device)
        return cls(model, transform, text_max_length, config, ref, device)

    @property
    def dim(self) -> int:
        return int(self.model.image_head.output_dim)

    def fingerprint(self) -> str | None:
        return model_fingerprint(self.bundle) if self.bundle is not None else None

    # ------------------------------------------------------------------------------------------- images

    def encode_images(
        self, images: Sequence[ImageInput], batch_size: int = 32, num_workers: int = 0, progress: bool = False
    ) -> np.ndarray:
        """[N, D] float32 L2-normalised embeddings, rows in input order. Raises ImageReadError (naming the file)
        if any image cannot be read."""
        embeddings, kept, failed = self._encode_images(images, batch_size, num_workers, progress, stop_early=True)
        if failed:
            index, reason = failed[0]
            raise ImageReadError(f"cannot read line image {images[index]}: {reason}")
        return embeddings

    def encode_image_files(
        self, paths: Sequence[ImageInput], batch_size: int = 32, num_workers: int = 0, progress: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Like ``encode_images`` but skipping (and logging) unreadable files, as training does: returns the
        embeddings of the readable ones and their input indices (ascending)."""
        embeddings, kept, failed = self._encode_images(paths, batch_size, num_workers, progress, stop_early=False)
        if failed:
            index, reason = failed[0]
            log.warning("skipped %d unreadable line images of %d (first: %s: %s)", len(failed), len(paths),
                        paths[index], reason)
        return embeddings, kept

    def _encode_images(
        self, items: Sequence[ImageInput], batch_size: int, num_workers: int, progress: bool, stop_early: bool
    ) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]:
        if isinstance(items, (str, os.PathLike, Image.Image)):
            raise TypeError("encode_images takes a sequence of paths or PIL images, not a single one")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n = len(items)
        # Header reads are I/O bound (slow on network file systems); threads overlap them.
        if n > 256:
            with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
                sizes = list(pool.map(lambda item: _header_size(item, self.max_image_pixels), items))
        else:
            sizes = [_header_size(item, self.max_image_pixels) for item in items]
        failed = [(i, size) for i, size in enumerate(sizes) if isinstance(size, str)]
        if failed and stop_early:
            return np.empty((0, self.dim), np.float32), np.empty(0, np.int64), failed
        buckets = np.array([-1 if isinstance(s, str) else self.transform.bucket_of(*s) for s in sizes], dtype=np.int64)
        # One bucket per batch: no padding beyond a line's own bucket, so its embedding ignores its batch mates.
        sampler = BucketBatchSampler(buckets, batch_size, shuffle=False)
        # More worker processes than cores or than batches only costs their start-up.
        workers = max(0, min(num_workers, usable_cpus(), len(sampler)))
        loader = torch.utils.data.DataLoader(_Images(items, self.transform, self.max_image_pixels),
                                             batch_sampler=sampler,
                                             collate_fn=_collate, num_workers=workers)
        out = np.zeros((n, self.dim), dtype=np.float32)
        done = np.zeros(n, dtype=bool)
        with torch.inference_mode(), tqdm(total=n - len(failed), desc="images", unit="line",
                                          disable=not progress) as bar:
            for batch in loader:
                failed.extend(batch["failed"])
                if batch["failed"] and stop_early:
                    break
                if batch["pixel_values"] is not None:
                    emb = self.model.encode_image(batch["pixel_values"].to(self.device, non_blocking=True))
                    out[batch["indices"]] = emb.float().cpu().numpy()
                    done[batch["indices"]] = True
                bar.update(len(batch["indices"]) + len(batch["failed"]))
        failed.sort()
        kept = np.flatnonzero(done)
        return (out if len(kept) == n else out[kept]), kept, failed

    # -------------------------------------------------------------------------------------------- texts

    def encode_texts(
        self, texts: Sequence[str], batch_size: int = 64, progress: bool = False, warn_truncated: bool = True
    ) -> np.ndarray:
        """[N, D] float32 L2-normalised embeddings, rows in input order. Texts are normalised as in training;
        one longer than ``text_max_length`` bytes (UTF-8 + </s>) is cut at a character boundary, with a warning."""
        if isinstance(texts, str):
            raise TypeError("encode_texts takes a sequence of strings, not a single string")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        normalized = [normalize_text(t) for t in texts]
        truncated = count_truncated(normalized, self.text_max_length)
        if truncated and warn_truncated:
            log.warning("%d of %d texts exceed text_max_length=%d bytes (UTF-8 + </s>) and are truncated, as in "
                        "training", truncated, len(normalized), self.text_max_length)
        # Identical texts are embedded once (and so score identically); longest first groups similar lengths
        # into a batch (less padding) and surfaces an out-of-memory batch at once.
        unique, inverse = np.unique(np.array(normalized, dtype=object), return_inverse=True)
        order = sorted(range(len(unique)), key=lambda i: -len(unique[i].encode("utf-8")))
        out = np.zeros((len(unique), self.dim), dtype=np.float32)
        with torch.inference_mode(), tqdm(total=len(unique), desc="texts", unit="text",
                                          disable=not progress) as bar:
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                ids, mask, _ = byte_encode([unique[i] for i in chunk], self.text_max_length)
                emb = self.model.encode_text(ids.to(self.device), mask.to(self.device))
                out[chunk] = emb.float().cpu().numpy()
                bar.update(len(chunk))
        return out[inverse.reshape(-1)] if len(normalized) else np.empty((0, self.dim), np.float32)


def load_encoder(path: str | Path, device: str | torch.device | None = None) -> LineEncoder:
    """``LineEncoder.load``: a run dir, a checkpoint prefix (``run/checkpoint_step_0000002_``) or any bundle file."""
    return LineEncoder.load(path, device=device)
