"""Pre-emption and bad input: a killed run resumes to exactly the uninterrupted result, a crash inside a save
never leaves a checkpoint that looks complete, and broken rows and files are counted, never lost silently."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from usage_support import compose_cfg

from lineclip import bundle
from lineclip.bundle import TRAINING_STATE
from lineclip.checkpoint import checkpoint_steps, resolve_resume
from lineclip.config import register_configs
from lineclip.manifest import ManifestError

register_configs()
RUN = ["data.batch_size=4", "data.num_workers=0", "trainer.max_steps=16", "trainer.checkpoint_every_steps=4",
       "trainer.progress_bar=false", "text.max_length=64", "logger=none", "optim.lr=1e-3", "optim.warmup_steps=2",
       "trainer.export_embeddings=false"]


def data_args(dataset: Path) -> list[str]:
    return ["data=openpecha", f"data.dataset_dir={dataset}", f"data.train_manifest={dataset}/train/meta/lines.jsonl",
            f"data.val_manifest={dataset}/eval/meta/lines.jsonl"]


def cli(out: Path, dataset: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lineclip.train", *data_args(dataset), *RUN, f"hydra.run.dir={out}", *extra]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    heads = {}
    for name in ("text_hierarchy_projection_head.pt", "text_hierarchy_clip_text_projection_head.pt"):
        for key, value in torch.load(run / name, weights_only=True)["state_dict"].items():
            heads[f"{name}:{key}"] = value
    heads["logit_scale"] = torch.tensor(json.loads((run / "training_config.json").read_text())["logit_scale"])
    return heads


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_dataset):
    out = tmp_path_factory.mktemp("uninterrupted")
    subprocess.run(cli(out, tiny_dataset), check=True, capture_output=True, timeout=600)
    return out


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def sigterm_during_step(monkeypatch, n: int):
    """Make the trainer's n-th train_step send this process SIGTERM (deterministic pre-emption); returns the
    original train_step, to put back for the resumed run."""
    from lineclip import trainer

    original, calls = trainer.train_step, {"n": 0}

    def step_then_sigterm(*a, **kw):
        calls["n"] += 1
        if calls["n"] == n:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*a, **kw)

    monkeypatch.setattr(trainer, "train_step", step_then_sigterm)
    return original


def assert_same_final(run: Path, reference: Path) -> None:
    got, want = final_weights(run), final_weights(reference)
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=1e-5, msg=key)


@pytest.mark.slow
def test_sigkill_after_a_checkpoint_then_resume_latest(tmp_path, tiny_dataset, uninterrupted):
    out = tmp_path / "run"
    proc = subprocess.Popen(cli(out, tiny_dataset), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for(out / "checkpoint_step_0000004_training_config.json", proc)
    proc.kill()
    proc.wait()
    assert not (out / "training_config.json").exists()  # it really died before the end
    assert checkpoint_steps(out)[0] == 4
    subprocess.run(cli(out, tiny_dataset, "trainer.resume=latest"), check=True, capture_output=True, timeout=600)
    assert_same_final(out, uninterrupted)
    # the data order after resume is the uninterrupted one: same checkpoints, same final step
    cfg = json.loads((out / "training_config.json").read_text())
    assert cfg["global_step"] == 16
    # the learning curves in metrics.jsonl: every logged step once, as the uninterrupted run logged them
    def curve(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], round(r.get("train/loss", r.get("val_t2i_r1", -1.0)), 4)) for r in rows]

    assert curve(out) == curve(uninterrupted) and len(curve(out)) >= 2


@pytest.mark.slow
def test_sigterm_mid_epoch_checkpoints_then_resume_matches(tmp_path, tiny_dataset, monkeypatch):
    """SIGTERM arrives during step 7 (deterministically: sent from inside that step), mid-epoch (batch 1: 24
    steps an epoch); the step finishes, a checkpoint is written, train returns; resuming ends where the
    uninterrupted run ends."""
    from lineclip import trainer

    args = ("trainer.checkpoint_every_steps=100", "data.batch_size=1")
    trainer.train(_cfg(tmp_path / "reference", tiny_dataset, *args))
    original = sigterm_during_step(monkeypatch, 7)
    out = tmp_path / "run"
    result = trainer.train(_cfg(out, tiny_dataset, *args))
    assert result.interrupted and checkpoint_steps(out) == [7]
    state = json.loads((out / f"checkpoint_step_0000007_{TRAINING_STATE}" / "trainer_state.json").read_text())
    assert (state["epoch"], state["batches_done_in_epoch"]) == (0, 7)  # mid-epoch
    assert not (out / "training_config.json").exists()
    monkeypatch.setattr(trainer, "train_step", original)
    trainer.train(_cfg(out, tiny_dataset, *args, "trainer.resume=latest"))
    assert_same_final(out, tmp_path / "reference")


@pytest.mark.slow
def test_sigterm_to_the_cli_exits_zero_after_a_checkpoint(tmp_path, tiny_dataset):
    out = tmp_path / "run"
    proc = subprocess.Popen(cli(out, tiny_dataset, "trainer.max_steps=100000", "trainer.checkpoint_every_steps=100000"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = out / "train.log"
    deadline = time.time() + 300
    while "steps (" not in (log.read_text() if log.exists() else ""):  # the loop is about to start
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.02)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 0
    steps = checkpoint_steps(out)
    assert len(steps) == 1 and 0 < steps[0] < 100000
    assert "SIGTERM: stopped at step" in log.read_text()
    assert not (out / "training_config.json").exists()


def _cfg(out: Path, dataset: Path, *extra: str):
    return compose_cfg(*data_args(dataset), *RUN, f"output_dir={out}", *extra)


@pytest.mark.slow
def test_crash_inside_a_save_leaves_latest_at_the_previous_checkpoint(tmp_path, tiny_dataset, monkeypatch):
    from lineclip import towers
    from lineclip.trainer import train

    original = towers.ProjectionHead.save

    def failing_save(self, path):
        if "checkpoint_step_0000008_" in str(path):
            raise OSError("disk full (simulated)")
        return original(self, path)

    monkeypatch.setattr(towers.ProjectionHead, "save", failing_save)
    out = tmp_path / "run"
    with pytest.raises(OSError, match="simulated"):
        train(_cfg(out, tiny_dataset))
    assert checkpoint_steps(out) == [4]
    assert not (out / "checkpoint_step_0000008_training_config.json").exists()
    assert resolve_resume("latest", out) == out / f"checkpoint_step_0000004_{TRAINING_STATE}"
    monkeypatch.setattr(towers.ProjectionHead, "save", original)
    result = train(_cfg(out, tiny_dataset, "trainer.resume=latest", "trainer.keep_last_checkpoints=2"))
    assert result.schedule["total_steps"] == 16 and not result.interrupted
    assert checkpoint_steps(out) == [8, 12]  # rotated; the final artifacts stay
    assert bundle.is_complete_bundle(out, "") and not list(out.glob("checkpoint_step_0000004_*"))


@pytest.mark.slow
def test_non_finite_losses_are_skipped_then_stop_the_run(tmp_path, tiny_dataset, monkeypatch):
    from lineclip import trainer

    original = trainer.contrastive_loss
    calls = {"n": 0}

    def sometimes_nan(*args, **kwargs):
        calls["n"] += 1
        out = original(*args, **kwargs)
        if calls["n"] in poison:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(trainer, "contrastive_loss", sometimes_nan)
    poison = {3, 4}
    result = trainer.train(_cfg(tmp_path / "a", tiny_dataset))
    assert result.bad_steps == 2 and not result.interrupted
    cfg = json.loads((tmp_path / "a" / "training_config.json").read_text())
    assert cfg["bad_steps_skipped"] == 2 and cfg["global_step"] == 16  # 18 batches for 16 good steps

    calls["n"] = 0
    poison = set(range(7, 100))
    with pytest.raises(trainer.TrainingDiverged, match="3 non-finite losses in a row.*last good checkpoint: 4"):
        trainer.train(_cfg(tmp_path / "b", tiny_dataset, "trainer.max_bad_steps=3"))
    assert checkpoint_steps(tmp_path / "b") == [4]


def write_bad_file_dataset(root: Path, good_dataset: Path) -> Path:
    """The tiny dataset's train rows plus one of every bad row kind and every bad file kind."""
    rows = [json.loads(x) for x in (good_dataset / "train/meta/lines.jsonl").read_text().splitlines()]
    (root / "train/meta").mkdir(parents=True)
    (root / "train/lines").mkdir()
    for row in rows:
        (root / row["line_path"]).write_bytes((good_dataset / row["line_path"]).read_bytes())
    jpeg = (good_dataset / rows[0]["line_path"]).read_bytes()
    (root / "train/lines/truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (root / "train/lines/garbage.jpg").write_bytes(b"not an image at all")
    (root / "train/lines/empty.png").write_bytes(b"")
    text = rows[0]["text"]
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in rows]
    lines += [
        b'{"line_path": "train/lines/x.jpg", "text": ',                                   # invalid_json
        json.dumps([1, 2]).encode(),                                                       # not_an_object
        json.dumps({"text": text}).encode(),                                               # no_image_key
        json.dumps({"line_path": "train/lines/missing.jpg", "text": text}).encode(),       # image_not_found
        json.dumps({"line_path": rows[1]["line_path"]}).encode(),                          # no_text_key
        json.dumps({"line_path": rows[1]["line_path"], "text": "  "}).encode(),            # empty_text
        json.dumps({"id": rows[2]["id"], "line_path": rows[2]["line_path"], "text": "x"}).encode(),  # duplicate_id
        b'{"line_path": "train/lines/a.jpg", "text": "\xff\xfe"}',                         # invalid_utf8
        json.dumps({"line_path": rows[3]["line_path"], "text": "\u0f40" * 3000}).encode(),  # text_too_long
        json.dumps({"id": "trunc", "line_path": "train/lines/truncated.jpg", "text": text}).encode(),  # corrupt_image
        json.dumps({"id": "garb", "line_path": "train/lines/garbage.jpg", "text": text}).encode(),  # unreadable_image
        json.dumps({"id": "empty", "line_path": "train/lines/empty.png", "text": text}).encode(),  # empty_image
    ]
    (root / "train/meta/lines.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return root


@pytest.mark.slow
def test_every_bad_row_and_file_kind_is_counted(tmp_path, tiny_dataset):
    from lineclip.trainer import train

    root = write_bad_file_dataset(tmp_path / "bad", tiny_dataset)
    out = tmp_path / "run"
    cfg = _cfg(out, root, f"data.val_manifest={tiny_dataset}/eval/meta/lines.jsonl", "trainer.max_steps=8",
               "trainer.export_embeddings=true")
    result = train(cfg)
    assert result.schedule["total_steps"] == 8
    report = json.loads((out / "training_config.json").read_text())["data_report"]
    skipped = report["train"]["skipped"]
    for reason in ("invalid_json", "not_an_object", "no_image_key", "image_not_found", "no_text_key", "empty_text",
                   "duplicate_id", "invalid_utf8", "text_too_long", "unreadable_image", "empty_image"):
        assert skipped[reason] == 1, reason
    assert report["train"]["rows_total"] == 24 + 12 and report["train"]["rows_used"] == 24 + 3
    assert report["corrupt_images_skipped"] == 1  # the truncated JPEG, found when its pixels were read
    assert report["export_skipped_images"] == 3  # truncated + garbage + empty are not in the corpus
    meta_ids = set(__import__("pandas").read_parquet(out / "faiss_embeddings_meta.parquet")["sample_id"])
    assert {"trunc", "garb", "empty"}.isdisjoint(meta_ids) and len(meta_ids) == 24


@pytest.mark.parametrize("mode_row", ["row", "file"])
def test_on_bad_row_error_names_file_and_line(tmp_path, tiny_dataset, mode_row):
    from lineclip.trainer import train

    root = write_bad_file_dataset(tmp_path / "bad", tiny_dataset)
    manifest = root / "train/meta/lines.jsonl"
    if mode_row == "file":  # keep only the good rows and the bad-file rows
        lines = manifest.read_bytes().splitlines()
        manifest.write_bytes(b"\n".join(lines[:24] + lines[-2:]) + b"\n")
        expected = f"{manifest}:25: unreadable_image"
    else:
        expected = f"{manifest}:25: invalid_json"
    with pytest.raises(ManifestError) as err:
        train(_cfg(tmp_path / "run", root, "data.on_bad_row=error",
                   f"data.val_manifest={tiny_dataset}/eval/meta/lines.jsonl"))
    assert str(err.value).startswith(expected)
    assert not (tmp_path / "run" / "text_hierarchy_vit_backbone").exists()


def test_resume_errors_are_one_line(tmp_path):
    from lineclip.checkpoint import ResumeError

    assert resolve_resume("latest", tmp_path) is None  # nothing yet: a fresh start
    with pytest.raises(ResumeError, match="no complete checkpoint"):
        resolve_resume(str(tmp_path), tmp_path)
    with pytest.raises(ResumeError, match="not a complete checkpoint"):
        resolve_resume(str(tmp_path / "checkpoint_step_0000004_"), tmp_path)


def test_heads_load_refuses_pickled_code(tmp_path):
    import pickle

    from lineclip.towers import ProjectionHead

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "head.pt"
    path.write_bytes(pickle.dumps({"state_dict": Evil(), "input_dim": 4, "output_dim": 2}))
    with pytest.raises(pickle.UnpicklingError):
        ProjectionHead.load(path)


@pytest.mark.slow
def test_wandb_run_resumes_with_the_same_id(tmp_path, tiny_dataset):
    from lineclip.trainer import train

    out = tmp_path / "run"
    args = ("logger=wandb", "trainer.max_steps=4", "trainer.checkpoint_every_steps=2")
    train(_cfg(out, tiny_dataset, *args))
    run_id = (out / "wandb_run_id").read_text().strip()
    train(_cfg(out, tiny_dataset, *args, "trainer.resume=latest"))
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(f"-{run_id}") for r in runs)
    assert (out / "wandb_run_id").read_text().strip() == run_id


@pytest.mark.slow
def test_phrase_training_with_same_page_batches_and_siglip_resumes_exactly(tmp_path, tiny_dataset, monkeypatch):
    """Phrases are drawn per (seed, epoch, line) and same-page batches per (seed, epoch): a run stopped
    mid-epoch and resumed ends where the uninterrupted one ends."""
    from lineclip import trainer

    args = ("trainer.checkpoint_every_steps=100", "loss=siglip", "data.text_span.p=0.7",
            "data.group_batches_by=page_id", "trainer.max_steps=9")
    trainer.train(_cfg(tmp_path / "reference", tiny_dataset, *args))
    original = sigterm_during_step(monkeypatch, 5)
    out = tmp_path / "run"
    assert trainer.train(_cfg(out, tiny_dataset, *args)).interrupted
    monkeypatch.setattr(trainer, "train_step", original)
    result = trainer.train(_cfg(out, tiny_dataset, *args, "trainer.resume=latest"))
    assert_same_final(out, tmp_path / "reference")
    assert result.model.logit_bias is not None and result.model.logit_bias.item() != -10.0  # it learned
