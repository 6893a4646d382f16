"""Resumable checkpoints: the spec's bundle plus the full training state, under one prefix.

`checkpoint_step_0002400_training_state/` holds, in formats that load without unpickling anything:
- `model.safetensors` (the unwrapped model's weights),
- `optimizer.pt` (AdamW's state dict: tensors and numbers only, loaded with `torch.load(weights_only=True)`),
- `scheduler.json`, `scaler.json` (fp16 only) and `trainer_state.json` (global step, data position, counters),
- `rng_state_<rank>.pt` per process (Python, NumPy, torch and CUDA generator states as integer tensors).
Nothing else in the dir is ever opened; a file that does not load through these paths stops the resume with
one line naming it (a refused RNG state only with `trainer.resume_strict=true`, the default). It is written
into the bundle's staging dir before the other entries, and the bundle's `training_config.json` is renamed
into place last, so `latest` only ever sees complete checkpoints.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import stat
import struct
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from omegaconf import OmegaConf

from lineclip import artifacts
from lineclip.bundle import (
    BUNDLE_ENTRIES,
    CONFIG,
    TRAINING_STATE,
    checkpoint_prefix,
    checkpoint_step,
    save_bundle,
    staging_dir,
    workbench_keys,
)
from lineclip.errors import LineclipError
from lineclip.files import as_write_error, first_line, remove_staging
from lineclip.tracking import METRICS_FILE, RUN_ID_FILE

if TYPE_CHECKING:
    from lineclip.validation import CorpusExport

log = logging.getLogger(__name__)

TRAINER_STATE_FILE = "trainer_state.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.json"
SCALER_FILE = "scaler.json"


def rng_file(rank: int) -> str:
    return f"rng_state_{rank}.pt"


class CheckpointError(LineclipError, ValueError):
    """A training state that cannot be loaded safely; the message is one line naming the file."""


@contextlib.contextmanager
def all_or_none(accelerator: Any, what: str) -> Iterator[None]:
    """A block that may fail on one process and not the others (the main process writes the bundle, each process
    its RNG state), ended by a barrier that carries the outcome: the process whose block raised re-raises its
    error and every other process raises a one-line CheckpointError, instead of waiting forever (or until the
    NCCL timeout) at a barrier that the failed process never reaches."""
    failure: Exception | None = None
    try:
        yield
    except Exception as exc:
        failure = exc
    n_failed = int(failure is not None)
    if accelerator.num_processes > 1:
        n_failed = int(accelerator.reduce(torch.tensor(n_failed, device=accelerator.device), "sum"))
    if failure is not None:
        raise failure
    if n_failed:
        raise CheckpointError(f"{what} failed on {n_failed} other process(es): stopping here too (the error is "
                              "in that process's log)")


@dataclass
class TrainerState:
    """Where the loop stands, beyond what accelerate saves: enough to replay the data order exactly."""

    step: int = 0
    epoch: int = 0
    batches_done_in_epoch: int = 0  # per-process batches of `epoch` already consumed
    bad_steps: int = 0  # non-finite losses skipped, in all
    corrupt_indices: list[int] = field(default_factory=list)  # train lines whose pixels failed to decode
    val_metrics: dict[str, float] = field(default_factory=dict)
    val_history: list[dict[str, float]] = field(default_factory=list)  # the learning curve: step + metrics
    checkpoints: list[int] = field(default_factory=list)
    wandb_run_id: str | None = None

    def save(self, directory: Path) -> None:
        (directory / TRAINER_STATE_FILE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, directory: Path, limits: ResumeLimits | None = None) -> TrainerState:
        """The state in `directory`, every field checked (types, then ranges against the checkpoint it belongs to
        and, with `limits`, this run's data) before any of it is used."""
        path = directory / TRAINER_STATE_FILE
        blob = load_json(path)
        known = {f.name for f in fields(cls)}
        try:
            if set(blob) - known:
                raise TypeError(f"unknown key(s) {', '.join(sorted(set(blob) - known))}")
            if not all(_is_int(blob.get(k, 0)) for k in ("step", "epoch", "batches_done_in_epoch")):
                raise TypeError("step, epoch and batches_done_in_epoch must be integers")
            if not _is_int(blob.get("bad_steps", 0)):
                raise TypeError("bad_steps must be an integer")
            if not _int_list(blob.get("corrupt_indices", [])) or not _int_list(blob.get("checkpoints", [])):
                raise TypeError("corrupt_indices and checkpoints must be lists of integers")
            if not _metrics(blob.get("val_metrics", {})):
                raise TypeError("val_metrics must map names to numbers")
            history = blob.get("val_history", [])
            if not isinstance(history, list) or not all(_metrics(row) and _is_int(row.get("step")) for row in history):
                raise TypeError("val_history must be a list of {step, metric: number} objects")
            run_id = blob.get("wandb_run_id")
            if run_id is not None and not (isinstance(run_id, str) and _RUN_ID.fullmatch(run_id)):
                raise TypeError("wandb_run_id must be null or a W&B run id (letters, digits, '_', '-')")
        except TypeError as exc:
            raise CheckpointError(f"{path} is not a lineclip trainer state: {exc}") from None
        state = cls(**blob)
        state._check_ranges(path, _checkpoint_steps_of(directory), limits)
        return state

    def _check_ranges(self, path: Path, recorded: list[tuple[str, int]], limits: ResumeLimits | None) -> None:
        """The loop position must be the checkpoint's own (the step in its name and its config's global_step):
        a step past the run's end would skip training and replace the final model with this checkpoint's, a
        negative one would re-run steps and write checkpoints under new names. The data position must fit the
        run's epoch; the counters, the step."""
        def refuse(message: str) -> CheckpointError:
            return CheckpointError(f"{path}: {message}; not resuming from an edited or foreign training state")

        step = self.step
        for where, expected in recorded:
            if step != expected:
                raise refuse(f"step {step} is not the step {expected} of its checkpoint ({where})")
        if self.bad_steps < 0:
            raise refuse(f"bad_steps {self.bad_steps} is negative")
        if any(not 1 <= c <= step for c in self.checkpoints) or self.checkpoints != sorted(set(self.checkpoints)):
            raise refuse(f"checkpoints must be ascending steps in 1..{step}")
        if len(self.val_history) > step or any(not 1 <= row["step"] <= step for row in self.val_history):
            raise refuse(f"val_history rows must have steps in 1..{step}")
        if limits is None:
            if self.epoch < 0 or self.batches_done_in_epoch < 0:
                raise refuse("epoch and batches_done_in_epoch must be >= 0")
            return
        if any(not 0 <= i < limits.n_lines for i in self.corrupt_indices):
            raise CheckpointError(f"{path}: corrupt_indices outside this run's {limits.n_lines} train lines "
                                  "(another manifest?)")
        # trainer.max_bad_steps in a row stop the run: between two good steps there are fewer.
        if self.bad_steps > limits.max_bad_steps * (step + 1):
            raise refuse(f"bad_steps {self.bad_steps} is more than {step} steps can have skipped "
                         f"(trainer.max_bad_steps={limits.max_bad_steps} in a row stop a run)")
        if not 0 <= self.batches_done_in_epoch <= limits.batches_per_epoch:
            raise refuse(f"batches_done_in_epoch {self.batches_done_in_epoch} is not within this run's "
                         f"{limits.batches_per_epoch} batches an epoch")
        # Every step took micro_per_step readable batches and every finished epoch at least one: a bound, not the
        # exact count (corrupt-only batches and skipped steps make that unknowable), but a sound one.
        most = (step + self.bad_steps) * limits.micro_per_step + 1
        if not 0 <= self.epoch <= most:
            raise refuse(f"epoch {self.epoch} is not within 0..{most} (step {step}, {self.bad_steps} bad steps)")


_RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


@dataclass(frozen=True)
class ResumeLimits:
    """What a resumed state must fit besides its own checkpoint: this run's train lines and batches per epoch (per
    process), and micro-batches per optimizer step."""

    n_lines: int
    batches_per_epoch: int
    micro_per_step: int = 1
    max_bad_steps: int = 10


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    return _is_number(value) and math.isfinite(value)


def _int_list(value: Any) -> bool:
    return isinstance(value, list) and all(_is_int(v) for v in value)


def _metrics(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and _is_number(v) for k, v in value.items())


def _checkpoint_steps_of(directory: Path) -> list[tuple[str, int]]:
    """The step a training state dir belongs to, as its name says and as its bundle's config records it."""
    found = []
    step = checkpoint_step(directory.name)
    if step is not None:
        found.append((directory.name, step))
        config = load_json(directory.parent / f"{checkpoint_prefix(step)}{CONFIG}")
        recorded = config.get("global_step")
        if not _is_int(recorded):
            raise CheckpointError(f"{directory.parent / f'{checkpoint_prefix(step)}{CONFIG}'}: global_step "
                                  f"{recorded!r} is not an integer")
        found.append((f"{checkpoint_prefix(step)}{CONFIG}", recorded))
    return found


def _require_regular(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"{path.parent} has no {path.name}")
    if not path.is_file():  # a FIFO or device would block or never end the read
        raise CheckpointError(f"refusing {path}: not a regular file")


def load_json(path: Path) -> dict[str, Any]:
    """A JSON object from a training state, or CheckpointError naming the file."""
    _require_regular(path)
    try:
        blob = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: JSON nested thousands deep
        raise CheckpointError(f"refusing {path}: not a readable JSON file ({first_line(exc)})") from None
    if not isinstance(blob, dict):
        raise CheckpointError(f"refusing {path}: not a JSON object")
    return blob


def load_tensors(path: Path) -> Any:
    """`torch.load(weights_only=True)`: tensors, numbers, strings and containers only; anything that would
    need code to rebuild (a pickled class, a function) is refused, with one line naming the file."""
    _require_regular(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError, OSError ...
        raise CheckpointError(f"refusing {path}: not a weights-only tensor file ({first_line(exc)})") from None


def rng_state() -> dict[str, Any]:
    """This process's generator states, as tensors and numbers (loadable with weights_only=True)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": {"version": int(version), "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(blob: Any, path: Path) -> None:
    try:
        py, npy = blob["python"], blob["numpy"]
        random.setstate((int(py["version"]), tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
        np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), int(npy["pos"]),
                             int(npy["has_gauss"]), float(npy["cached_gaussian"])))
        torch.set_rng_state(blob["torch"])
        if torch.cuda.is_available() and blob["cuda"]:
            torch.cuda.set_rng_state_all(blob["cuda"])
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        raise CheckpointError(f"refusing {path}: not a lineclip RNG state ({first_line(exc)})") from None


def save_training_state(directory: Path, accelerator: Any, model: torch.nn.Module, optimizer: Any,
                        scheduler: Any) -> None:
    """Every process writes its RNG state; the main process writes the rest. No pickle of objects anywhere."""
    from safetensors.torch import save_model

    directory.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        save_model(accelerator.unwrap_model(model), str(directory / MODEL_FILE))
        torch.save(optimizer.state_dict(), directory / OPTIMIZER_FILE)
        (directory / SCHEDULER_FILE).write_text(json.dumps(scheduler.state_dict()))
        if accelerator.scaler is not None:
            (directory / SCALER_FILE).write_text(json.dumps(accelerator.scaler.state_dict()))
    torch.save(rng_state(), directory / rng_file(accelerator.process_index))


_SCHEDULER_KEYS = {"base_lrs", "last_epoch", "_step_count", "_last_lr", "_is_initial", "_get_lr_called_within_step",
                   "lr_lambdas", "verbose"}


def check_scheduler_state(blob: dict[str, Any], path: Path, n_groups: int, step: int) -> dict[str, Any]:
    """scheduler.json as LambdaLR writes it, every field checked: the lrs one finite number per optimizer group, the
    position the trainer state's step. Returned as the attributes to set: LambdaLR.load_state_dict would update
    the scheduler's `__dict__` (and its lambdas' `__dict__`) with whatever keys the file holds."""
    def refuse(message: str) -> CheckpointError:
        return CheckpointError(f"refusing {path}: {message}")

    unknown = set(blob) - _SCHEDULER_KEYS
    if unknown:
        raise refuse(f"unknown key(s) {', '.join(sorted(unknown))}")
    for key in ("base_lrs", "_last_lr"):
        lrs = blob.get(key)
        if not (isinstance(lrs, list) and len(lrs) == n_groups and all(_finite(v) and v >= 0 for v in lrs)):
            raise refuse(f"{key} must be {n_groups} finite numbers >= 0, one per optimizer group; got {lrs!r:.80}")
    if blob.get("last_epoch") != step or not _is_int(blob.get("last_epoch")):
        raise refuse(f"last_epoch {blob.get('last_epoch')!r:.40} is not the trainer state's step {step}")
    if not (_is_int(blob.get("_step_count", step + 1)) and 0 <= blob.get("_step_count", step + 1) <= step + 1):
        raise refuse(f"_step_count {blob.get('_step_count')!r:.40} is not within 0..{step + 1}")
    lambdas = blob.get("lr_lambdas", [None] * n_groups)
    if not (isinstance(lambdas, list) and len(lambdas) == n_groups and all(v is None for v in lambdas)):
        raise refuse("lr_lambdas must be null per group (lineclip's schedule is code, not state)")
    if not all(isinstance(blob.get(k, False), bool) for k in ("_is_initial", "_get_lr_called_within_step", "verbose")):
        raise refuse("_is_initial, _get_lr_called_within_step and verbose must be booleans")
    return {"base_lrs": [float(v) for v in blob["base_lrs"]], "_last_lr": [float(v) for v in blob["_last_lr"]],
            "last_epoch": step, "_step_count": blob.get("_step_count", step + 1),
            **{k: blob[k] for k in ("_is_initial", "_get_lr_called_within_step") if k in blob}}


def check_optimizer_state(blob: Any, path: Path, optimizer: Any, step: int) -> None:
    """optimizer.pt against this run's optimizer: one saved group per group (same parameter count, same flags,
    finite lr/eps/betas/weight decay in range), and per parameter AdamW's moments of the parameter's shape, finite,
    with a step count within the trainer state's step."""
    def refuse(message: str) -> CheckpointError:
        return CheckpointError(f"refusing {path}: {message}")

    if not isinstance(blob, dict) or set(blob) != {"state", "param_groups"}:
        raise refuse("not an optimizer state dict (keys state, param_groups)")
    groups, saved = optimizer.param_groups, blob["param_groups"]
    if not isinstance(saved, list) or len(saved) != len(groups):
        raise refuse(f"{len(saved) if isinstance(saved, list) else 'no'} parameter groups, this run has {len(groups)}")
    params: dict[int, torch.Tensor] = {}
    for i, (group, old) in enumerate(zip(groups, saved, strict=True)):
        if not isinstance(old, dict) or set(old) != set(group):
            raise refuse(f"group {i} does not have this run's keys ({', '.join(sorted(group))})")
        ids = old["params"]
        if not _int_list(ids) or len(ids) != len(group["params"]) or any(pid in params for pid in ids):
            raise refuse(f"group {i} lists other parameters than this run's {len(group['params'])}")
        params.update(zip(ids, group["params"], strict=True))
        for key in ("lr", "initial_lr", "weight_decay"):
            if key in old and not (_finite(old[key]) and old[key] >= 0):
                raise refuse(f"group {i}: {key} {old[key]!r:.40} is not a finite number >= 0")
        if not (_finite(old.get("eps")) and old["eps"] > 0):
            raise refuse(f"group {i}: eps {old.get('eps')!r:.40} is not a finite number > 0")
        betas = old.get("betas")
        if not (isinstance(betas, (list, tuple)) and len(betas) == 2 and all(_finite(b) and 0 <= b < 1 for b in betas)):
            raise refuse(f"group {i}: betas {betas!r:.40} are not two numbers in [0, 1)")
        flags = [k for k in group if k not in ("params", "lr", "initial_lr", "weight_decay", "eps", "betas")]
        changed = [k for k in flags if old[k] != group[k] or type(old[k]) is not type(group[k])]
        if changed:  # implementation switches (fused, foreach, amsgrad ...): this run's code decides them, not a file
            raise refuse(f"group {i}: {', '.join(changed)} differ from this run's optimizer")
    state = blob["state"]
    if not isinstance(state, dict) or any(k not in params for k in state):
        raise refuse("state for parameters the groups do not list")
    for key, moments in state.items():
        param = params[key]
        if not isinstance(moments, dict) or not set(moments) <= {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}:
            raise refuse(f"parameter {key}: not AdamW's state (step, exp_avg, exp_avg_sq)")
        count = moments.get("step")
        if not (isinstance(count, torch.Tensor) and count.numel() == 1 and 0 <= float(count) <= step):
            raise refuse(f"parameter {key}: step is not a number within 0..{step}")
        for name, value in moments.items():
            if name == "step":
                continue
            if not (isinstance(value, torch.Tensor) and value.is_floating_point() and value.shape == param.shape):
                raise refuse(f"parameter {key}: {name} is not a float tensor of shape {tuple(param.shape)}")
            if not bool(torch.isfinite(value).all()):
                raise refuse(f"parameter {key}: {name} holds non-finite values")


