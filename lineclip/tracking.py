"""Experiment tracking: W&B through accelerate's tracker API, offline without credentials, resumable; the
panels beyond scalars (`RunPanels`: retrieval table, rank histograms, input grid, model artifacts, built by
lineclip.panels) and the loop's throughput (`Throughput`: samples/s and the time spent waiting for data)."""

from __future__ import annotations

import json
import logging
import netrc
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from accelerate import Accelerator
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

if TYPE_CHECKING:
    from lineclip.data import TrainData
    from lineclip.validation import EmbeddedLines

log = logging.getLogger(__name__)
RUN_ID_FILE = "wandb_run_id"
DATA_DIR_ENV = "WANDB_DATA_DIR"
# The WANDB_DATA_DIR that start_tracking set for an offline run (None: it set none; a user's own is never touched).
_data_dir_set: str | None = None


def wandb_mode(cfg: DictConfig) -> str:
    """online with credentials; offline (one message) without; an explicit setting always wins."""
    if cfg.logger.mode or os.environ.get("WANDB_MODE"):
        return cfg.logger.mode or os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        rc = netrc.netrc(os.environ.get("NETRC"))
        if any("wandb" in host for host in rc.hosts):
            return "online"
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        pass
    # INFO, not a warning: offline is the documented default without credentials (the demo's first run), and
    # nothing is lost; it is still said once, as W&B's own lines that follow say too.
    log.info("W&B: no credentials (WANDB_API_KEY or ~/.netrc); logging offline to the run dir "
             "(`wandb sync` uploads it later; logger=none turns logging off)")
    return "offline"


def start_tracking(accelerator: Accelerator, cfg: DictConfig, output_dir: Path, resuming: bool) -> None:
    """One W&B run per lineclip run, files under the run dir. Its id is kept in `<run dir>/wandb_run_id`, so a
    resumed run continues the same W&B run instead of starting a new one."""
    if cfg.logger.name != "wandb":
        return
    id_file = output_dir / RUN_ID_FILE
    if resuming and id_file.is_file():
        run_id = id_file.read_text().strip()
    else:
        run_id = uuid.uuid4().hex[:12]
        if accelerator.is_main_process:
            id_file.write_text(run_id)
    group = cfg.logger.group
    try:
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get()
        run_name = f"{Path(hydra_cfg.runtime.output_dir).parent.name}/{Path(hydra_cfg.runtime.output_dir).name}"
        if hydra_cfg.mode.name == "MULTIRUN":
            if group is None:
                group = Path(hydra_cfg.sweep.dir).name  # one W&B group per sweep
            run_name = sweep_run_name(run_name, cfg)
    except (ValueError, MissingMandatoryValue):  # not under @hydra.main (tests, the API: a composed config's hydra
        run_name = output_dir.name               # node, when there is one, has no runtime.output_dir)
    mode = wandb_mode(cfg)
    if mode == "offline" and accelerator.is_main_process:
        stage_in_run_dir(output_dir)
    init_kwargs = {"dir": str(output_dir), "group": group, "name": run_name, "mode": mode,
                   "tags": list(cfg.logger.tags), "entity": cfg.logger.entity, "reinit": "finish_previous",
                   "id": run_id, "resume": "allow"}
    accelerator.init_trackers(cfg.logger.project, config=OmegaConf.to_container(cfg, resolve=True),
                              init_kwargs={"wandb": init_kwargs})


def sweep_run_name(job: str, cfg: DictConfig) -> str:
    """A sweep job's W&B name: its `<sweep>/<job number>` and the two values most sweeps vary, so that runs side
    by side in W&B's run list and legends say what they are: `10-21-42/3 lr=5e-05 batch=32`."""
    return f"{job} lr={cfg.optim.lr:g} batch={cfg.data.batch_size}"


def stage_in_run_dir(output_dir: Path) -> None:
    """Offline, W&B stages what `wandb sync` uploads later (the table images, mutable artifact files) in its data
    dir, by default in the user's home: point it at `<run dir>/wandb/data`, so that the run dir holds all of it.
    A WANDB_DATA_DIR the user set is left alone."""
    global _data_dir_set
    current = os.environ.get(DATA_DIR_ENV)
    if current and current != _data_dir_set:
        return
    _data_dir_set = os.environ[DATA_DIR_ENV] = str(Path(output_dir).absolute() / "wandb" / "data")


