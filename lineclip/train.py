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


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="train")
def main(cfg: DictConfig) -> float:
    from lineclip.checkpoint import ResumeError
    from lineclip.encoder import BundleError
    from lineclip.manifest import ManifestError
    from lineclip.trainer import TrainingDiverged, train

    try:
        result = train(cfg)
        return result.objective
    except (ConfigError, ManifestError, ResumeError, BundleError, TrainingDiverged) as err:
        # A one-line reason and a non-zero exit, not a traceback.
        log.error("%s", err)
        sys.exit(2)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