def check_scaler_state(blob: dict[str, Any], path: Path) -> None:
    """scaler.json (fp16): GradScaler's five numbers, in range."""
    ok = (set(blob) == {"scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"}
          and _finite(blob["scale"]) and blob["scale"] > 0 and _finite(blob["growth_factor"])
          and blob["growth_factor"] > 1 and _finite(blob["backoff_factor"]) and 0 < blob["backoff_factor"] < 1
          and _is_int(blob["growth_interval"]) and blob["growth_interval"] >= 1
          and _is_int(blob["_growth_tracker"]) and blob["_growth_tracker"] >= 0)
    if not ok:
        raise CheckpointError(f"refusing {path}: not a GradScaler state (scale > 0, growth_factor > 1, "
                              "0 < backoff_factor < 1, integer growth_interval >= 1 and _growth_tracker >= 0)")


def check_rng_state(blob: Any, path: Path) -> None:
    """The shape of `rng_state()`'s output, checked before any generator is touched."""
    try:
        py, npy = blob["python"], blob["numpy"]
        ok = (isinstance(blob, dict) and _is_int(py["version"]) and isinstance(py["state"], torch.Tensor)
              and py["state"].dtype == torch.int64 and py["state"].shape == (625,)
              and (py["gauss"] is None or _finite(py["gauss"])) and npy["kind"] == "MT19937"
              and isinstance(npy["keys"], torch.Tensor) and npy["keys"].shape == (624,)
              and _is_int(npy["pos"]) and 0 <= npy["pos"] <= 624 and _is_int(npy["has_gauss"])
              and _finite(npy["cached_gaussian"]) and isinstance(blob["torch"], torch.Tensor)
              and blob["torch"].dtype == torch.uint8 and blob["torch"].shape == torch.get_rng_state().shape
              and isinstance(blob["cuda"], list) and all(isinstance(t, torch.Tensor) for t in blob["cuda"]))
    except (KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise CheckpointError(f"refusing {path}: not a lineclip RNG state")


def load_training_state(directory: Path, accelerator: Any, model: torch.nn.Module, optimizer: Any, scheduler: Any,
                        strict: bool = True, limits: ResumeLimits | None = None) -> TrainerState:
    """Model, optimizer, scheduler, scaler, this process's RNG and the loop position, through loaders that run no
    code. Files of other formats (accelerate's `*.pkl`/`*.bin` from older lineclip versions) are never opened.
    Every file is read and checked before anything is loaded into the run: a refused state changes nothing."""
    from safetensors.torch import load_model

    model_path = directory / MODEL_FILE
    if not model_path.exists():
        legacy = sorted(p.name for p in directory.iterdir() if p.suffix in (".pkl", ".bin")) \
            if directory.is_dir() else []
        hint = (f" (it holds {', '.join(legacy[:3])}: accelerate's pickle format, which lineclip does not load; start "
                f"from its bundle with model.init_from instead)") if legacy else ""
        raise CheckpointError(f"{directory} has no {MODEL_FILE}{hint}")
    _require_regular(model_path)
    state = TrainerState.load(directory, limits)
    scheduler_path = directory / SCHEDULER_FILE
    scheduler_state = check_scheduler_state(load_json(scheduler_path), scheduler_path, len(optimizer.param_groups),
                                            state.step)
    optimizer_state = load_tensors(directory / OPTIMIZER_FILE)
    check_optimizer_state(optimizer_state, directory / OPTIMIZER_FILE, optimizer, state.step)
    scaler_path = directory / SCALER_FILE
    scaler_state = load_json(scaler_path) if accelerator.scaler is not None and scaler_path.exists() else None
    if scaler_state is not None:
        check_scaler_state(scaler_state, scaler_path)
    rng_path = directory / rng_file(accelerator.process_index)
    rng = None
    try:
        rng = load_tensors(rng_path)
        check_rng_state(rng, rng_path)
    except CheckpointError as err:
        if strict:
            raise CheckpointError(f"{err}; trainer.resume_strict=false resumes without it (not reproducible)") from None
        log.warning("%s; resuming without it (trainer.resume_strict=false): not reproducible", err)
        rng = None
    try:
        load_model(accelerator.unwrap_model(model), str(model_path), strict=True, device="cpu")
    except Exception as exc:  # noqa: BLE001 - SafetensorError, RuntimeError (missing keys), OSError
        raise CheckpointError(f"refusing {model_path}: {first_line(exc)}") from None
    try:
        optimizer.load_state_dict(optimizer_state)
        if scaler_state is not None:
            accelerator.scaler.load_state_dict(scaler_state)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{directory}: optimizer/scheduler state does not fit this run ({first_line(exc)})") \
            from None
    for key, value in scheduler_state.items():  # named attributes only, never the file's keys into __dict__
        setattr(scheduler, key, value)
    if rng is not None:
        try:
            set_rng_state(rng, rng_path)
        except CheckpointError as err:
            if strict:
                raise CheckpointError(f"{err}; trainer.resume_strict=false resumes without it (not reproducible)") \
                    from None
            log.warning("%s; resuming without it (trainer.resume_strict=false): not reproducible", err)
    return state


def checkpoint_steps(output_dir: str | Path) -> list[int]:
    """Steps of the complete, resumable checkpoints in a run dir, ascending."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    steps = []
    for path in output_dir.iterdir():
        step = checkpoint_step(path.name)
        if step is not None and path.name == f"{checkpoint_prefix(step)}{CONFIG}" \
                and (output_dir / f"{checkpoint_prefix(step)}{TRAINING_STATE}").is_dir():
            steps.append(step)
    return sorted(steps)


class TrainingDiverged(LineclipError, RuntimeError):
    """Too many non-finite losses in a row; the last good checkpoint is kept."""


class ResumeError(LineclipError, ValueError):
    """`trainer.resume` names nothing resumable; the message says what was looked for."""


def resolve_resume(resume: str, output_dir: Path) -> Path | None:
    """The training-state dir to resume from. `latest`: the newest complete checkpoint of this run's dir
    (None when there is none yet: a fresh start). Otherwise a run dir (its newest checkpoint), a bundle
    prefix (`.../checkpoint_step_0002400_`) or any entry of that bundle."""
    if resume == "latest":
        steps = checkpoint_steps(output_dir)
        return output_dir / f"{checkpoint_prefix(steps[-1])}{TRAINING_STATE}" if steps else None
    path = Path(resume)
    if path.is_dir() and not path.name.startswith("checkpoint_step_"):
        steps = checkpoint_steps(path)
        if not steps:
            raise ResumeError(f"trainer.resume={resume}: no complete checkpoint in that dir")
        return path / f"{checkpoint_prefix(steps[-1])}{TRAINING_STATE}"
    step = checkpoint_step(path.name)
    if step is None:
        raise ResumeError(f"trainer.resume={resume}: not 'latest', a run dir or a checkpoint_step_XXXXXXX_ bundle")
    prefix = path.parent / checkpoint_prefix(step)
    state = Path(f"{prefix}{TRAINING_STATE}")
    if not (state.is_dir() and Path(f"{prefix}{CONFIG}").is_file()):
        raise ResumeError(f"trainer.resume={resume}: {prefix.name} is not a complete checkpoint with training state")
    return state


def rotate_checkpoints(output_dir: Path, keep_last: int) -> list[int]:
    """Delete all but the newest `keep_last` checkpoints (the final artifacts have no step prefix and are never
    touched). Each bundle's config goes first, so a half-deleted bundle never looks complete."""
    steps = checkpoint_steps(output_dir)
    doomed = steps[:-keep_last] if keep_last > 0 else []
    for step in doomed:
        prefix = checkpoint_prefix(step)
        for entry in (CONFIG, *BUNDLE_ENTRIES, TRAINING_STATE):
            target = output_dir / f"{prefix}{entry}"
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        log.info("removed checkpoint %s (trainer.keep_last_checkpoints=%d)", prefix, keep_last)
    return doomed


def training_state_dir(staging: Path) -> Path:
    return staging / TRAINING_STATE


RUN_LOCK = artifacts.RUN_LOCK
_held_locks: dict[str, int] = {}  # run dir -> the descriptor whose flock claims it, for this process's run


def _check_writable(output_dir: Path) -> None:
    probe = output_dir / f".lineclip_write_probe_{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ResumeError(f"run dir {output_dir} is not writable ({first_line(exc)})") from None


def lock_run_dir(output_dir: Path) -> None:
    """Claim `output_dir` for this process's run, atomically, before anything in it is looked at: an exclusive
    lock on `<run dir>/.lineclip_run.lock`, held until the run ends (release_run_dirs) or the process dies, when
    the kernel releases it, so a crashed run never leaves a stale claim. A POSIX record lock (fcntl), not flock:
    it belongs to this process only, so DataLoader workers forked during the run never hold it after the run
    ended, and NFS servers honour it. The file stays (empty): deleting it would let a second process lock a new
    file while a third still holds the old one. A second lineclip.train into the same dir stops here with one
    line, before it reads, writes or removes anything. Where the file system has no locks at all, a warning, and
    the dir is not guarded against a concurrent run."""
    _check_writable(output_dir)
    path = output_dir / RUN_LOCK
    key = str(output_dir.resolve())
    if key in _held_locks:
        raise ResumeError(f"run dir {output_dir} is already used by a run of this process")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0),
                     0o644)
    except OSError as exc:
        raise ResumeError(f"cannot create the run dir's lock {path} ({first_line(exc)})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ResumeError(f"{path} is not a regular file; refusing to use run dir {output_dir}")
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EAGAIN):
            log.warning("cannot lock run dir %s (%s): a second run started into it at the same time would not be "
                        "refused", output_dir, first_line(exc))
        else:
            holder = _lock_holder(fd)
            os.close(fd)
            raise ResumeError(f"run dir {output_dir} is in use by another lineclip.train{holder} (it holds {path}); "
                              "wait for it to end, or choose another hydra.run.dir") from None
    except BaseException:
        os.close(fd)
        raise
    _held_locks[key] = fd