def finish_tracking(accelerator: Accelerator) -> None:
    """Finish the trackers (not accelerator.end_training(): that also tears down the process group, which the
    caller, a test or a sweep, may still need) and undo stage_in_run_dir."""
    global _data_dir_set
    for tracker in accelerator.trackers:
        tracker.finish()
    if _data_dir_set is not None and os.environ.get(DATA_DIR_ENV) == _data_dir_set:
        del os.environ[DATA_DIR_ENV]
    _data_dir_set = None


METRICS_FILE = "metrics.jsonl"


def start_metrics_file(output_dir: Path, through_step: int) -> None:
    """Keep the rows of metrics.jsonl up to `through_step` (the step a resumed run continues from; 0 for a new
    run): a run killed after its last checkpoint had logged steps that the resumed run logs again."""
    path = output_dir / METRICS_FILE
    if not path.exists():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= through_step]
    path.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")


def log_metrics(accelerator: Accelerator, output_dir: Path, metrics: dict[str, float], step: int) -> None:
    """To the trackers (W&B) and, on the main process, one JSON line in `<run dir>/metrics.jsonl`: the learning
    curves stay readable with logger=none or without W&B (a resumed run appends)."""
    accelerator.log(metrics, step=step)
    if accelerator.is_main_process:
        with open(output_dir / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")


class Throughput:
    """Per logging window: samples per second and how long the loop waited for the data loader
    (`train/data_wait_s`, seconds per optimizer step; `train/data_wait_fraction`, of the window's wall time).
    A fraction near 1 is a data-bound run: more `data.num_workers`, or faster storage."""

    def __init__(self, step: int) -> None:
        self.start, self.step = time.perf_counter(), step
        self.samples, self.wait = 0, 0.0

    def batches(self, loader: Iterable[Any]) -> Iterator[Any]:
        """`loader`'s batches, timing each wait for the next one."""
        iterator = iter(loader)
        while True:
            start = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self.wait += time.perf_counter() - start
            yield batch

    def metrics(self, step: int) -> dict[str, float]:
        """The window since the last call (or the start) as train/ metrics; starts the next window."""
        now = time.perf_counter()
        seconds, steps = max(now - self.start, 1e-9), max(step - self.step, 1)
        out = {"train/samples_per_s": self.samples / seconds, "train/data_wait_s": self.wait / steps,
               "train/data_wait_fraction": min(1.0, self.wait / seconds)}
        self.start, self.step, self.samples, self.wait = now, step, 0, 0.0
        return out


class _ByRow:
    """An attribute of the records behind embedded rows, looked up only for the rows a table shows."""

    def __init__(self, records: Any, indices: np.ndarray, attribute: str) -> None:
        self.records, self.indices, self.attribute = records, indices, attribute

    def __getitem__(self, row: int) -> str:
        return getattr(self.records[int(self.indices[row])], self.attribute)

    def __len__(self) -> int:
        return len(self.indices)


class RunPanels:
    """What the trainer shows in W&B beyond scalars (lineclip.panels), logged through accelerate's W&B tracker
    on the main process. With logger=none, or on another process, nothing is built and every hook returns at
    once (`validation` returns None: validate gets no callback).

    Hooks: `log_inputs(batch, step)` (once, the first batch of a fresh run), `validation(step)` (the
    callback validate calls with the embedded val lines and their ranks), `log_bundle(prefix, step)`
    (logger.log_checkpoints / logger.log_model), `close()`."""

    def __init__(self, accelerator: Accelerator, cfg: DictConfig, output_dir: Path, data: TrainData,
                 resuming: bool) -> None:
        self.enabled = cfg.logger.name == "wandb" and accelerator.is_main_process
        if not self.enabled:
            return
        from lineclip import panels  # imports wandb: only when logging to it

        self.panels, self.cfg, self.output_dir, self.data = panels, cfg, output_dir, data
        self.tracker = accelerator.get_tracker("wandb")
        if getattr(self.tracker.tracker, "disabled", False):  # logger.mode=disabled: W&B drops all of it
            self.enabled = False
            return
        self.inputs_logged = resuming or cfg.logger.input_grid_lines == 0  # once per W&B run
        readable = [i for i in range(len(data.val_records))
                    if data.val_set is not None and i not in data.val_set.image_problems]
        self.queries = np.asarray(panels.table_queries(readable, cfg.logger.val_table_queries,
                                                       cfg.logger.val_table_seed), dtype=np.int64)
        self.thumbnail_dir: tempfile.TemporaryDirectory | None = None  # removed by close(), or at exit
        self.thumbnails: dict[int, str] = {}

    def log_inputs(self, batch: dict[str, Any], step: int) -> None:
        """The training inputs as the towers receive them (train/inputs), from the first batch of a fresh run."""
        if not self.enabled or self.inputs_logged:
            return
        self.inputs_logged = True
        transform = self.data.train_set.transform
        names = [self.data.train_records[i].sample_id for i in batch["indices"].tolist()]
        images = self.panels.input_images(batch["pixel_values"], batch["input_ids"], batch["attention_mask"],
                                          transform.mean, transform.std, names, self.cfg.logger.input_grid_lines)
        self.tracker.log({"train/inputs": images}, step=step)

    def validation(self, step: int) -> Callable[[EmbeddedLines, dict[str, torch.Tensor]], None] | None:
        """validate's `on_ranked` callback for the validation at `step`, or None when there is nothing to show."""
        if not self.enabled or not (len(self.queries) or self.cfg.logger.rank_histograms):
            return None
        return lambda embedded, ranks: self._log_validation(embedded, ranks, step)

    def _log_validation(self, embedded: EmbeddedLines, ranks: dict[str, torch.Tensor], step: int) -> None:
        values: dict[str, Any] = {}
        if self.cfg.logger.rank_histograms:
            values.update(self.panels.rank_histograms(ranks, len(embedded.indices)))
        if len(self.queries):
            indices = embedded.indices.numpy()
            rows = np.searchsorted(indices, self.queries)
            present = (rows < len(indices)) & (indices[np.minimum(rows, len(indices) - 1)] == self.queries)
            if not present.all():
                log.warning("W&B table: %d of its %d val queries were not embedded (corrupt images): rows left out",
                            int((~present).sum()), len(self.queries))
            records = self.data.val_records
            values["val/retrieval"] = self.panels.retrieval_table(
                rows[present].tolist(), embedded.image, embedded.text, self.data.val_ids[embedded.indices],
                ranks["t2i"], _ByRow(records, indices, "sample_id"), _ByRow(records, indices, "text"),
                lambda row: self._thumbnail(int(indices[row])), self.cfg.logger.val_table_top_k)
        self.tracker.log(values, step=step)

    def _thumbnail(self, index: int) -> Any:
        """A val line's thumbnail as a JPEG file, made once per run (later validations only copy it)."""
        if index not in self.thumbnails:
            from lineclip.preprocess import DECODE_ERRORS

            if self.thumbnail_dir is None:
                self.thumbnail_dir = tempfile.TemporaryDirectory(prefix="lineclip_thumbnails_")
            record = self.data.val_records[index]
            path = Path(self.thumbnail_dir.name) / f"{index}.jpg"
            try:
                # JPEG: W&B decodes every image it logs (for its size), a JPEG ~3x faster than a PNG of a line
                self.panels.line_thumbnail(record.image_path).save(path, quality=85)
            except (*DECODE_ERRORS, OSError) as exc:  # read a moment ago; a file changed since shows as grey
                from PIL import Image

                log.warning("W&B table: thumbnail of %s failed (%s): shown grey", record.image_path, exc)
                Image.new("RGB", (self.panels.THUMBNAIL_HEIGHT,) * 2, (128, 128, 128)).save(path, quality=85)
            self.thumbnails[index] = str(path)
        return self.thumbnails[index]

    def log_bundle(self, prefix: str, step: int) -> None:
        """The bundle `<run dir>/<prefix>*` as a W&B model artifact `model-<run id>` with its training_config.json
        as metadata: the final one (prefix "") with logger.log_model, checkpoints with logger.log_checkpoints.
        The final bundle is referenced in place (its files never change); a checkpoint is copied to W&B's
        staging dir, since trainer.keep_last_checkpoints may delete it before the upload."""
        final = prefix == ""
        if not self.enabled or not (self.cfg.logger.log_model if final else self.cfg.logger.log_checkpoints):
            return
        from lineclip import artifacts, bundle

        entries = list(bundle.BUNDLE_ENTRIES)
        if final:
            entries += [e for e in (artifacts.EMBEDDINGS, artifacts.EMBEDDINGS_META, artifacts.DATA_REPORT)
                        if (self.output_dir / e).is_file()]
        metadata = json.loads((self.output_dir / f"{prefix}{bundle.CONFIG}").read_text(encoding="utf-8"))
        run = self.tracker.tracker
        artifact = self.panels.model_artifact(f"model-{run.id}", self.output_dir, prefix, entries, metadata,
                                              policy="immutable" if final else "mutable")
        run.log_artifact(artifact, aliases=[f"step-{step}", *(["final"] if final else [])])

    def close(self) -> None:
        if self.enabled and self.thumbnail_dir is not None:
            self.thumbnail_dir.cleanup()
