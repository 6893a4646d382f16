"""Sweeps beyond one machine: the Optuna sweeper maximises the value `lineclip.train` returns, and the SLURM
launcher config composes (the `sweep` extra)."""

import json
import os
import subprocess
import sys

import pytest
import yaml
from usage_support import TINY

from lineclip.config import compose


def test_slurm_launcher_config_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the `sweep` extra is not installed")
    cfg = compose("train", ["hydra/launcher=slurm_gpu", "hydra.launcher.partition=gpu"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.partition) == (1, 1, "gpu")


def test_optuna_search_composes_with_a_maximised_objective():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="the `sweep` extra is not installed")
    cfg = compose("train", ["hparams_search=optuna"], return_hydra_config=True)
    assert cfg.hydra.sweeper.direction == "maximize" and "optim.lr" in cfg.hydra.sweeper.params


@pytest.mark.slow
def test_optuna_sweep_maximises_final_val_t2i_r1(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="the `sweep` extra is not installed")
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "lineclip.train", "-m", *TINY, "hparams_search=optuna", "hydra.sweeper.n_trials=3",
           "trainer.max_steps=2", "trainer.export_embeddings=false", "logger=none", "trainer.progress_bar=false",
           "data.num_workers=0", f"hydra.sweep.dir={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    values = [json.loads((job / "training_config.json").read_text())["val_t2i_r1"]
              for job in sorted(out.iterdir()) if (job / "training_config.json").exists()]
    assert len(values) == 3
    result = yaml.safe_load((out / "optimization_results.yaml").read_text())
    assert result["best_value"] == pytest.approx(max(values))
