"""Resumable checkpoints: the spec's bundle plus the full training state, under one prefix.

`checkpoint_step_0002400_training_state/` holds accelerate's `save_state` (model, optimizer, scheduler,
grad scaler, every process's RNG states) and `trainer_state.json` (global step, data position, counters).
It is written into the bundle's staging dir before the other entries, and the bundle's
`training_config.json` is renamed into place last, so `latest` only ever sees complete checkpoints.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lineclip import artifacts

log = logging.getLogger(__name__)

TRAINING_STATE = "training_state"
TRAINER_STATE_FILE = "trainer_state.json"
_CHECKPOINT_CONFIG = re.compile(r"^checkpoint_step_(\d{7})_" + re.escape(artifacts.CONFIG) + "$")


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
    def load(cls, directory: Path) -> TrainerState:
        return cls(**json.loads((directory / TRAINER_STATE_FILE).read_text()))


def checkpoint_steps(output_dir: str | Path) -> list[int]:
    """Steps of the complete, resumable checkpoints in a run dir, ascending."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    steps = []
    for path in output_dir.iterdir():
        match = _CHECKPOINT_CONFIG.match(path.name)
        if match and (output_dir / f"{artifacts.checkpoint_prefix(int(match[1]))}{TRAINING_STATE}").is_dir():
            steps.append(int(match[1]))
    return sorted(steps)


class ResumeError(ValueError):
    """`trainer.resume` names nothing resumable; the message says what was looked for."""


def resolve_resume(resume: str, output_dir: Path) -> Path | None:
    """The training-state dir to resume from. `latest`: the newest complete checkpoint of this run's dir
    (None when there is none yet: a fresh start). Otherwise a run dir (its newest checkpoint), a bundle
    prefix (`.../checkpoint_step_0002400_`) or any entry of that bundle."""
    if resume == "latest":
        steps = checkpoint_steps(output_dir)
        return output_dir / f"{artifacts.checkpoint_prefix(steps[-1])}{TRAINING_STATE}" if steps else None
    path = Path(resume)
    if path.is_dir() and not path.name.startswith("checkpoint_step_"):
        steps = checkpoint_steps(path)
        if not steps:
            raise ResumeError(f"trainer.resume={resume}: no complete checkpoint in that dir")
        return path / f"{artifacts.checkpoint_prefix(steps[-1])}{TRAINING_STATE}"
    match = re.match(r"^(checkpoint_step_\d{7}_)", path.name)
    if not match:
        raise ResumeError(f"trainer.resume={resume}: not 'latest', a run dir or a checkpoint_step_XXXXXXX_ bundle")
    prefix = path.parent / match[1]
    state = Path(f"{prefix}{TRAINING_STATE}")
    if not (state.is_dir() and Path(f"{prefix}{artifacts.CONFIG}").is_file()):
        raise ResumeError(f"trainer.resume={resume}: {prefix.name} is not a complete checkpoint with training state")
    return state


def rotate_checkpoints(output_dir: Path, keep_last: int) -> list[int]:
    """Delete all but the newest `keep_last` checkpoints (the final artifacts have no step prefix and are never
    touched). Each bundle's config goes first, so a half-deleted bundle never looks complete."""
    steps = checkpoint_steps(output_dir)
    doomed = steps[:-keep_last] if keep_last > 0 else []
    for step in doomed:
        prefix = artifacts.checkpoint_prefix(step)
        for entry in (artifacts.CONFIG, *artifacts.BUNDLE_ENTRIES, TRAINING_STATE):
            target = output_dir / f"{prefix}{entry}"
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        log.info("removed checkpoint %s (trainer.keep_last_checkpoints=%d)", prefix, keep_last)
    return doomed


def training_state_dir(staging: Path) -> Path:
    return staging / TRAINING_STATE