def _lock_holder(fd: int) -> str:
    """` (pid N)` of the process holding the lock on `fd`'s file, where the kernel says (F_GETLK)."""
    try:
        query = struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0, 0, 0)
        kind, _, _, _, pid = struct.unpack("hhqqi", fcntl.fcntl(fd, fcntl.F_GETLK, query))
    except (OSError, struct.error):
        return ""
    return f" (pid {pid})" if kind != fcntl.F_UNLCK and pid > 0 else ""


def release_run_dirs() -> None:
    """Release this process's run dir claims (the end of train(); an exit or a crash releases them as well)."""
    while _held_locks:
        os.close(_held_locks.popitem()[1])


def claim_run_dir(output_dir: Path, resume: str | None, resume_from: Path | None, overwrite: bool,
                  remove: bool = True) -> None:
    """Make sure a run may write into `output_dir`, before any model is built: the dir must be writable, and if it
    holds another run (a bundle, a checkpoint, a corpus, a staging dir), `trainer.resume` must continue it or
    `trainer.overwrite=true` must replace it. Overwrite removes that run's files first (checkpoints, each config
    first, then the final artifacts), so nothing of two runs is ever mixed. `remove`: only the main process
    deletes."""
    if resume and overwrite:
        raise ResumeError("trainer.resume and trainer.overwrite=true contradict each other: give one")
    _check_writable(output_dir)
    found = artifacts.run_entries(output_dir)
    if not found:
        return
    shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
    if resume:
        if resume_from is None:
            raise ResumeError(f"trainer.resume={resume}: {output_dir} holds a run ({shown}) but no complete "
                              "checkpoint to continue; trainer.overwrite=true (without trainer.resume) replaces it")
        return
    if not overwrite:
        raise ResumeError(f"{output_dir} already holds a run ({shown}); continue it with trainer.resume=latest or "
                          "replace it with trainer.overwrite=true")
    if not remove:
        return
    log.warning("trainer.overwrite=true: removing the earlier run's files in %s (%s)", output_dir, shown)
    names = sorted(found, key=lambda n: (not n.endswith(CONFIG), n))  # every config goes first
    for name in [*names, RUN_ID_FILE, METRICS_FILE]:
        target = output_dir / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()


