"""`python -m lineclip.train [overrides]`: the Hydra entry point (config tree in `conf/`, primary `train.yaml`)."""

from __future__ import annotations

import logging
import sys

import hydra
import torch
from omegaconf import DictConfig

from lineclip.config import ConfigError, conf_dir, register_configs

register_configs()
log = logging.getLogger("lineclip")


def run(cfg: DictConfig) -> float:
    """Train; bad input, a refused checkpoint or an I/O error (read-only or full disk) ends the process with one
    error line and exit status 2, not a traceback."""
    from lineclip.artifacts import OutputPathError
    from lineclip.bundle import BundleError
    from lineclip.checkpoint import CheckpointError, ResumeError
    from lineclip.manifest import ManifestError
    from lineclip.trainer import TrainingDiverged, train

    try:
        result = train(cfg)
        return result.objective
    except (ConfigError, ManifestError, ResumeError, CheckpointError, BundleError, OutputPathError,
            TrainingDiverged) as err:
        log.error("%s", " ".join(str(err).split()))
        sys.exit(2)
    except OSError as err:  # the environment (disk full, read-only), not a bug; staging dirs are already removed
        log.error("%s", " ".join(f"{type(err).__name__}: {err}".split()))
        sys.exit(2)


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="train")
def main(cfg: DictConfig) -> float:
    try:
        return run(cfg)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
