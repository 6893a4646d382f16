"""Experiment tracking: W&B through accelerate's tracker API, offline without credentials, resumable."""

from __future__ import annotations

import json
import logging
import netrc
import os
import uuid
from pathlib import Path

from accelerate import Accelerator
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)
RUN_ID_FILE = "wandb_run_id"


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
    log.warning("W&B: no credentials (WANDB_API_KEY or ~/.netrc); logging offline to the run dir "
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
        if group is None and hydra_cfg.mode.name == "MULTIRUN":
            group = Path(hydra_cfg.sweep.dir).name  # one W&B group per sweep
    except ValueError:  # not under @hydra.main (tests, the API)
        run_name = output_dir.name
    init_kwargs = {"dir": str(output_dir), "group": group, "name": run_name, "mode": wandb_mode(cfg),
                   "tags": list(cfg.logger.tags), "entity": cfg.logger.entity, "reinit": "finish_previous",
                   "id": run_id, "resume": "allow"}
    accelerator.init_trackers(cfg.logger.project, config=OmegaConf.to_container(cfg, resolve=True),
                              init_kwargs={"wandb": init_kwargs})


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
