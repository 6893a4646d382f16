"""Load a trained bundle and embed line images and transcriptions with it.

``LineEncoder.load(path)`` accepts
- a finished run dir (its final bundle, the files without a prefix);
- a checkpoint bundle by prefix: ``run/checkpoint_step_0000002_`` (the trailing ``_`` may be left out);
- the path of any file or folder of a bundle, e.g. ``run/checkpoint_step_0000002_training_config.json``.

Everything that decides what the model sees comes from the bundle itself: preprocessing pipeline, geometry
and ``text_max_length`` from its ``training_config.json``, mean/std from the backbone's
``preprocessor_config.json``. Images go through the eval ``LineImageTransform`` (no augmentation) and texts
through ``normalize_text`` + ``lineclip.batch.byte_encode``, exactly as in training.

``embed_batches`` is the one image-embedding path: validation and the training run's corpus export
(lineclip.validation) and ``LineEncoder`` (evaluate, index, search) all run it over a ``LineDataset``, so an
embedding made here equals the one made during validation or export by construction, not by a copy kept in
step.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, closing, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from lineclip.batch import BucketBatchSampler, LineCollator, LineDataset, byte_encode, count_truncated
from lineclip.bundle import (
    BACKBONE,
    CONFIG,
    BundleError,
    BundleRef,
    check_bundle,
    load_model,
    model_fingerprint,
    reading_head_beside,
    resolve_bundle,
)
from lineclip.data import make_loader
from lineclip.errors import LineclipError
from lineclip.files import first_line, usable_cpus
from lineclip.lines import LineRecord
from lineclip.manifest import normalize_text
from lineclip.preprocess import (
    DECODE_ERRORS,
    DEFAULT_MAX_IMAGE_PIXELS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    LineGeometry,
    LineImageTransform,
    load_image,
)
from lineclip.reading import greedy_decode
from lineclip.towers import DualEncoder

log = logging.getLogger(__name__)

ImageInput = str | os.PathLike | Image.Image


class ImageReadError(LineclipError, ValueError):
    """A line image that cannot be opened or decoded; the message is one line naming the file."""


class DeviceError(LineclipError, ValueError):
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
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise BundleError(f"cannot read image_mean/image_std from {path}: {first_line(exc)}") from None


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


@dataclass
class EmbeddedBatch:
    """One batch's embeddings, rows in the order of `indices` (dataset indices; for `LineEncoder`, input
    positions). `failed`: the lines of this batch that could not be used (their pixels failed to decode, or, in
    the encoder's first yield, their headers), never embedded."""

    indices: np.ndarray  # int64 [b]
    image: np.ndarray  # float32 [b, D], L2-normalised
    text: np.ndarray | None  # float32 [b, D] when asked for
    failed: list[int]
    readings: list[str] | None = None  # the reading head's greedy decoding of each line, when asked for


def line_batches(buckets: np.ndarray, batch_size: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """The lines to embed as single-bucket batches (never padded with repeats), dealt round-robin to `world`
    processes: this process's share. Bucket -1 (an unreadable header) is never embedded."""
    return list(BucketBatchSampler(buckets, batch_size, shuffle=False))[rank::world]


@torch.inference_mode()  # on a generator function torch enters the mode around each step, not while suspended
def embed_batches(
    model: DualEncoder, dataset: torch.utils.data.Dataset, batches: Sequence[list[int]], collate: LineCollator,
    num_workers: int, device: torch.device, with_text: bool = False,
    autocast: Callable[[], AbstractContextManager] = nullcontext, progress: str | None = None,
    with_reading: bool = False,
) -> Iterator[EmbeddedBatch]:
    """The one image-embedding path: validation, the training run's corpus export, and `LineEncoder` (evaluate,
    index, search) all embed line images here, so a line's embedding is the same function of its file in all of
    them. `dataset` yields what `LineDataset` yields (a path is read exactly as training reads it); one bucket a
    batch, so a line's tensor never depends on its batch mates. `model` is the unwrapped DualEncoder, put in
    eval mode for the duration (restored when the generator is closed). `progress`: a bar with this title and
    a rate (lines/s), shown when stderr is a terminal. `with_reading` (a model with a reading head): each line's
    greedy CTC decoding too, from the same forward pass (lineclip.reading)."""
    # More loader processes than cores or than batches only costs their start-up.
    workers = max(0, min(num_workers, usable_cpus(), len(batches)))
    loader = make_loader(dataset, batches, collate, workers)
    was_training = model.training
    model.eval()
    # disable=None: tqdm draws the bar only when stderr is a terminal, so logs written to files stay clean.
    bar = tqdm(total=sum(len(b) for b in batches), desc=progress, unit="line", disable=None if progress else True)
    try:
        for batch in loader:
            indices = batch["indices"].numpy().astype(np.int64, copy=False)
            image = text = readings = None
            if len(indices):
                with autocast():
                    pixels = batch["pixel_values"].to(device, non_blocking=True)
                    if with_reading and model.reading_head is not None:
                        image, logits, _ = model._encode_image(pixels, read=True)
                        readings = greedy_decode(logits)
                    else:
                        image = model.encode_image(pixels)
                    if with_text:
                        text = model.encode_text(batch["input_ids"].to(device), batch["attention_mask"].to(device))
            dim = model.image_head.output_dim
            bar.update(len(indices) + len(batch["corrupt_indices"]))
            yield EmbeddedBatch(
                indices,
                image.float().cpu().numpy() if image is not None else np.empty((0, dim), np.float32),
                (text.float().cpu().numpy() if text is not None else np.empty((0, dim), np.float32))
                if with_text else None,
                list(batch["corrupt_indices"]),
                (readings or []) if with_reading and model.reading_head is not None else None,
            )
    finally:
        bar.close()
        model.train(was_training)


class _DecodedLines(torch.utils.data.Dataset):
    """Images the caller already decoded (a search query's PIL image): the items `LineDataset` yields for a file,
    from the same transform, without a file to read."""

    def __init__(self, images: Sequence[Image.Image], transform: LineImageTransform) -> None:
        self.images, self.transform = images, transform
        self.buckets = np.array([transform.bucket_of(*image.size) for image in images], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"pixel_values": self.transform(self.images[index]), "text": "", "index": index}


def _why_unreadable(path: ImageInput, max_pixels: int | None, kind: str) -> str:
    """The reason a line image was refused, for an error message (one file: cheap to read again)."""
    try:
        load_image(path, max_pixels)
    except FileNotFoundError:
        return "no such file"
    except DECODE_ERRORS as exc:
        return first_line(exc)
    return kind.replace("_", " ")


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
        self._fingerprint: str | None = None
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
        if not ref.prefix:  # a run's final bundle: its reading head, when the run had one, lies beside it
            _attach_reading_head(model, ref)
        log.info("loaded %s (step %s, %s pipeline, height %d, text_max_length %d) on %s", ref.label,
                 config.get("global_step", "?"), transform.pipeline, geometry.target_height, text_max_length,
                 device)
        return cls(model, transform, text_max_length, config, ref, device)

    @property
    def dim(self) -> int:
        return int(self.model.image_head.output_dim)

    def fingerprint(self) -> str | None:
        """lineclip.bundle.model_fingerprint of the bundle this encoder was loaded from (hashed once: it reads every
        weight file)."""
        if self.bundle is None:
            return None
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.bundle, self.training_config)
        return self._fingerprint

    # ------------------------------------------------------------------------------------------- images

    def encode_images(
        self, images: Sequence[ImageInput], batch_size: int = 32, num_workers: int = 0, progress: bool = False
    ) -> np.ndarray:
        """[N, D] float32 L2-normalised embeddings, rows in input order. Raises ImageReadError (naming the file)
        if any image cannot be read."""
        out = np.zeros((len(images), self.dim), dtype=np.float32)
        with closing(self.image_batches(images, batch_size, num_workers, progress)) as batches:
            for batch in batches:
                if batch.failed:
                    index = batch.failed[0]
                    reason = _why_unreadable(images[index], self.max_image_pixels, "unreadable_image")
                    raise ImageReadError(f"cannot read line image {images[index]}: {reason}")
                out[batch.indices] = batch.image
        return out

    def encode_image_files(
        self, paths: Sequence[ImageInput], batch_size: int = 32, num_workers: int = 0, progress: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Like ``encode_images`` but skipping (and logging) unreadable files, as training does: returns the
        embeddings of the readable ones and their input indices (ascending)."""
        out, kept, _ = self._image_files(paths, batch_size, num_workers, progress, False)
        return out, kept

    @property
    def reads(self) -> bool:
        """Whether this model has a reading head (saved beside its final bundle by a run with the reading loss)."""
        return self.model.reading_head is not None

    def read_image_files(
        self, paths: Sequence[ImageInput], batch_size: int = 32, num_workers: int = 0, progress: bool = False
    ) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
        """``encode_image_files`` plus each kept line's greedy decoding by the reading head, from the same forward
        pass (None without a head: `reads`)."""
        return self._image_files(paths, batch_size, num_workers, progress, self.reads)

    def _image_files(self, paths: Sequence[ImageInput], batch_size: int, num_workers: int, progress: bool,
                     with_reading: bool) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
        out = np.zeros((len(paths), self.dim), dtype=np.float32)
        done = np.zeros(len(paths), dtype=bool)
        readings = [""] * len(paths)
        failed: list[int] = []
        for batch in self.image_batches(paths, batch_size, num_workers, progress, with_reading=with_reading):
            out[batch.indices] = batch.image
            done[batch.indices] = True
            failed += batch.failed
            for i, reading in zip(batch.indices.tolist(), batch.readings or [], strict=False):
                readings[i] = reading
        self.log_skipped(paths, failed)
        kept = np.flatnonzero(done)
        return (out if len(kept) == len(paths) else out[kept]), kept, \
            ([readings[i] for i in kept] if with_reading else None)

    def log_skipped(self, paths: Sequence[ImageInput], failed: Sequence[int]) -> None:
        """One warning for the line images left out of an embedding (`failed`: input positions), with the first
        one's reason."""
        if failed:
            first = min(failed)
            log.warning("skipped %d unreadable line images of %d (first: %s: %s)", len(failed), len(paths),
                        paths[first], _why_unreadable(paths[first], self.max_image_pixels, "unreadable_image"))

    def image_batches(
        self, items: Sequence[ImageInput], batch_size: int = 32, num_workers: int = 0, progress: bool = False,
        with_reading: bool = False,
    ) -> Iterator[EmbeddedBatch]:
        """The embeddings of `items` batch by batch as they are made (``EmbeddedBatch.indices``: input positions),
        through ``embed_batches``, the path validation and the training run's corpus export take: a path is read by
        ``LineDataset`` exactly as in training. The first batch lists the images whose headers cannot be used
        (``failed``), before any is decoded. A consumer that streams the rows to disk holds one batch at a time."""
        if isinstance(items, (str, os.PathLike, Image.Image)):
            raise TypeError("encode_images takes a sequence of paths or PIL images, not a single one")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        files = [i for i, item in enumerate(items) if not isinstance(item, Image.Image)]
        decoded = [i for i, item in enumerate(items) if isinstance(item, Image.Image)]
        collate = LineCollator(self.text_max_length)  # the texts are empty: only the images are embedded
        dim = self.dim
        if files:
            # Header reads (threads, for network file systems) and decoding as in training; the sample id is the
            # input position, the text is not needed.
            lines = LineDataset([LineRecord(str(i), os.fspath(items[i]), "") for i in files], self.transform,
                                max_image_pixels=self.max_image_pixels)
            position = np.asarray(files, dtype=np.int64)
            yield EmbeddedBatch(np.empty(0, np.int64), np.empty((0, dim), np.float32), None,
                                position[lines.unreadable_indices].tolist())
            for batch in embed_batches(self.model, lines, line_batches(lines.buckets, batch_size), collate,
                                       num_workers, self.device, progress="images" if progress else None,
                                       with_reading=with_reading):
                yield EmbeddedBatch(position[batch.indices], batch.image, None, position[batch.failed].tolist(),
                                    batch.readings)
        if decoded:  # already in memory: no loader processes
            images = _DecodedLines([items[i] for i in decoded], self.transform)
            position = np.asarray(decoded, dtype=np.int64)
            for batch in embed_batches(self.model, images, line_batches(images.buckets, batch_size), collate, 0,
                                       self.device, with_reading=with_reading):
                yield EmbeddedBatch(position[batch.indices], batch.image, None, position[batch.failed].tolist(),
                                    batch.readings)

    # -------------------------------------------------------------------------------------------- texts

    def encode_texts(
        self, texts: Sequence[str], batch_size: int = 64, progress: bool = False, warn_truncated: bool = True,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """[N, D] float32 L2-normalised embeddings, rows in input order. Texts are normalised as in training;
        one longer than ``text_max_length`` bytes (UTF-8 + </s>) is cut at a character boundary, with a warning.
        `out`: an [N, D] float32 array (e.g. a memmap of the corpus file) to write the rows into, so that a big
        corpus is never held in memory; returned."""
        if isinstance(texts, str):
            raise TypeError("encode_texts takes a sequence of strings, not a single string")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if out is None:
            out = np.zeros((len(texts), self.dim), dtype=np.float32)
        elif out.shape != (len(texts), self.dim):
            raise ValueError(f"out has shape {out.shape}, want {(len(texts), self.dim)}")
        normalized = [normalize_text(t) for t in texts]
        truncated = count_truncated(normalized, self.text_max_length)
        if truncated and warn_truncated:
            log.warning("%d of %d texts exceed text_max_length=%d bytes (UTF-8 + </s>) and are truncated, as in "
                        "training", truncated, len(normalized), self.text_max_length)
        if not normalized:
            return out
        # Identical texts are embedded once (and so score identically); longest first groups similar lengths
        # into a batch (less padding) and surfaces an out-of-memory batch at once.
        unique, inverse = np.unique(np.array(normalized, dtype=object), return_inverse=True)
        inverse = inverse.reshape(-1)
        rows_by_text = np.argsort(inverse, kind="stable")  # the rows carrying unique text u, u by u
        counts = np.bincount(inverse, minlength=len(unique))
        starts = np.cumsum(counts) - counts
        order = sorted(range(len(unique)), key=lambda i: -len(unique[i].encode("utf-8")))
        with torch.inference_mode(), tqdm(total=len(unique), desc="texts", unit="text",
                                          disable=None if progress else True) as bar:
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                ids, mask, _ = byte_encode([unique[i] for i in chunk], self.text_max_length)
                emb = self.model.encode_text(ids.to(self.device), mask.to(self.device)).float().cpu().numpy()
                rows = np.concatenate([rows_by_text[starts[u] : starts[u] + counts[u]] for u in chunk])
                out[rows] = np.repeat(emb, counts[chunk], axis=0)
                bar.update(len(chunk))
        return out


def _attach_reading_head(model: DualEncoder, ref: BundleRef) -> None:
    """Give `model` the reading head saved beside its bundle (lineclip.reading.save_reading_head), if there is one
    that was trained with this bundle; a head that is there but refused is one warning, not an error."""
    head, why = reading_head_beside(ref)
    if why:
        log.warning("reading head not used: %s", why)
    if head is not None:
        model.reading_head = head


def load_encoder(path: str | Path, device: str | torch.device | None = None) -> LineEncoder:
    """``LineEncoder.load``: a run dir, a checkpoint prefix (``run/checkpoint_step_0000002_``) or any bundle file."""
    return LineEncoder.load(path, device=device)
