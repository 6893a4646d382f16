"""`python -m lineclip.train [group=option ...] [key=value ...]`: train a dual encoder that matches Tibetan line
images with their transcriptions, and write its checkpoints, final bundle and corpus embeddings into a run dir
(printed when the run starts); with no arguments, on the demo lines bundled in the package.

The Hydra entry point: config tree in `conf/`, primary `train.yaml`.
"""

from __future__ import annotations

from omegaconf import DictConfig

from lineclip.cli import hydra_command
from lineclip.config import register_configs

register_configs()


def run(cfg: DictConfig) -> float:
    """Train; bad input, a refused checkpoint or an I/O error (read-only or full disk) ends the process with one
    error line and exit status 2, not a traceback (lineclip.cli.run_command, as for every command)."""
    from lineclip.cli import run_command
    from lineclip.trainer import train

    return run_command(lambda c: train(c).objective, cfg)


@hydra_command("train")
def main(cfg: DictConfig) -> float:
    try:
        return run(cfg)
    finally:
        import torch  # here: a module-level import would delay the command's first line by seconds

        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
