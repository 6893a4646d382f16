"""Two processes on one machine (torchrun, gloo, CPU): the proof that lineclip trains ONE model with
global negatives, and that its schedule, validation and artifacts are right for world size 2."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from usage_support import TINY

from lineclip.batch import BucketBatchSampler, LineCollator, LineDataset
from lineclip.config import asset_dir, compose
from lineclip.data import text_ids_of
from lineclip.loss import contrastive_loss
from lineclip.manifest import read_manifest
from lineclip.preprocess import LineGeometry, LineImageTransform
from lineclip.trainer import build_model, grad_cache_step

pytestmark = pytest.mark.distributed
CHECKS = Path(__file__).parent / "distributed" / "checks.py"


def torchrun(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


REPO = Path(__file__).resolve().parent.parent
CPU_2PROC = REPO / "launch" / "cpu_2proc.yaml"


def accelerate_launch(*args: str, config: Path | None = CPU_2PROC, check: bool = True, env: dict | None = None,
                      timeout: int = 600) -> subprocess.CompletedProcess:
    """`accelerate launch [--config_file config] args...`, as the README tells a user to run it."""
    launch = [sys.executable, "-m", "accelerate.commands.launch"]
    cmd = [*launch, *(["--config_file", str(config)] if config else []), *args]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def reports(out: Path, mode: str) -> list[dict]:
    return [json.loads((out / f"{mode}_rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate_cpu_2proc"])
def test_two_processes_batch_b_equal_one_process_batch_2b(tmp_path, launcher):
    # The shipped launch/cpu_2proc.yaml must start two processes that gather each other's negatives: the loss
    # of 2 x B with gathering equals the loss of one batch of 2B only if each rank saw the other's B lines.
    launch = torchrun if launcher == "torchrun" else accelerate_launch
    launch(str(CHECKS), "grads", str(tmp_path))
    for rep in reports(tmp_path, "grads"):
        assert rep["grad_names_equal"] and rep["n_grads"] > 50
        assert rep["loss_2xB"] == pytest.approx(rep["loss_1x2B"], rel=1e-5)
        # every gradient of both towers, both heads and the logit scale, after DDP's all-reduce
        assert rep["grad_max_abs_diff"] < 1e-5 * max(1.0, rep["grad_max_abs"])
        assert rep["logit_scale_grad_diff"] < 1e-5
        # and with gradient caching (2 micro-batches a rank) on top
        assert rep["loss_grad_cache"] == pytest.approx(rep["loss_1x2B"], rel=1e-5)
        assert rep["grad_cache_max_abs_diff"] < 1e-5 * max(1.0, rep["grad_max_abs"])
        # loss=siglip with TrainTexts positives (one crossing ranks), via train_step, with and without grad caching
        assert rep["siglip_cross_rank_positive"]
        for mode in ("plain", "grad_cache"):
            assert rep[f"siglip_{mode}_names_equal"]
            assert rep[f"siglip_{mode}_loss"] == pytest.approx(rep["siglip_loss_1x2B"], rel=1e-5)
            assert rep[f"siglip_{mode}_max_abs_diff"] < 1e-5 * max(1.0, rep["siglip_grad_max_abs"])


def test_two_processes_export_a_corpus_in_parts_without_gathering(tmp_path):
    torchrun(str(CHECKS), "export", str(tmp_path))
    rank0, rank1 = reports(tmp_path, "export")
    assert rank0["gathers_in_export"] == rank1["gathers_in_export"] == 0  # no process ever holds all rows
    assert rank0["returned"] and not rank1["returned"]  # the merged corpus is the main process's
    assert rank0["n_buckets"] == 2
    # every readable line once (the broken one, 6, left out), in dataset order, as each line embeds alone
    assert rank0["indices"] == rank0["expected_indices"] == [i for i in range(13) if i != 6]
    assert rank0["shape"][0] == 12
    assert rank0["max_abs_diff_vs_alone"] < 1e-5
    assert rank0["equal_to_gathered"]  # what validation's gathered embedding gives, to the bit
    assert rank0["files_left"] == ["faiss_embeddings.npy"]  # the parts are merged and gone


@pytest.mark.slow
def test_two_process_training_run(tmp_path):
    batch, eval_batch, warmup, every = 8, 7, 3, 4
    torchrun(str(CHECKS), "train", str(tmp_path), f"data.batch_size={batch}", f"data.eval_batch_size={eval_batch}",
             "trainer.epochs=2", f"trainer.checkpoint_every_steps={every}", f"optim.warmup_steps={warmup}",
             "logger=none", "trainer.progress_bar=false", "data.num_workers=0")
    rank0, rank1 = reports(tmp_path, "train")
    # 1. one model: every parameter identical on both ranks after training
    for rep in (rank0, rank1):
        assert rep["trainer_world_size"] == 2 and rep["param_max_abs_diff_across_ranks"] == 0.0
    assert rank0["logit_scale"] == rank1["logit_scale"] != pytest.approx(math.log(1 / 0.07))
    # 3. steps from the per-process share of the bucketed batches
    demo = asset_dir("demo")
    records, _ = read_manifest(demo / "train" / "meta" / "lines.jsonl", demo)
    buckets = LineDataset(records, LineImageTransform("bdrc", LineGeometry())).buckets
    n_batches = len(BucketBatchSampler(buckets, batch, shuffle=True))
    per_process = math.ceil(n_batches / 2)
    sched = rank0["schedule"]
    assert sched["steps_per_epoch"] == per_process and sched["total_steps"] == 2 * per_process
    assert sched["progress_bar_total"] == 2 * per_process and sched["warmup_steps"] == warmup
    expected_ckpts = [s for s in range(every, 2 * per_process, every)]
    assert rank0["checkpoints"] == rank1["checkpoints"] == expected_ckpts
    run = tmp_path / "run"
    assert sorted({p.name[:24] for p in run.glob("checkpoint_step_*_training_config.json")}) == [
        f"checkpoint_step_{s:07d}_" for s in expected_ckpts]
    # 4. validation gathered across ranks (uneven shards: 40 lines in batches of 7) == one process alone
    for key, value in rank0["single_process_val_metrics"].items():
        assert rank0["val_metrics"][key] == pytest.approx(value, abs=1e-6), key
    assert rank0["val_metrics"] == rank1["val_metrics"]


def test_a_save_that_fails_on_one_process_stops_every_process(tmp_path):
    """Before, process 1 waited at the barrier after the checkpoint for a process 0 that had raised: a hang (for
    the NCCL timeout on GPUs). Now every process learns of the failure at that barrier and stops with an error."""
    torchrun(str(CHECKS), "save_fails", str(tmp_path), "data.batch_size=8", "trainer.max_steps=3",
             "trainer.checkpoint_every_steps=2", "logger=none", "trainer.progress_bar=false", "data.num_workers=0",
             timeout=240)
    rank0, rank1 = reports(tmp_path, "save_fails")
    assert rank0["error"] == "WriteError" and "No space left on device" in rank0["message"]
    assert rank0["message"].startswith("cannot write checkpoint checkpoint_step_0000002_")
    assert rank1["error"] == "CheckpointError" and "failed on 1 other process" in rank1["message"]
    run = tmp_path / "run"
    assert not list(run.glob("checkpoint_step_*")) and not list(run.glob(".staging_*"))


@pytest.mark.slow
def test_two_process_cli_writes_one_complete_artifact_set(tmp_path):
    out = tmp_path / "run"
    torchrun("-m", "lineclip.train", *TINY, f"hydra.run.dir={out}", "data.batch_size=8", "trainer.max_steps=3",
             "trainer.checkpoint_every_steps=2", "trainer.progress_bar=false", "data.num_workers=0", "logger=wandb")
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    bundle = ["text_hierarchy_clip_text_encoder", "text_hierarchy_clip_text_projection_head.pt",
              "text_hierarchy_projection_head.pt", "text_hierarchy_vit_backbone", "training_config.json"]
    expected = sorted([f"checkpoint_step_0000002_{b}" for b in [*bundle, "training_state"]] + bundle + [
        "data_report.json", "faiss_embeddings.npy", "faiss_embeddings_meta.parquet", "metrics.jsonl", "train.log",
        "wandb", "wandb_run_id"])
    assert names == expected
    assert len(list((out / "wandb").glob("offline-run-*"))) == 1  # trackers on the main process only
    cfg = json.loads((out / "training_config.json").read_text())
    assert cfg["world_size"] == 2 and cfg["global_batch_size"] == 16 and cfg["contrastive_batch_size"] == 16
    emb = np.load(out / "faiss_embeddings.npy")
    assert emb.shape[0] == 160  # every train line once, no duplicates from sharding
    assert not list(out.glob(".staging*"))


def _micro_batches(n_micro=3, per=4):
    demo = asset_dir("demo")
    records, _ = read_manifest(demo / "train" / "meta" / "lines.jsonl", demo)
    dataset = LineDataset(records, LineImageTransform("bdrc", LineGeometry()))
    rows = [i for i in range(len(dataset)) if dataset.buckets[i] == 1036][: n_micro * per]
    collate = LineCollator(128)
    batches = [collate([dataset[i] for i in rows[k * per:(k + 1) * per]]) for k in range(n_micro)]
    return batches, text_ids_of(records)


def test_grad_cache_equals_one_big_batch_with_dropout_on():
    cfg = compose("train", [*TINY, "+text.config.dropout_rate=0.3"])
    torch.manual_seed(0)
    model, _, _ = build_model(cfg)
    model.train()
    batches, ids = _micro_batches()

    torch.manual_seed(123)  # the same dropout masks for both computations
    outs = [model(pixel_values=b["pixel_values"], input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            for b in batches]
    ref = contrastive_loss(torch.cat([o.image for o in outs]), torch.cat([o.text for o in outs]),
                           torch.cat([ids[b["indices"]] for b in batches]), outs[0].logit_scale)
    ref.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    torch.manual_seed(123)
    cached = grad_cache_step(Accelerator(cpu=True), model, batches, None, gather=False)  # the batches' text_ids
    assert cached.loss.item() == pytest.approx(ref.loss.item(), rel=1e-6)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys() and "logit_scale" in grads
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, atol=1e-6, rtol=1e-4, msg=name)


def test_gradient_accumulation_sums_batches_without_adding_negatives():
    from lineclip.trainer import train_step

    cfg = compose("train", list(TINY))
    torch.manual_seed(0)
    model, _, _ = build_model(cfg)
    model.eval()
    batches, ids = _micro_batches(n_micro=2)
    expected = {}
    for b in batches:  # each micro-batch's own loss (its own negatives only), averaged
        out = model(pixel_values=b["pixel_values"], input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        (contrastive_loss(out.image, out.text, ids[b["indices"]], out.logit_scale).loss / 2).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    train_step(Accelerator(cpu=True), model, batches, None, gather=False, grad_cache=False)
    for name, g in expected.items():
        torch.testing.assert_close(model.get_parameter(name).grad, g, atol=1e-6, rtol=1e-4, msg=name)


def test_accelerate_launch_of_the_shipped_cpu_config_trains_one_model_on_two_processes(tmp_path):
    """The README's command: `accelerate launch --config_file launch/cpu_2proc.yaml -m lineclip.train`."""
    run = tmp_path / "run"
    proc = accelerate_launch("-m", "lineclip.train", f"hydra.run.dir={run}", "trainer.max_steps=1", "logger=none",
                             "trainer.export_embeddings=false", "trainer.progress_bar=false")
    info = json.loads((run / "training_config.json").read_text())
    assert info["world_size"] == 2
    assert info["contrastive_batch_size"] == 2 * info["config"]["data"]["batch_size"]
    logged = proc.stdout + proc.stderr  # torchrun's workers log to stdout
    assert "2 processes x batch 16" in logged and "negatives: global batch (gathered)" in logged


def test_accelerate_launch_that_starts_one_of_two_processes_is_refused(tmp_path):
    # Without --multi_gpu, accelerate's simple launcher starts one process and expects mpirun for the rest.
    run = tmp_path / "run"
    proc = accelerate_launch("--num_processes", "2", "-m", "lineclip.train", f"hydra.run.dir={run}", "logger=none",
                             config=None, check=False, env={"HF_HOME": str(tmp_path / "hf")})  # no default config
    assert proc.returncode != 0  # accelerate reports the process's exit status 2 as its own 1
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "[ERROR]" in line]
    assert len(errors) == 1 and "started one" in errors[0] and "launch/cpu_2proc.yaml" in errors[0]
    assert not (run / "training_config.json").exists()