class Checkpointer:
    """What a run writes, and the state that goes with it: the TrainerState (step, data position, counters,
    validation history), the corrupt train lines seen on this process, the SIGTERM flag, and the writing of
    checkpoints (bundle + training state under one prefix, then rotation) and of the final artifacts.

    `run_info`: the training config's fixed keys (schedule, world size, batch sizes ...), in the order they are
    written; `data_report`: the run's data report, shared with (and filled in further by) the loop."""

    def __init__(self, cfg: Any, accelerator: Any, output_dir: Path, model: torch.nn.Module, optimizer: Any,
                 scheduler: Any, image_processor: Any, tokenizer: Any, n_lines: int, run_info: dict[str, Any],
                 data_report: dict[str, Any]) -> None:
        self.cfg, self.accelerator, self.output_dir = cfg, accelerator, output_dir
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.image_processor, self.tokenizer = image_processor, tokenizer
        self.run_info, self.data_report = run_info, data_report
        self.state = TrainerState()
        self.corrupt = torch.zeros(n_lines, dtype=torch.bool)
        self.stop_requested = False

    def resume(self, directory: Path, batches_per_epoch: int) -> None:
        """Model, optimizer, scheduler, scaler, this process's RNG and the loop position: no pickle, every field
        checked against this run (`batches_per_epoch`: this process's) before any is loaded."""
        limits = ResumeLimits(len(self.corrupt), batches_per_epoch,
                              int(self.run_info["schedule"]["micro_batches_per_step"]),
                              int(self.cfg.trainer.max_bad_steps))
        self.state = load_training_state(directory, self.accelerator, self.model, self.optimizer, self.scheduler,
                                         strict=self.cfg.trainer.resume_strict, limits=limits)
        self.corrupt[self.state.corrupt_indices] = True
        log.info("resumed from %s at step %d (epoch %d, batch %d of it)", directory.name, self.state.step,
                 self.state.epoch, self.state.batches_done_in_epoch)

    @contextlib.contextmanager
    def stop_on_sigterm(self):
        """SIGTERM (SLURM pre-emption, spot VMs) only sets `stop_requested`: the loop finishes the step in
        flight, checkpoints and exits cleanly."""

        def request_stop(signum, frame):  # noqa: ARG001
            self.stop_requested = True

        previous = signal.signal(signal.SIGTERM, request_stop)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)

    def sync_corrupt(self) -> list[int]:
        """The corrupt train lines seen on any process."""
        world = self.accelerator.num_processes
        merged = self.accelerator.reduce(self.corrupt.to(self.accelerator.device, torch.int32), "max") \
            if world > 1 else self.corrupt
        return torch.nonzero(merged.cpu()).flatten().tolist()

    def training_config(self) -> dict[str, Any]:
        state, cfg = self.state, self.cfg
        return {
            **workbench_keys(cfg),
            **{k: state.val_metrics.get(k) for k in ("val_i2t_r1", "val_t2i_r1")},
            "val_metrics": state.val_metrics,
            "val_history": state.val_history,
            "global_step": state.step,
            **self.run_info,
            "bad_steps_skipped": state.bad_steps,
            "logit_scale": float(self.accelerator.unwrap_model(self.model).scale().detach()),
            "crop_to_text": bool(cfg.data.crop_to_text),
            "data_report": {**self.data_report, "corrupt_images_skipped": len(state.corrupt_indices)},
            "config": OmegaConf.to_container(cfg, resolve=True),
        }

    def save(self) -> None:
        """The bundle and the training state under one prefix, renamed into place config-last."""
        accelerator, output_dir, state = self.accelerator, self.output_dir, self.state
        prefix = checkpoint_prefix(state.step)
        state.checkpoints = sorted({*state.checkpoints, state.step})
        state.corrupt_indices = self.sync_corrupt()
        what = f"checkpoint {prefix} in {output_dir}"
        staging = staging_dir(output_dir, prefix)
        try:
            # Each phase ends in a barrier that tells every process whether any of them failed.
            with all_or_none(accelerator, what):
                if accelerator.is_main_process:
                    staging_dir(output_dir, prefix, reset=True)
            with all_or_none(accelerator, what):  # every process writes its RNG state
                save_training_state(training_state_dir(staging), accelerator, self.model, self.optimizer,
                                    self.scheduler)
            with all_or_none(accelerator, what):
                if accelerator.is_main_process:
                    state.save(training_state_dir(staging))
                    save_bundle(output_dir, prefix, accelerator.unwrap_model(self.model), self.image_processor,
                                self.tokenizer, self.training_config(),
                                extra_entries=(training_state_dir(staging).name,))
                    if self.cfg.trainer.keep_last_checkpoints:
                        rotate_checkpoints(output_dir, self.cfg.trainer.keep_last_checkpoints)
        except BaseException as exc:
            if accelerator.is_main_process:  # a full disk leaves no half-written staging dir behind
                remove_staging(staging)
            error = as_write_error(exc, what)
            if error is None:
                raise
            raise error from exc

    def save_final(self, corpus: CorpusExport | None, records: list[Any]) -> None:
        """Main process: the corpus embeddings (when exported: `corpus`, rows for those of `records` it lists), the
        data report and the final bundle, staged together and renamed in config-last: all or nothing. Every process
        waits for it and, if it failed, stops with an error too."""
        with all_or_none(self.accelerator, f"the final artifacts in {self.output_dir}"):
            if self.accelerator.is_main_process:
                self._save_final(corpus, records)

    def _save_final(self, corpus: CorpusExport | None, records: list[Any]) -> None:
        output_dir, state = self.output_dir, self.state
        staging = staging_dir(output_dir, "", reset=True)
        extra, corpus_info = [artifacts.DATA_REPORT], None
        try:
            if corpus is not None:
                rows = np.asarray(corpus.indices, dtype=np.int64)
                artifacts.save_corpus_embeddings(staging, corpus.embeddings, records, rows)
                extra += [artifacts.EMBEDDINGS, artifacts.EMBEDDINGS_META]
                corpus_info = {"n_lines": len(rows)}
            (staging / artifacts.DATA_REPORT).write_text(json.dumps(
                {**self.data_report, "corrupt_images_skipped": len(state.corrupt_indices),
                 "bad_steps_skipped": state.bad_steps}, indent=2, ensure_ascii=False))
        except BaseException as exc:
            remove_staging(staging)
            error = as_write_error(exc, f"the final corpus in {output_dir}")
            if error is None:
                raise
            raise error from exc
        finally:
            if corpus is not None:
                remove_staging(corpus.directory)
        model = self.accelerator.unwrap_model(self.model)
        save_bundle(output_dir, "", model, self.image_processor,
                    self.tokenizer, self.training_config(), extra_entries=tuple(extra), corpus=corpus_info)
        if model.reading_head is not None:  # beside the bundle, never in it (the Workbench loads the bundle)
            from lineclip.bundle import BundleRef, model_fingerprint
            from lineclip.reading import save_reading_head

            try:
                save_reading_head(model.reading_head, output_dir, model_fingerprint(BundleRef(Path(output_dir), "")))
            except OSError as exc:
                error = as_write_error(exc, f"the reading head in {output_dir}")
                if error is None:
                    raise
                raise error from exc
