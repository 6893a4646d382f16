"""Hostile input, replayed (issue 14): every case ends with the documented exit status and one error line, changes
nothing outside the command's own output (snapshots of whole dirs, contents included) and never runs code from a
checkpoint (a marker pickle, planted in every file of a training state, must never write its marker).

The run is the session's tiny memorising run (usage_support.overfit_run: 60 steps, a checkpoint at step 30 with
its training state); every test that changes it works on a copy.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import io
import json
import logging
import os
import pickle
import re
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from usage_support import TRAIN_OVERRIDES, compose_cfg, make_dataset, overfit_run, run_capturing_errors

from lineclip import artifacts, bundle
from lineclip.bundle import TRAINING_STATE
from lineclip.checkpoint import checkpoint_steps

CKPT = "checkpoint_step_0000030_"
STATE_FILES = ("model.safetensors", "optimizer.pt", "rng_state_0.pt", "scheduler.json", "trainer_state.json")


# --------------------------------------------------------------------------------------------------- helpers


class Marker:
    """Unpickling this creates the file `path` (`open(path, "w")`): proof that checkpoint code ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def payload(marker: Path, zipped: bool) -> bytes:
    """A pickle that runs code when loaded: raw (`pickle.dumps`) or in torch.save's zip format."""
    blob = {"state": Marker(marker), "step": 30}
    if not zipped:
        return pickle.dumps(blob)
    buffer = io.BytesIO()
    torch.save(blob, buffer)
    return buffer.getvalue()


def plant(path: Path, marker: Path) -> None:
    path.write_bytes(payload(marker, zipped=path.suffix in (".pt", ".bin")))


def tree(root: Path) -> dict[str, str]:
    """Every path under `root` (hidden ones too) with a hash of its content: a refused command leaves it equal."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = "<dir>" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def compose(config_name: str, overrides: list[str]) -> Any:
    extra = [] if config_name == "train" else ["progress=false"]
    return compose_cfg(*overrides, *extra, config_name=config_name)


def replay(command: str, overrides: list[str]) -> tuple[int, list[str]]:
    """Run a command in-process as its CLI does (same config composition, same error handler): (exit status,
    the error lines logged)."""
    fn: Callable[[Any], Any]
    if command == "train":
        from lineclip.train import run as fn
    elif command == "evaluate":
        from lineclip.evaluate import evaluate as fn
    elif command == "index":
        from lineclip.index import build as fn
    else:
        from lineclip.search import search as fn
    return run_capturing_errors(fn, compose(command, overrides))


def one_error(status: int, errors: list[str]) -> str:
    assert status == 2 and len(errors) == 1 and "\n" not in errors[0], (status, errors)
    return errors[0]


def train_args(data: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["data=openpecha", f"data.dataset_dir={data['root']}", f"data.train_manifest={data['train']}",
            f"data.val_manifest={data['train']}", "data.num_workers=0", "trainer.progress_bar=false",
            *TRAIN_OVERRIDES, f"output_dir={out}", *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return overfit_run(tmp_path_factory)


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "MARKER"
    yield path
    assert not path.exists(), "code from a checkpoint ran"


def copy_run(run: Path, target: Path) -> Path:
    shutil.copytree(run, target, ignore=shutil.ignore_patterns("index_*", "eval_*", "search_*"))
    return target


@pytest.fixture(scope="module")
def planted(trained, tmp_path_factory):
    """A copy of the run whose training state has the marker pickle in every file, plus accelerate's legacy pickle
    files (which lineclip must never open either)."""
    run, data = trained
    root = tmp_path_factory.mktemp("planted")
    copy = copy_run(run, root / "run")
    marker = root / "MARKER"
    state = copy / f"{CKPT}{TRAINING_STATE}"
    assert sorted(p.name for p in state.iterdir()) == sorted(STATE_FILES)
    for name in (*STATE_FILES, "custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin",
                 "pytorch_model.bin"):
        plant(state / name, marker)
    return copy, data, marker


# ------------------------------------------------------------------------------------ F1: nothing executes


def test_the_marker_payload_is_live(tmp_path):
    """The planted bytes do run code when loaded the unsafe way, so the tests below prove something."""
    marker = tmp_path / "m"
    pickle.loads(payload(marker, zipped=False))
    assert marker.exists()
    marker.unlink()
    torch.load(io.BytesIO(payload(marker, zipped=True)), weights_only=False)
    assert marker.exists()


def test_resume_from_a_planted_state_runs_nothing(planted):
    run, data, marker = planted
    before = tree(run)
    status, errors = replay("train", train_args(data, run, "trainer.resume=latest"))
    line = one_error(status, errors)
    assert "refusing" in line and f"{CKPT}{TRAINING_STATE}" in line
    assert not marker.exists() and tree(run) == before


@pytest.mark.parametrize("name", [*STATE_FILES, "legacy"])
def test_each_refused_file_is_named(trained, tmp_path, marker, name):
    run, data = trained
    copy = copy_run(run, tmp_path / "run")
    state = copy / f"{CKPT}{TRAINING_STATE}"
    if name == "legacy":  # accelerate's own layout, as lineclip wrote it before: pickles only
        (state / "model.safetensors").unlink()
        for legacy in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin"):
            plant(state / legacy, marker)
    else:
        plant(state / name, marker)
    before = tree(copy)
    line = one_error(*replay("train", train_args(data, copy, "trainer.resume=latest")))
    if name == "legacy":
        assert "has no model.safetensors" in line and "custom_checkpoint_0.pkl" in line and "pickle" in line
    else:
        assert f"refusing {state / name}" in line
    if name == "rng_state_0.pt":
        assert "trainer.resume_strict=false" in line
    assert tree(copy) == before


@pytest.mark.parametrize("change,expected", [
    ({"corrupt_indices": [999]}, "corrupt_indices outside this run's 8 train lines"),
    ({"step": "30"}, "step, epoch and batches_done_in_epoch must be integers"),
    ({"evil": 1}, "unknown key(s) evil"),
    # issue 26 item 1: a loop position that is not its checkpoint's, or outside the run's epoch
    ({"step": 10**30}, "step 1000000000000000000000000000000 is not the step 30 of its checkpoint"),
    ({"step": -5}, "step -5 is not the step 30 of its checkpoint"),
    ({"step": True}, "step, epoch and batches_done_in_epoch must be integers"),
    ({"batches_done_in_epoch": -4}, "batches_done_in_epoch -4 is not within this run's 1 batches an epoch"),
    ({"batches_done_in_epoch": 10**12}, "batches_done_in_epoch 1000000000000 is not within"),
    ({"epoch": 10**30}, "epoch 1000000000000000000000000000000 is not within 0..31"),
    ({"bad_steps": 10**9}, "bad_steps 1000000000 is more than 30 steps can have skipped"),
    # issue 22 item 11: fields of the wrong type, caught at resume rather than at the first step or checkpoint
    ({"val_history": "abc"}, "val_history must be a list"),
    ({"checkpoints": "abc"}, "corrupt_indices and checkpoints must be lists of integers"),
    ({"checkpoints": [10, 99]}, "checkpoints must be ascending steps in 1..30"),
    ({"val_metrics": {"val_t2i_r1": "high"}}, "val_metrics must map names to numbers"),
    ({"wandb_run_id": "../../x"}, "wandb_run_id must be null or a W&B run id"),
])
def test_a_damaged_trainer_state_is_one_line(trained, tmp_path, change, expected):
    run, data = trained
    copy = copy_run(run, tmp_path / "run")
    path = copy / f"{CKPT}{TRAINING_STATE}" / "trainer_state.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    before = tree(copy)
    line = one_error(*replay("train", train_args(data, copy, "trainer.resume=latest")))
    assert expected in line and str(path) in line and tree(copy) == before


@pytest.mark.slow
def test_a_refused_rng_state_resumes_only_when_not_strict(trained, tmp_path, marker, caplog):
    run, data = trained
    copy = copy_run(run, tmp_path / "run")
    plant(copy / f"{CKPT}{TRAINING_STATE}" / "rng_state_0.pt", marker)
    with caplog.at_level(logging.WARNING, logger="lineclip"):
        status, errors = replay("train", train_args(data, copy, "trainer.resume=latest", "trainer.max_steps=31",
                                                    "trainer.resume_strict=false"))
    assert (status, errors) == (0, [])
    assert any("rng_state_0.pt" in r.getMessage() and "not reproducible" in r.getMessage() for r in caplog.records)
    assert json.loads((copy / artifacts.CONFIG).read_text())["global_step"] == 31


@pytest.mark.slow
def test_init_from_evaluate_index_search_never_open_the_training_state(planted, tmp_path):
    run, data, marker = planted
    before = tree(run)
    out = tmp_path / "init"
    status, errors = replay("train", train_args(data, out, f"model.init_from={run / CKPT}", "trainer.max_steps=1",
                                                "trainer.export_embeddings=false"))
    assert (status, errors) == (0, [])
    bundle = f"run_dir={run / CKPT}{TRAINING_STATE}"  # a training state's path names its checkpoint bundle
    assert replay("evaluate", [bundle, f"manifest={data['eval']}", f"eval.output={tmp_path / 'e.json'}"]) == (0, [])
    assert json.loads((tmp_path / "e.json").read_text())["bundle"]["prefix"] == CKPT
    assert replay("index", [f"run_dir={run}", f"manifest={data['eval']}",
                            f"index.output={tmp_path / 'idx'}"]) == (0, [])
    assert replay("search", [f"run_dir={run}", f"corpus={tmp_path / 'idx'}", "query=ཀ",
                             f"search.output={tmp_path / 's.html'}"]) == (0, [])
    assert replay("search", [f"run_dir={run}", "query=ཀ", f"search.output={tmp_path / 's2.html'}"]) == (0, [])
    assert not marker.exists() and tree(run) == before


@pytest.mark.parametrize("command", ["train", "evaluate", "search"])
def test_planted_heads_are_refused_in_one_line(trained, tmp_path, marker, command):
    run, data = trained
    copy = copy_run(run, tmp_path / "run")
    for prefix in ("", CKPT):
        plant(copy / f"{prefix}{artifacts.IMAGE_HEAD}", marker)
    before = tree(copy)
    if command == "train":
        args = train_args(data, tmp_path / "new", f"model.init_from={copy / CKPT}", "trainer.max_steps=1")
    elif command == "evaluate":
        args = [f"run_dir={copy}", f"manifest={data['eval']}", f"eval.output={tmp_path / 'e.json'}"]
    else:
        args = [f"run_dir={copy}", "query=ཀ", f"search.output={tmp_path / 's.html'}"]
    line = one_error(*replay(command, args))
    assert artifacts.IMAGE_HEAD in line
    assert tree(copy) == before and not (tmp_path / "e.json").exists() and not (tmp_path / "s.html").exists()


# ---------------------------------------------------------------------------------- F2, F6: outputs refused


@pytest.mark.parametrize("command,option,target,expected", [
    ("index", "index.output", "", "training run dir"),
    ("index", "index.output", f"{CKPT}{TRAINING_STATE}", "belongs to the run"),
    ("index", "index.output", "text_hierarchy_vit_backbone", "belongs to the run"),
    ("search", "search.output", "training_config.json", "belongs to the run"),
    ("search", "search.output", "faiss_embeddings.npy", "belongs to the run"),
    ("search", "search.output", ".hydra/config.yaml", "belongs to the run"),
    ("search", "search.output", "", "training run dir"),
    ("evaluate", "eval.output", "text_hierarchy_clip_text_encoder/config.json", "belongs to the run"),
    ("evaluate", "eval.output", f"{CKPT}training_config.json", "belongs to the run"),
    ("evaluate", "eval.output", "MANIFEST", "inputs"),
])
def test_outputs_refuse_a_runs_own_files(trained, tmp_path, command, option, target, expected):
    run, data = trained
    copy = copy_run(run, tmp_path / "run")
    before = tree(copy)
    manifest = tmp_path / "lines.jsonl"
    shutil.copy(data["eval"], manifest)
    path = manifest if target == "MANIFEST" else copy / target
    args = {"index": [f"manifest={manifest}", f"dataset_dir={data['root']}", "index.overwrite=true"],
            "search": ["query=ཀ"], "evaluate": [f"manifest={manifest}", f"dataset_dir={data['root']}"]}[command]
    line = one_error(*replay(command, [f"run_dir={copy}", *args, f"{option}={path}"]))
    assert expected in line and option in line
    assert tree(copy) == before and manifest.read_bytes() == data["eval"].read_bytes()


def test_index_overwrite_replaces_only_an_index_dir(trained, tmp_path):
    run, data = trained
    other = tmp_path / "not_an_index"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    line = one_error(*replay("index", [f"run_dir={run}", f"manifest={data['eval']}", f"index.output={other}",
                                       "index.overwrite=true"]))
    assert "not a lineclip.index corpus dir" in line and (other / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------------- F3: a used dir


@pytest.mark.slow
def test_a_new_run_into_a_used_dir_needs_resume_or_overwrite(trained, tmp_path):
    run, data = trained
    copy = copy_run(run, tmp_path / "run")
    before = tree(copy)
    line = one_error(*replay("train", train_args(data, copy)))
    assert "already holds a run" in line and "trainer.overwrite=true" in line and tree(copy) == before
    line = one_error(*replay("train", train_args(data, copy, "trainer.resume=latest", "trainer.overwrite=true")))
    assert "contradict" in line and tree(copy) == before
    assert replay("train", train_args(data, copy, "trainer.overwrite=true", "trainer.max_steps=2",
                                      "trainer.checkpoint_every_steps=1")) == (0, [])
    assert checkpoint_steps(copy) == [1] and not list(copy.glob(f"{CKPT}*"))  # nothing of the old run is left
    config = json.loads((copy / artifacts.CONFIG).read_text())
    assert config["global_step"] == 2 and config["corpus"]["n_lines"] == 8
    # a run dir holding a finished run but no checkpoint: latest has nothing to continue
    for path in copy.glob("checkpoint_step_*"):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    before = tree(copy)
    line = one_error(*replay("train", train_args(data, copy, "trainer.resume=latest")))
    assert "no complete checkpoint" in line and tree(copy) == before


# ------------------------------------------------------------------------------- F4: all or nothing, fingerprint


@pytest.mark.slow
def test_a_final_save_failing_midway_leaves_no_mixed_run(trained, tmp_path, monkeypatch):
    run, data = trained
    copy = copy_run(run, tmp_path / "run")
    original = Path.rename

    def full_disk(self, target):
        if Path(target) == copy / artifacts.TEXT_ENCODER:  # after the new corpus and the image tower went in
            raise OSError(errno.ENOSPC, "No space left on device", str(target))
        return original(self, target)

    monkeypatch.setattr(Path, "rename", full_disk)
    line = one_error(*replay("train", train_args(data, copy, "trainer.resume=latest", "trainer.max_steps=31")))
    monkeypatch.setattr(Path, "rename", original)
    assert "No space left on device" in line
    assert not list(copy.glob(".staging_*")) and not (copy / artifacts.CONFIG).exists()
    line = one_error(*replay("search", [f"run_dir={copy}", "query=ཀ", f"search.output={tmp_path / 's.html'}"]))
    assert "no lineclip bundle" in line or "incomplete bundle" in line
    from lineclip.corpus import Corpus, CorpusError

    with pytest.raises(CorpusError, match="interrupted save"):
        Corpus.load(copy)


def test_search_refuses_a_corpus_embedded_by_another_model(trained, tmp_path):
    run, _ = trained
    copy = copy_run(run, tmp_path / "run")
    for head in (artifacts.IMAGE_HEAD, artifacts.TEXT_HEAD):  # the checkpoint's model beside the final corpus
        shutil.copy(copy / f"{CKPT}{head}", copy / head)
    before = tree(copy)
    line = one_error(*replay("search", [f"run_dir={copy}", "query=ཀ", f"search.output={tmp_path / 's.html'}"]))
    assert "embedded by another model" in line and tree(copy) == before
    recorded = json.loads((run / artifacts.CONFIG).read_text())["corpus"]
    assert recorded["n_lines"] == 8 and recorded["fingerprint"] == bundle.model_fingerprint(bundle.resolve_bundle(run))


def test_a_run_trained_without_export_has_no_corpus(trained, tmp_path):
    run, _ = trained
    copy = copy_run(run, tmp_path / "run")
    config = json.loads((copy / artifacts.CONFIG).read_text())
    (copy / artifacts.CONFIG).write_text(json.dumps({**config, "corpus": None}))
    line = one_error(*replay("search", [f"run_dir={copy}", "query=ཀ", f"search.output={tmp_path / 's.html'}"]))
    assert "export_embeddings=false" in line


# ------------------------------------------------------------------------------------------ F5: input


def test_lone_surrogates_are_counted_bad_rows(trained, tmp_path):
    run, data = trained
    rows = [json.loads(x) for x in data["eval"].read_text(encoding="utf-8").splitlines()]
    lines = [json.dumps(r, ensure_ascii=True) for r in rows]
    lines[2] = lines[2].replace('"text": "', '"text": "\\ud800', 1)
    lines[3] = re.sub(r'"id": "', '"id": "\\\\udfff', lines[3], count=1)
    assert "\\ud800" in lines[2] and "\\udfff" in lines[3]
    manifest = tmp_path / "eval" / "meta" / "lines.jsonl"
    manifest.parent.mkdir(parents=True)
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert replay("evaluate", [f"run_dir={run}", f"manifest={manifest}", f"dataset_dir={data['root']}",
                               f"eval.output={tmp_path / 'e.json'}"]) == (0, [])
    report = json.loads((tmp_path / "e.json").read_text())["manifest_report"]
    assert report["skipped"]["invalid_unicode"] == 2 and report["rows_used"] == len(rows) - 2
    assert report["first_bad"]["invalid_unicode"] == f"{manifest}:3"
    line = one_error(*replay("evaluate", [f"run_dir={run}", f"manifest={manifest}", f"dataset_dir={data['root']}",
                                          "on_bad_row=error", f"eval.output={tmp_path / 'e2.json'}"]))
    assert f"{manifest}:3: invalid_unicode" in line and not (tmp_path / "e2.json").exists()


def test_sixteen_bit_images_keep_their_grey_levels(tmp_path):
    from lineclip.preprocess import LineGeometry, LineImageTransform, load_image, to_8bit

    ramp16 = np.tile(np.linspace(0, 65535, 280).astype(np.uint16), (56, 1))
    Image.fromarray(ramp16).save(tmp_path / "ramp16.png")
    image = load_image(tmp_path / "ramp16.png")
    assert image.mode == "I;16"
    eight = np.asarray(to_8bit(image))
    assert eight.dtype == np.uint8 and len(np.unique(eight)) > 250  # PIL's convert("L") leaves 2 levels
    np.testing.assert_array_equal(eight, np.rint(ramp16 / 257).astype(np.uint8))
    transform = LineImageTransform("none", LineGeometry(56, 1024, (280,), 14))
    reference = transform(Image.fromarray(np.rint(ramp16 / 257).astype(np.uint8)))
    torch.testing.assert_close(transform(image), reference)
    assert len(torch.unique(transform(image)[0])) > 250


def _demo_line() -> Image.Image:
    from lineclip.config import asset_dir

    rows = (asset_dir("demo") / "train" / "meta" / "lines.jsonl").read_text().splitlines()
    with Image.open(asset_dir("demo") / json.loads(rows[0])["line_path"]) as image:
        return image.convert("RGB").crop((0, 0, 300, image.height))


def test_exif_orientation_is_applied_alike_in_training_encoding_and_thumbnails(trained, tmp_path):
    from lineclip import load_encoder
    from lineclip.batch import LineDataset
    from lineclip.lines import LineRecord
    from lineclip.preprocess import LineImageTransform, image_size
    from lineclip.search import _thumbnail_src

    upright = _demo_line()
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the pixels are stored turned the other way
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    stored.save(tmp_path / "turned.png", exif=exif.tobytes())
    upright.save(tmp_path / "upright.png")
    assert Image.open(tmp_path / "turned.png").size == (upright.height, upright.width)
    assert image_size(tmp_path / "turned.png") == upright.size

    transform = LineImageTransform("bdrc")
    records = [LineRecord(s, str(tmp_path / f"{s}.png"), "x") for s in ("turned", "upright")]
    dataset = LineDataset(records, transform)
    assert dataset.buckets[0] == dataset.buckets[1] and not dataset.image_problems
    torch.testing.assert_close(dataset[0]["pixel_values"], dataset[1]["pixel_values"])

    encoder = load_encoder(trained[0], device="cpu")
    emb = encoder.encode_images([str(tmp_path / "turned.png"), str(tmp_path / "upright.png")])
    np.testing.assert_allclose(emb[0], emb[1], atol=1e-5)

    src = _thumbnail_src(str(tmp_path / "turned.png"), type("O", (), {"thumbnails": True, "thumb_width": 1200,
                                                                        "thumb_height": 64})())
    thumb = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    assert thumb.width > thumb.height  # shown as a line, as the model saw it


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height (8-bit grey) but holds almost no data: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + \
        chunk(b"IEND", b"")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL's own, milder limit (89 M)
def test_a_pixel_bomb_is_a_counted_skip_before_decoding(trained, tmp_path):
    from lineclip import load_encoder
    from lineclip.batch import LineDataset
    from lineclip.lines import LineRecord
    from lineclip.preprocess import LineImageTransform, TooManyPixels, image_size

    (tmp_path / "bomb.png").write_bytes(png_header(13000, 13000))
    _demo_line().save(tmp_path / "ok.png")
    with pytest.raises(TooManyPixels, match="169000000 pixels > data.max_image_pixels=40000000"):
        image_size(tmp_path / "bomb.png")
    records = [LineRecord(s, str(tmp_path / f"{s}.png"), "x") for s in ("bomb", "ok")]
    dataset = LineDataset(records, LineImageTransform("bdrc"))
    assert dataset.image_problems == {0: "too_large_image"} and dataset.buckets[0] == -1
    small = LineDataset(records[1:], LineImageTransform("bdrc"), max_image_pixels=1000)
    assert small.image_problems == {0: "too_large_image"}
    encoder = load_encoder(trained[0], device="cpu")
    embeddings, kept = encoder.encode_image_files([r.image_path for r in records])
    assert kept.tolist() == [1] and embeddings.shape == (1, encoder.dim)


@pytest.fixture
def alarm():
    """A regression (a read that blocks on a FIFO) fails the test instead of hanging the suite."""
    def timeout(signum, frame):  # noqa: ARG001
        raise TimeoutError("blocked on a non-regular file")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_fifos_and_devices_are_refused_before_they_are_opened(trained, tmp_path, alarm):
    from lineclip.batch import LineDataset
    from lineclip.lines import LineRecord
    from lineclip.preprocess import LineImageTransform, NotARegularFile, image_size, load_image

    run, _ = trained
    fifo = tmp_path / "line.png"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/zero")):
        with pytest.raises(NotARegularFile):
            image_size(path)
        with pytest.raises(NotARegularFile):
            load_image(path)
    dataset = LineDataset([LineRecord("f", str(fifo), "x")], LineImageTransform("bdrc"))
    assert dataset.image_problems == {0: "unreadable_image"}
    for query in (fifo, "/dev/zero"):
        line = one_error(*replay("search", [f"run_dir={run}", f"query_image={query}",
                                            f"search.output={tmp_path / 'q.html'}"]))
        assert "is not a file" in line
    # a corpus whose meta points every line at the FIFO: the page says so instead of hanging
    copy = copy_run(run, tmp_path / "run")
    meta = pd.read_parquet(copy / artifacts.EMBEDDINGS_META)
    meta["image_path"] = str(fifo)
    meta.to_parquet(copy / artifacts.EMBEDDINGS_META, index=False)
    assert replay("search", [f"run_dir={copy}", "query=ཀ", f"search.output={tmp_path / 's.html'}"]) == (0, [])
    assert "image not readable" in (tmp_path / "s.html").read_text()


@pytest.mark.parametrize("where", ["config", "head", "backbone_file", "embeddings", "trainer_state", "rng"])
def test_fifos_in_a_bundle_corpus_or_training_state_are_refused(trained, tmp_path, alarm, where):
    run, data = trained
    copy = copy_run(run, tmp_path / "run")
    target = {"config": copy / artifacts.CONFIG, "head": copy / artifacts.TEXT_HEAD,
              "backbone_file": copy / artifacts.BACKBONE / "config.json",
              "embeddings": copy / artifacts.EMBEDDINGS,
              "trainer_state": copy / f"{CKPT}{TRAINING_STATE}" / "trainer_state.json",
              "rng": copy / f"{CKPT}{TRAINING_STATE}" / "rng_state_0.pt"}[where]
    target.unlink()
    os.mkfifo(target)
    before = tree_without_fifos(copy)
    if where in ("trainer_state", "rng"):
        line = one_error(*replay("train", train_args(data, copy, "trainer.resume=latest")))
    else:
        line = one_error(*replay("search", [f"run_dir={copy}", "query=ཀ", f"search.output={tmp_path / 's.html'}"]))
    assert target.name in line and ("not a regular file" in line)
    assert tree_without_fifos(copy) == before


def tree_without_fifos(root: Path) -> dict[str, str]:
    """`tree`, reading no FIFO."""
    out = {}
    for path in sorted(root.rglob("*")):
        kind = "<dir>" if path.is_dir() else "<fifo>" if path.is_fifo() else None
        out[str(path.relative_to(root))] = kind or hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.mark.parametrize("override,expected", [
    ("optim.lr=nan", "optim.lr must be > 0"),
    ("optim.lr=inf", "optim.lr must be a finite number"),
    ("optim.weight_decay=nan", "optim.weight_decay must be a finite number"),
    ("optim.grad_clip=nan", "optim.grad_clip must be a finite number"),
    ("optim.grad_clip=-1", "optim.grad_clip must be >= 0"),
    ("optim.eps=-1", "optim.eps must be > 0"),
    ("optim.betas=[2,3]", "optim.betas must be two numbers in [0, 1)"),
    ("optim.betas=[0.9]", "optim.betas must be two numbers in [0, 1)"),
    ("optim.min_lr_ratio=2", "optim.min_lr_ratio must be in [0, 1]"),
    ("loss.max_logit_scale=-1", "loss.max_logit_scale must be > 0"),
    ("loss.temperature=inf", "loss.temperature must be a finite number"),
    ("trainer.log_every_steps=0", "trainer.log_every_steps must be >= 1"),
    ("preprocess.width_buckets=[-5]", "preprocess.width_buckets must be positive"),
    ("data.max_image_pixels=0", "data.max_image_pixels must be > 0 or null"),
    ("model.head_lr_multiplier=nan", "model.head_lr_multiplier must be a finite number"),
])
def test_bad_config_values_are_one_line_before_anything_is_written(trained, tmp_path, override, expected):
    _, data = trained
    out = tmp_path / "run"
    line = one_error(*replay("train", train_args(data, out, override)))
    assert line.startswith(expected) and not out.exists()


# ------------------------------------------------------------------------------------------- I/O errors


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_leaves_no_staging_dir(trained, tmp_path):
    """RLIMIT_FSIZE makes every write past 300 kB fail with EFBIG, as a full disk fails with ENOSPC (Python
    ignores SIGXFSZ): the first checkpoint's training state cannot be written."""
    import resource

    _, data = trained
    out = tmp_path / "run"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))

    args = [sys.executable, "-m", "lineclip.train", *train_args(data, out)[:-1], f"hydra.run.dir={out}",
            "trainer.max_steps=2", "trainer.checkpoint_every_steps=1"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, preexec_fn=limit,
                          env={**os.environ, "WANDB_MODE": "disabled"})
    output = proc.stdout + proc.stderr  # Hydra's console log goes to stdout
    errors = [line for line in output.splitlines() if "[ERROR]" in line]
    assert proc.returncode == 2 and len(errors) == 1, output[-3000:]
    assert "File too large" in errors[0] and "Traceback" not in output
    assert not list(out.glob(".staging_*")) and checkpoint_steps(out) == []


@pytest.mark.parametrize("command", ["index", "evaluate"])
def test_a_full_disk_under_index_and_evaluate_is_one_line(trained, tmp_path, monkeypatch, command):
    import lineclip.cli
    import lineclip.corpus

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    run, data = trained
    if command == "index":
        monkeypatch.setattr(lineclip.corpus.EmbeddingPart, "append", no_space)  # the first rows written
        args = [f"manifest={data['eval']}", f"index.output={tmp_path / 'out' / 'idx'}"]
    else:
        monkeypatch.setattr(lineclip.cli.Path, "write_text", no_space)
        args = [f"manifest={data['eval']}", f"eval.output={tmp_path / 'out' / 'e.json'}"]
    line = one_error(*replay(command, [f"run_dir={run}", *args]))
    assert "No space left on device" in line
    assert list((tmp_path / "out").iterdir()) == []  # no staging dir, no temporary file, no output


def test_a_read_only_run_dir_is_one_line_before_the_model_is_built(trained, tmp_path, monkeypatch):
    _, data = trained
    out = tmp_path / "run"
    out.mkdir()
    if os.geteuid() == 0:  # root writes into a 0555 dir: make the write fail as the kernel would for others
        original = Path.write_bytes

        def read_only(self, data):
            if self.parent == out:
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            return original(self, data)

        monkeypatch.setattr(Path, "write_bytes", read_only)
    out.chmod(0o555)
    try:
        line = one_error(*replay("train", train_args(data, out)))
    finally:
        out.chmod(0o755)
    assert "is not writable" in line and "Permission denied" in line and list(out.iterdir()) == []


# ----------------------------------------------------------------------------------------- bad corpora


@pytest.fixture(scope="module")
def hnsw_corpus(trained, tmp_path_factory):
    run, data = trained
    out = tmp_path_factory.mktemp("corpora") / "hnsw"
    assert replay("index", [f"run_dir={run}", f"manifest={data['eval']}", f"index.output={out}",
                            "index.kind=hnsw"]) == (0, [])
    return out


@pytest.mark.parametrize("damage,expected", [
    ("index_dim", "indexes 8-dim vectors"),
    ("info_list", "corpus.json does not hold a JSON object"),
    ("info_kind", "has kind"),
    ("info_n_lines", "non-integer n_lines"),
    ("info_dim", "says dim 3"),
])
def test_damaged_corpora_are_one_line(trained, hnsw_corpus, tmp_path, damage, expected):
    import faiss

    run, _ = trained
    corpus = tmp_path / "corpus"
    shutil.copytree(hnsw_corpus, corpus)
    info = json.loads((corpus / "corpus.json").read_text())
    if damage == "index_dim":
        other = faiss.IndexHNSWFlat(8, 4, faiss.METRIC_INNER_PRODUCT)
        other.add(np.random.default_rng(0).standard_normal((info["n_lines"], 8)).astype(np.float32))
        faiss.write_index(other, str(corpus / "index.faiss"))
    elif damage == "info_list":
        (corpus / "corpus.json").write_text("[1]")
    else:
        key, value = {"info_kind": ("kind", ["flat"]), "info_n_lines": ("n_lines", "12"),
                      "info_dim": ("dim", 3)}[damage]
        (corpus / "corpus.json").write_text(json.dumps({**info, key: value}))
    before = tree(corpus)
    line = one_error(*replay("search", [f"run_dir={run}", f"corpus={corpus}", "query=ཀ",
                                        f"search.output={tmp_path / 's.html'}"]))
    assert expected in line and tree(corpus) == before and not (tmp_path / "s.html").exists()


def test_a_training_set_whose_every_image_fails_to_decode_stops_with_one_line(tmp_path):
    """Headers read (so the lines pass the scan) but no pixels decode: every batch is skipped as corrupt, and an
    epoch that trains nothing would repeat forever. The run stops at the end of the first such epoch instead."""
    data = make_dataset(tmp_path / "data")
    for image in (tmp_path / "data" / "train" / "lines").iterdir():
        blob = image.read_bytes()
        image.write_bytes(blob[: len(blob) // 3])  # a JPEG cut short: its header is whole, its pixels are not
    line = one_error(*replay("train", train_args(data, tmp_path / "run", "trainer.max_steps=5")))
    assert line.startswith("epoch 0 had no line image that decodes (8 of 8 train lines are corrupt_image)"), line


def test_a_refused_run_leaves_the_record_of_the_run_it_found(trained, tmp_path):
    """A second `python -m lineclip.train` into a finished run's dir is refused; before, Hydra had already rewritten
    that run's .hydra/ (config, overrides) with the refused command's. Now the trainer writes .hydra/ only once the
    dir is accepted."""
    run, data = trained
    copy = copy_run(run, tmp_path / "run")
    record = {p.name: p.read_bytes() for p in (copy / ".hydra").iterdir()}
    assert set(record) == {"config.yaml", "hydra.yaml", "overrides.yaml"}  # written for the run that trained there
    assert b"trainer.max_steps=60" in record["overrides.yaml"]
    proc = subprocess.run([sys.executable, "-m", "lineclip.train", *train_args(data, copy)[:-1], "optim.lr=0.5",
                           f"hydra.run.dir={copy}"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "WANDB_MODE": "disabled"})
    assert proc.returncode == 2 and "already holds a run" in proc.stdout + proc.stderr, proc.stderr[-2000:]
    assert {p.name: p.read_bytes() for p in (copy / ".hydra").iterdir()} == record


# ------------------------------------------------------------------------- round 3 (issue 22, issue 26 item 6)


def test_two_runs_into_one_dir_the_second_is_refused_and_a_crash_leaves_no_claim(tmp_path):
    """Run A (a real `python -m lineclip.train`) is stopped (SIGSTOP) right after it claimed the dir; run B into the
    same dir, this process, is refused before it reads, writes or removes anything, with or without overwrite.
    Then A is killed (SIGKILL: a crash, no cleanup of its own): the kernel releases its claim and run C, with
    overwrite, trains there."""
    import time

    data = make_dataset(tmp_path / "data")
    out = tmp_path / "run"
    args = [sys.executable, "-m", "lineclip.train", *train_args(data, out)[:-1], f"hydra.run.dir={out}",
            "trainer.max_steps=4", "trainer.checkpoint_every_steps=2", "trainer.seed=1"]
    with open(tmp_path / "a.log", "w") as log:
        run_a = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                 env={**os.environ, "WANDB_MODE": "disabled"})
    try:
        deadline = time.monotonic() + 300
        # .hydra/config.yaml is written only once the dir is claimed (lineclip.trainer.setup_run)
        while not (out / ".hydra" / "config.yaml").exists() and run_a.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        run_a.send_signal(signal.SIGSTOP)
        assert run_a.poll() is None, (tmp_path / "a.log").read_text()[-3000:]
        before = tree(out)
        for extra in ((), ("trainer.overwrite=true",)):
            line = one_error(*replay("train", train_args(data, out, "trainer.seed=2", *extra)))
            assert f"is in use by another lineclip.train (pid {run_a.pid})" in line and artifacts.RUN_LOCK in line
            assert tree(out) == before
    finally:
        run_a.kill()
        run_a.wait(timeout=60)
    assert (out / artifacts.RUN_LOCK).exists()  # the lock file stays; its flock died with the process
    assert replay("train", train_args(data, out, "trainer.seed=2", "trainer.overwrite=true", "trainer.max_steps=2",
                                      "trainer.export_embeddings=false")) == (0, [])
    config = json.loads((out / artifacts.CONFIG).read_text())
    assert config["global_step"] == 2 and config["seed"] == 2
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 2  # nothing of run A's steps 3-4


def test_a_finished_run_releases_its_dir(trained, tmp_path):
    """The claim is the run's, not the dir's: a run that ended (here in this process) leaves the dir free, so
    resume continues it at once; the lock file holds no data (the tree compare stays exact)."""
    import fcntl

    run, _ = trained
    lock = run / artifacts.RUN_LOCK
    assert lock.read_bytes() == b""
    with open(lock, "r+b") as handle:
        fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the subprocess that trained it has released it


def corpus_copy(hnsw_corpus: Path, target: Path) -> Path:
    shutil.copytree(hnsw_corpus, target)
    return target


@pytest.mark.parametrize("extra", ["file", "dir", "no_record"])
def test_index_overwrite_replaces_only_what_lineclip_index_wrote(trained, hnsw_corpus, tmp_path, extra):
    run, data = trained
    corpus = corpus_copy(hnsw_corpus, tmp_path / "corpus")
    if extra == "file":
        (corpus / "notes.txt").write_text("mine")
    elif extra == "dir":
        (corpus / "photos").mkdir()
        (corpus / "photos" / "a.jpg").write_bytes(b"x")
    else:  # a dir that merely holds a file named corpus.json
        for path in corpus.iterdir():
            path.unlink()
        (corpus / "corpus.json").write_text('{"mine": true}')
        (corpus / "thesis.tex").write_text("keep")
    before = tree(corpus)
    line = one_error(*replay("index", [f"run_dir={run}", f"manifest={data['eval']}", f"index.output={corpus}",
                                       "index.overwrite=true"]))
    assert "index.output" in line and "refusing to replace it" in line and tree(corpus) == before
    if extra == "file":
        assert "notes.txt" in line
        (corpus / "notes.txt").unlink()  # as lineclip.index left it: replaced
        assert replay("index", [f"run_dir={run}", f"manifest={data['eval']}", f"index.output={corpus}",
                                "index.overwrite=true"]) == (0, [])
        assert json.loads((corpus / "corpus.json").read_text())["kind"] == "flat"


@pytest.fixture(scope="module")
def shard_dir(trained, tmp_path_factory):
    from lineclip.shard import write_shards

    _, data = trained
    out = tmp_path_factory.mktemp("shards") / "train"
    write_shards(data["train"], out, shard_size=3, dataset_dir=str(data["root"]), progress=False)
    return out


def test_shard_overwrite_replaces_only_what_lineclip_shard_wrote(trained, shard_dir, tmp_path):
    from lineclip.shard import build

    _, data = trained
    target = tmp_path / "shards"
    shutil.copytree(shard_dir, target)
    (target / "mine.txt").write_text("keep")
    before = tree(target)
    args = [f"manifest={data['train']}", f"out_dir={target}", f"dataset_dir={data['root']}", "overwrite=true"]
    line = one_error(*run_capturing_errors(build, compose("shard", args)))
    assert "mine.txt" in line and "refusing to replace it" in line and tree(target) == before
    (target / "mine.txt").unlink()
    assert run_capturing_errors(build, compose("shard", [*args, "shard_size=4"])) == (0, [])
    assert json.loads((target / "shards.json").read_text())["shard_size"] == 4


@pytest.mark.parametrize("command", ["search", "evaluate"])
def test_outputs_replace_only_files_lineclip_wrote(trained, tmp_path, command):
    run, data = trained
    name, option = ("s.html", "search.output") if command == "search" else ("e.json", "eval.output")
    target = tmp_path / name
    args = ["query=ཀ"] if command == "search" else [f"manifest={data['eval']}", f"dataset_dir={data['root']}"]
    for foreign in (b"<html>my notes</html>", b'{"mine": 1}', b""):
        target.write_bytes(foreign)
        line = one_error(*replay(command, [f"run_dir={run}", *args, f"{option}={target}"]))
        assert f"{option}={target} exists and is not a lineclip" in line and target.read_bytes() == foreign
    target.unlink()
    assert replay(command, [f"run_dir={run}", *args, f"{option}={target}"]) == (0, [])
    os.utime(target, (0, 0))  # (the page's own timestamp has one-second resolution: two runs can share it)
    assert replay(command, [f"run_dir={run}", *args, f"{option}={target}"]) == (0, [])  # its own: replaced
    assert target.stat().st_mtime > 0


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_val_header_past_every_limit_is_counted_not_re_read(tmp_path):
    """A 69-byte PNG claiming 2147483647 x 1 pixels in the val manifest: the header scan counts it
    (too_large_image) and validation's length level reuses the scan's sizes instead of opening it again."""
    data = make_dataset(tmp_path / "data")
    (tmp_path / "data" / "eval" / "lines" / "bomb.png").write_bytes(png_header(2147483647, 1))
    rows = data["eval"].read_text().splitlines()
    rows.append(json.dumps({**json.loads(rows[-1]), "id": "bomb", "line_path": "eval/lines/bomb.png"}))
    data["eval"].write_text("\n".join(rows) + "\n")
    args = [*train_args(data, tmp_path / "run", "trainer.max_steps=1", "trainer.export_embeddings=false")]
    args[3] = f"data.val_manifest={data['eval']}"
    assert replay("train", args) == (0, [])
    skipped = json.loads((tmp_path / "run" / artifacts.DATA_REPORT).read_text())["val"]["skipped"]
    assert skipped["too_large_image"] + skipped["unreadable_image"] == 1  # PIL's own bomb limit may come first


def test_galleries_aspects_come_from_the_scan(tmp_path):
    from lineclip import galleries

    (tmp_path / "bomb.png").write_bytes(png_header(2147483647, 1))
    paths = [str(tmp_path / "bomb.png"), str(tmp_path / "bomb.png"), str(tmp_path / "missing.png")]
    aspects = galleries.image_aspects(paths, np.array([[300, 60], [-4, -4], [-1, -1]]))
    assert aspects[0] == 5.0 and np.isnan(aspects[1:]).all()  # the scan's sizes; the unknown one read safely
    assert np.isnan(galleries.image_aspects(paths[:1])).all()  # read here: refused, not raised


def test_a_manifest_width_past_int32_is_read_from_the_header(trained, tmp_path):
    run, data = trained
    rows = [json.loads(x) for x in data["eval"].read_text().splitlines()]
    rows[0]["width"], rows[1]["height"] = 99999999999, -(2**40)
    manifest = tmp_path / "eval" / "meta" / "lines.jsonl"
    manifest.parent.mkdir(parents=True)
    manifest.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    assert replay("evaluate", [f"run_dir={run}", f"manifest={manifest}", f"dataset_dir={data['root']}",
                               f"eval.output={tmp_path / 'e.json'}"]) == (0, [])
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["manifest_report"]["rows_used"] == len(rows) and report["images_unreadable"] == 0


def test_wylie_the_converter_fails_on_is_one_line(trained, tmp_path):
    run, _ = trained
    line = one_error(*replay("search", [f"run_dir={run}", "query_wylie=M", f"search.output={tmp_path / 's.html'}"]))
    assert "query_wylie='M' does not convert cleanly" in line and "IndexError" in line
    assert not (tmp_path / "s.html").exists()


def test_serve_answers_odd_numbers_and_wylie_with_4xx(trained):
    pytest.importorskip("starlette", reason="the serve extra is not installed")
    from starlette.testclient import TestClient
    from usage_support import compose_config

    from lineclip.serve import LineSearch, build_app

    engine = LineSearch.load(compose_config("serve", [f"run_dir={trained[0]}", "device=cpu"]))
    client = TestClient(build_app(engine), raise_server_exceptions=False)
    tibetan = json.loads(trained[1]["train"].read_text().splitlines()[0])["text"][:6]
    for params, status, message in (
        ({"q": "M", "script": "wylie"}, 400, "the Wylie does not convert cleanly"),
        ({"q": tibetan, "page": "²"}, 400, "is not a page number"),
        ({"q": tibetan, "page": "9" * 5000}, 400, "is not a page number"),
        ({"q": tibetan, "page": "٣"}, 400, "is not a page number"),
    ):
        response = client.get("/", params=params)
        assert (response.status_code, message in html_text(response.text)) == (status, True), params
    for url in ("/thumb/" + "9" * 5000, "/line/" + "1" * 40, "/thumb/²", "/line/-0"):
        response = client.get(url)
        assert response.status_code == 404 and "no corpus line" in response.text, url
    assert client.get("/thumb/0").status_code == 200


def html_text(page: str) -> str:
    import html

    return html.unescape(page)


# -- shard dirs (data.format=shards): a damaged summary or index is one line, a FIFO never blocks


def shard_train_args(data: dict[str, Path], shards: Path, out: Path, *extra: str) -> list[str]:
    return [*train_args(data, out, "data.format=shards", f"data.train_shards={shards}", "data.val_shards=null",
                        "data.val_manifest=null", *extra)]


def rewrite_index(directory: Path, change: Callable[[dict[str, list]], None]) -> None:
    import pyarrow as pa

    from lineclip.shard import INDEX_FILE, INDEX_SCHEMA

    table = pa.ipc.open_file(pa.memory_map(str(directory / INDEX_FILE))).read_all()
    columns = {name: table.column(name).to_pylist() for name in table.column_names}
    change(columns)
    new = pa.table(columns, schema=INDEX_SCHEMA)
    with pa.OSFile(str(directory / INDEX_FILE), "wb") as sink, pa.ipc.new_file(sink, INDEX_SCHEMA) as writer:
        writer.write_table(new)


def _swap_offsets(c: dict[str, list]) -> None:
    c["offset"][0], c["offset"][1] = c["offset"][1], c["offset"][0]
    c["nbytes"][0], c["nbytes"][1] = c["nbytes"][1], c["nbytes"][0]


def _set(column: str, row: int, value: Any) -> Callable[[dict[str, list]], None]:
    def change(c: dict[str, list]) -> None:
        c[column][row] = value
    return change


@pytest.mark.parametrize("damage,expected", [
    ("summary_list", "shards.json: not a JSON object (a JSON list)"),
    ("summary_no_shards", "shards is missing or not a list"),
    ("summary_rows_total", "report.rows_total is not a count"),
    ("summary_deep", "RecursionError"),
    ("summary_bytes_string", "shard shard-000000.tar: n_lines and bytes must be counts"),
    ("summary_bytes_wrong", "shard shard-000000.tar has "),
    ("index_size_code", "row 2: width/height -7/-7 is neither a size nor a known code"),
    ("index_extra", "row 1: extra is not a JSON object of strings"),
    ("index_empty_text", "row 3: empty text"),
    ("index_duplicate_id", "duplicated sample_id"),
    ("index_swapped_offsets", "row 1: its offset is not after the previous line's members"),
    ("index_offset_outside", "row 0: offset/nbytes outside its shard's members"),
    ("index_fifo", "not a regular file"),
])
def test_damaged_shard_dirs_are_one_line(trained, shard_dir, tmp_path, alarm, damage, expected):
    _, data = trained
    shards = tmp_path / "shards"
    shutil.copytree(shard_dir, shards)
    summary_path = shards / "shards.json"
    summary = json.loads(summary_path.read_text())
    if damage == "summary_list":
        summary_path.write_text(json.dumps([summary]))
    elif damage == "summary_no_shards":
        del summary["shards"]
        summary_path.write_text(json.dumps(summary))
    elif damage == "summary_rows_total":
        summary["report"]["rows_total"] = "many"
        summary_path.write_text(json.dumps(summary))
    elif damage == "summary_deep":
        summary_path.write_text("[" * 100000 + "]" * 100000)
    elif damage.startswith("summary_bytes"):
        size = summary["shards"][0]["bytes"]
        summary["shards"][0]["bytes"] = str(size) if damage == "summary_bytes_string" else size + 512
        summary_path.write_text(json.dumps(summary))
        expected += f"{size} bytes, shards.json says {size + 512}" if damage == "summary_bytes_wrong" else ""
    elif damage == "index_size_code":
        rewrite_index(shards, lambda c: (_set("width", 2, -7)(c), _set("height", 2, -7)(c)))
    elif damage == "index_extra":
        rewrite_index(shards, _set("extra", 1, "{not json"))
    elif damage == "index_empty_text":
        rewrite_index(shards, _set("text", 3, "  "))
    elif damage == "index_duplicate_id":
        rewrite_index(shards, lambda c: _set("sample_id", 4, c["sample_id"][0])(c))
    elif damage == "index_swapped_offsets":
        rewrite_index(shards, _swap_offsets)
    elif damage == "index_offset_outside":
        rewrite_index(shards, _set("offset", 0, 10**9))
    else:
        (shards / "index.arrow").unlink()
        os.mkfifo(shards / "index.arrow")
    before = tree_without_fifos(shards)
    line = one_error(*replay("train", shard_train_args(data, shards, tmp_path / "run")))
    assert expected in line, line
    assert tree_without_fifos(shards) == before


def test_an_index_offset_at_another_member_is_a_counted_corrupt_line(trained, shard_dir, tmp_path):
    """An offset that passes the index's order checks (the last line pointing at its own JSON member) still never
    hands the model the wrong bytes: the tar header before them must name the line's image."""
    import tarfile

    from lineclip.batch import LineDataset
    from lineclip.preprocess import LineImageTransform
    from lineclip.shard import load_shards

    shards = tmp_path / "shards"
    shutil.copytree(shard_dir, shards)
    summary = json.loads((shards / "shards.json").read_text())
    last = summary["shards"][-1]["name"]
    with tarfile.open(shards / last) as tar:
        member = tar.getmembers()[-1]  # the last line's JSON
    assert member.name.endswith(".json")

    def point_at_json(c: dict[str, list]) -> None:
        c["offset"][-1], c["nbytes"][-1] = member.offset_data, member.size

    rewrite_index(shards, point_at_json)
    lines, _ = load_shards(str(shards))
    with pytest.raises(OSError, match=r"the member there is b'000000007.json'"):
        lines.images.read(len(lines) - 1)
    assert len(lines.images.read(0)) > 0  # the others read as written
    dataset = LineDataset(lines, LineImageTransform("bdrc"))
    assert dataset[len(lines) - 1].get("corrupt") == "corrupt_image"


# -- the line cache


def cache_manifest(data: dict[str, Path], path: Path, n: int = 120) -> Path:
    rows = [json.loads(x) for x in data["train"].read_text().splitlines()]
    out = []
    for i in range(n):
        row = dict(rows[i % len(rows)])
        row.update(id=f"r{i:04d}", text=f"{row['text']}{i:04d}", line_path=str(data["root"] / row["line_path"]))
        out.append(json.dumps(row, ensure_ascii=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out) + "\n")
    return path


def _cache_of(manifest: Path) -> Path:
    (cache,) = [p for p in manifest.parent.iterdir() if p.name.endswith(".arrow")]
    return cache


def _rewrite_cache(cache: Path, change: Callable[[dict[str, list]], None]) -> None:
    """The cache with its columns changed and its metadata (its key) kept: what anyone able to write the cache dir
    can make."""
    import pyarrow as pa

    reader = pa.ipc.open_file(pa.memory_map(str(cache)))
    schema, table = reader.schema, reader.read_all()
    columns = {name: table.column(name).to_pylist() for name in table.column_names}
    change(columns)
    new = pa.table(columns, schema=schema)
    with pa.OSFile(str(cache), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        writer.write_table(new)


@pytest.mark.parametrize("damage", ["size_code", "extra", "truncated", "fifo", "counts"])
def test_a_damaged_line_cache_is_ignored_and_rebuilt(trained, tmp_path, alarm, caplog, damage):
    import pyarrow as pa

    from lineclip.sizes import load_line_table

    manifest = cache_manifest(trained[1], tmp_path / "m" / "lines.jsonl")
    first, _ = load_line_table(manifest, progress=False, cache_min_rows=100)
    expected = [(r.sample_id, r.text) for r in first]
    del first
    cache = _cache_of(manifest)
    if damage == "size_code":
        _rewrite_cache(cache, lambda c: (_set("width", 5, -7)(c), _set("height", 5, -7)(c)))
    elif damage == "extra":
        _rewrite_cache(cache, _set("extra", 5, "[1, 2]"))
    elif damage == "truncated":
        blob = cache.read_bytes()
        cache.write_bytes(blob[: len(blob) // 2])
    elif damage == "fifo":
        cache.unlink()
        os.mkfifo(cache)
    else:
        reader = pa.ipc.open_file(pa.BufferReader(cache.read_bytes()))  # a copy: the file is rewritten below
        meta = json.loads(reader.schema.metadata[b"lineclip"])
        meta["report"]["rows_total"] += 5
        schema = reader.schema.with_metadata({"lineclip": json.dumps(meta)})
        table = reader.read_all().replace_schema_metadata(None)
        with pa.OSFile(str(cache), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            writer.write_table(table)
    with caplog.at_level(logging.WARNING, logger="lineclip"):  # a FIFO is refused, not waited on (alarm)
        again, _ = load_line_table(manifest, progress=False, cache_min_rows=100)
    assert [(r.sample_id, r.text) for r in again] == expected
    assert any("ignoring line cache" in r.getMessage() for r in caplog.records)


def test_a_line_cache_of_an_edited_manifest_with_the_same_size_and_mtime_is_not_used(trained, tmp_path):
    """`cp -p` of an edited manifest (same length, same mtime): the key's hash of the manifest's first and last rows
    sees the edit."""
    from lineclip.sizes import load_line_table

    manifest = cache_manifest(trained[1], tmp_path / "m" / "lines.jsonl")
    load_line_table(manifest, progress=False, cache_min_rows=100)
    stat = manifest.stat()
    lines = manifest.read_text().splitlines()
    lines[-1] = lines[-1].replace("0119", "9110")  # the last row's text, same bytes count
    manifest.write_text("\n".join(lines) + "\n")
    os.utime(manifest, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert manifest.stat().st_size == stat.st_size and manifest.stat().st_mtime_ns == stat.st_mtime_ns
    again, _ = load_line_table(manifest, progress=False, cache_min_rows=100)
    assert again[len(again) - 1].text.endswith("9110")


# -- damaged bundles


@pytest.mark.parametrize("damage,expected", [
    ("bert", "has a BertTokenizer"),
    ("tokenizer_config_not_json", "cannot load the tokenizer of"),
])
def test_init_from_a_bundle_with_a_foreign_or_broken_tokenizer_is_one_line(trained, tmp_path, damage, expected):
    run, data = trained
    copy = copy_run(run, tmp_path / "run")
    config = copy / artifacts.TEXT_ENCODER / "tokenizer_config.json"
    if damage == "bert":
        config.write_text(json.dumps({**json.loads(config.read_text()), "tokenizer_class": "BertTokenizer"}))
    else:
        config.write_text("{not json")
    before = tree(copy)
    line = one_error(*replay("train", train_args(data, tmp_path / "new", f"model.init_from={copy}",
                                                 "trainer.max_steps=1")))
    assert line.startswith(f"model.init_from={copy}: cannot load the tokenizer of") and expected in line
    assert tree(copy) == before


@pytest.mark.parametrize("command", ["search", "index"])
def test_a_deeply_nested_training_config_is_one_line(trained, tmp_path, command):
    run, data = trained
    copy = copy_run(run, tmp_path / "run")
    (copy / artifacts.CONFIG).write_text("[" * 100000 + "]" * 100000)
    before = tree(copy)
    args = ["query=ཀ", f"search.output={tmp_path / 's.html'}"] if command == "search" else \
        [f"manifest={data['eval']}", f"index.output={tmp_path / 'idx'}"]
    line = one_error(*replay(command, [f"run_dir={copy}", *args]))
    assert f"cannot read {copy / artifacts.CONFIG}: RecursionError" in line and tree(copy) == before


# ------------------------------------------------------ round 3 (issue 26; issue 22 items 4 and 11)


def _set_in(blob: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    return {**blob, **change}


@pytest.mark.parametrize("name,damage,expected", [
    ("trainer_state.json", "deep", "not a readable JSON file"),
    ("scheduler.json", {"last_epoch": "x"}, "last_epoch 'x' is not the trainer state's step 30"),
    ("scheduler.json", {"last_epoch": 10**30}, "is not the trainer state's step 30"),
    ("scheduler.json", {"optimizer": 5}, "unknown key(s) optimizer"),
    ("scheduler.json", {"base_lrs": []}, "base_lrs must be"),
    ("scheduler.json", {"lr_lambdas": [{"x": 1}]}, "lr_lambdas must be null per group"),
    ("optimizer.pt", {"lr": "abc"}, "group 0: lr 'abc' is not a finite number >= 0"),
    ("optimizer.pt", {"eps": -1.0}, "group 0: eps -1.0 is not a finite number > 0"),
    ("optimizer.pt", {"fused": True}, "group 0: fused differ from this run's optimizer"),
    ("optimizer.pt", "moment_shape", "exp_avg is not a float tensor of shape"),
    ("optimizer.pt", "moment_nan", "exp_avg_sq holds non-finite values"),
    ("rng_state_0.pt", "rng", "not a lineclip RNG state"),
])
def test_every_file_of_a_training_state_is_checked_before_anything_is_loaded(trained, tmp_path, name, damage,
                                                                             expected):
    """Issue 22 item 11: each of these was a traceback at the first step, validation or checkpoint (LambdaLR's
    load_state_dict updates its __dict__ with the file's keys); now one line at resume naming the file, and the
    run dir byte for byte as it was."""
    run, data = trained
    copy = copy_run(run, tmp_path / "run")
    path = copy / f"{CKPT}{TRAINING_STATE}" / name
    if damage == "deep":
        path.write_text("[" * 100_000 + "]" * 100_000)
    elif name == "scheduler.json":
        path.write_text(json.dumps(_set_in(json.loads(path.read_text()), damage)))
    elif name == "optimizer.pt":
        blob = torch.load(path, weights_only=True)
        if damage == "moment_shape":
            blob["state"][0]["exp_avg"] = torch.zeros(3)
        elif damage == "moment_nan":
            blob["state"][0]["exp_avg_sq"] = torch.full_like(blob["state"][0]["exp_avg_sq"], float("nan"))
        else:
            blob["param_groups"][0] = _set_in(blob["param_groups"][0], damage)
        torch.save(blob, path)
    else:
        blob = torch.load(path, weights_only=True)
        blob["numpy"]["keys"] = blob["numpy"]["keys"][:10]
        torch.save(blob, path)
    before = tree(copy)
    line = one_error(*replay("train", train_args(data, copy, "trainer.resume=latest")))
    assert expected in line and str(path) in line, line
    assert tree(copy) == before


def test_a_refused_resume_leaves_the_record_of_the_run(trained, tmp_path):
    """Issue 26 item 5: the .hydra/ record of a finished run is rewritten only once a resume is accepted."""
    run, data = trained
    copy = copy_run(run, tmp_path / "run")
    state = copy / f"{CKPT}{TRAINING_STATE}" / "trainer_state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "step": 10**30}))
    before = tree(copy)
    proc = subprocess.run([sys.executable, "-m", "lineclip.train", *train_args(data, copy)[:-1], "optim.lr=0.5",
                           "trainer.resume=latest", f"hydra.run.dir={copy}"], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "WANDB_MODE": "disabled"})
    output = proc.stdout + proc.stderr
    errors = [line for line in output.splitlines() if "[ERROR]" in line]
    assert proc.returncode == 2 and len(errors) == 1 and "is not the step 30" in errors[0], output[-2000:]
    after = tree(copy)
    log_name = "train.log"  # Hydra's log of the refused attempt is appended (README, Security): the only change
    assert {k: v for k, v in after.items() if k != log_name} == {k: v for k, v in before.items() if k != log_name}


@pytest.fixture
def ghostscript_stub(tmp_path, monkeypatch):
    """A `gs` first on PATH that logs its arguments: Pillow's EPS plugin runs it on a file's PostScript."""
    from PIL import EpsImagePlugin

    bin_dir, log = tmp_path / "bin", tmp_path / "gs_was_run.log"
    bin_dir.mkdir()
    stub = bin_dir / "gs"
    # Pillow asks `gs --version` first (answered, so that it goes on to run it on the data), then renders.
    stub.write_text(f"#!/bin/sh\necho \"$@\" >> {log}\n[ \"$1\" = --version ] && echo 10.02.1 && exit 0\nexit 1\n")
    stub.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)  # Pillow looks gs up once, then caches it
    return log


def _eps_bytes() -> bytes:
    buffer = io.BytesIO()
    _demo_line().convert("L").save(buffer, format="EPS")
    return buffer.getvalue()


def _png_with_a_garbled_chunk() -> bytes:
    """A good PNG header and first IDAT; the second IDAT's chunk type is garbled: Pillow raises SyntaxError while
    decoding, not an OSError."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    width, height = 250, 56
    compressed = zlib.compress(b"".join(b"\x00" + bytes([200]) * width for _ in range(height)))
    half = len(compressed) // 2
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", compressed[:half]) + chunk(b"I\x00A\x01", compressed[half:]) + chunk(b"IEND", b""))


def test_the_hostile_image_files_are_live(tmp_path, ghostscript_stub):
    """Opened the way Pillow opens any file, the EPS does run the gs stub and the PNG raises SyntaxError: the tests
    below, where neither may happen, prove something."""
    (tmp_path / "x.eps").write_bytes(_eps_bytes())
    with pytest.raises(Exception), Image.open(tmp_path / "x.eps") as image:  # noqa: B017 - whatever gs's exit 1 gives
        image.load()
    assert "-sDEVICE" in ghostscript_stub.read_text()
    with pytest.raises(SyntaxError), Image.open(io.BytesIO(_png_with_a_garbled_chunk())) as image:
        image.load()


def test_eps_never_runs_ghostscript_and_any_decode_error_is_a_counted_skip(trained, tmp_path, ghostscript_stub):
    """Issue 26 item 2 and issue 22 item 4: an EPS "line image" (a .jpg by name) and a PNG that fails with a
    SyntaxError in training, in a shard member, in search and in a serve upload: skipped and counted, or one
    line; Ghostscript never runs."""
    from lineclip.preprocess import DECODE_ERRORS, LINE_IMAGE_FORMATS, decode_image, image_size, load_image

    run, _ = trained
    data = make_dataset(tmp_path / "data")
    lines = sorted((tmp_path / "data" / "train" / "lines").iterdir())
    lines[0].write_bytes(_eps_bytes())
    lines[1].write_bytes(_png_with_a_garbled_chunk())
    assert image_size(lines[1]) == (250, 56)  # its header is fine: only decoding finds it
    for path in lines[:2]:
        with pytest.raises(DECODE_ERRORS):
            load_image(path)
        with pytest.raises(DECODE_ERRORS):  # a shard member is decoded from its bytes by the same function
            decode_image(io.BytesIO(path.read_bytes()), None, f"shard.tar@{path.name}")
    assert "EPS" not in LINE_IMAGE_FORMATS

    out = tmp_path / "run"
    assert replay("train", train_args(data, out, "trainer.max_steps=2", "trainer.checkpoint_every_steps=5")) == (0, [])
    report = json.loads((out / artifacts.DATA_REPORT).read_text())
    assert report["train"]["skipped"]["unreadable_image"] == 1  # the EPS, refused from its header
    assert report["corrupt_images_skipped"] == 1  # the PNG, found when its pixels were decoded
    assert report["train"]["rows_used"] == 8 and not ghostscript_stub.exists()

    for path in lines[:2]:
        line = one_error(*replay("search", [f"run_dir={run}", f"query_image={path}",
                                            f"search.output={tmp_path / 'q.html'}"]))
        assert f"query_image={path} cannot be read as an image" in line
    pytest.importorskip("starlette", reason="the serve extra is not installed")
    from lineclip.serve import LineSearch, PageError

    engine = LineSearch.load(compose("serve", [f"run_dir={run}", "device=cpu"]))
    for path in lines[:2]:
        with pytest.raises(PageError) as refused:
            engine.add_upload(path.read_bytes(), "line.jpg")
        assert refused.value.status == 400 and "cannot be read as an image" in refused.value.message
    assert not ghostscript_stub.exists()


def test_search_refuses_a_bundle_whose_backbone_was_replaced(trained, tmp_path, caplog):
    """Issue 26 item 3: the corpus fingerprint covers both towers, not only the heads: the checkpoint's backbone
    put in place of the final one is another model. A corpus that recorded the older heads-only fingerprint
    is still searched, with a warning that the towers are not checked."""
    run, _ = trained
    copy = copy_run(run, tmp_path / "run")
    recorded = json.loads((copy / artifacts.CONFIG).read_text())["corpus"]["fingerprint"]
    assert recorded == bundle.model_fingerprint(bundle.resolve_bundle(copy)) and recorded.startswith("v2:")
    shutil.rmtree(copy / artifacts.BACKBONE)
    shutil.copytree(copy / f"{CKPT}{artifacts.BACKBONE}", copy / artifacts.BACKBONE)
    before = tree(copy)
    line = one_error(*replay("search", [f"run_dir={copy}", "query=ཀ", f"search.output={tmp_path / 's.html'}"]))
    assert "embedded by another model" in line and tree(copy) == before
    # a corpus from before this fingerprint: compared on its heads only, and said so
    config = json.loads((copy / artifacts.CONFIG).read_text())
    config["corpus"]["fingerprint"] = bundle.heads_fingerprint(copy)
    (copy / artifacts.CONFIG).write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING, logger="lineclip"):
        assert replay("search", [f"run_dir={copy}", "query=ཀ", f"search.output={tmp_path / 's2.html'}"]) == (0, [])
    assert "older fingerprint of the projection heads only" in caplog.text


def test_a_head_declaring_huge_dims_is_refused_before_it_is_built(trained, tmp_path, monkeypatch):
    """Issue 26 item 7: a head file of ~1 KB declaring 12000 x 12000 was built (2.6 GB) before it was refused."""
    from lineclip.towers import ProjectionHead

    run, _ = trained
    copy = copy_run(run, tmp_path / "run")
    small = ProjectionHead(8, 4)
    torch.save({"state_dict": small.state_dict(), "input_dim": 12000, "output_dim": 12000}, copy / artifacts.TEXT_HEAD)
    assert (copy / artifacts.TEXT_HEAD).stat().st_size < 10_000  # a few KB declaring 12000 x 12000
    built = []
    original = ProjectionHead.__init__

    def recording(self, input_dim, output_dim):
        built.append((input_dim, output_dim))
        original(self, input_dim, output_dim)

    monkeypatch.setattr(ProjectionHead, "__init__", recording)
    before = tree(copy)
    line = one_error(*replay("search", [f"run_dir={copy}", "query=ཀ", f"search.output={tmp_path / 's.html'}"]))
    assert artifacts.TEXT_HEAD in line and "input_dim 12000" in line
    assert (12000, 12000) not in built and tree(copy) == before


@pytest.mark.parametrize("change,expected", [
    ({"width_buckets": []}, "width_buckets must be a non-empty ascending list"),
    ({"text_max_length": 1_000_000_000}, "text_max_length must be an integer in 1..65536"),
    ({"target_height": 57}, "target_height 57 is not a multiple of patch_multiple 14"),
    ({"image_preprocess_pipeline": "magic"}, "image_preprocess_pipeline 'magic' is not one of"),
    ({"width_buckets": [128]}, "width_buckets [128] differs from the run's own config preprocess.width_buckets"),
    ({"text_max_length": 500}, "text_max_length 500 differs from the run's own config text.max_length 64"),
])
def test_a_bundle_config_is_validated_like_a_config(trained, tmp_path, change, expected):
    """Issue 26 item 7: training_config.json's geometry and text_max_length decide the embeddings; an edited one
    was searched with other results."""
    run, _ = trained
    copy = copy_run(run, tmp_path / "run")
    path = copy / artifacts.CONFIG
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    before = tree(copy)
    line = one_error(*replay("search", [f"run_dir={copy}", "query=ཀ", f"search.output={tmp_path / 's.html'}"]))
    assert expected in line and str(path) in line and tree(copy) == before


def test_texts_of_only_invisible_characters_are_empty_texts(trained, tmp_path):
    """Issue 26 item 8: zero-width spaces and joiners, word joiners, a BOM: no text, so the row is empty_text (and
    the query is empty)."""
    run, data = trained
    rows = [json.loads(x) for x in data["eval"].read_text(encoding="utf-8").splitlines()]
    invisible = ["\u200d\u200d", "\u200b \u200c", "\u2060", "\ufeff\u200b"]
    for row, text in zip(rows, invisible, strict=False):
        row["text"] = text
    rows[4]["text"] = "\u200d" + rows[4]["text"]  # inside a real text they are kept, as before
    manifest = tmp_path / "eval" / "meta" / "lines.jsonl"
    manifest.parent.mkdir(parents=True)
    manifest.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    assert replay("evaluate", [f"run_dir={run}", f"manifest={manifest}", f"dataset_dir={data['root']}",
                               f"eval.output={tmp_path / 'e.json'}"]) == (0, [])
    report = json.loads((tmp_path / "e.json").read_text())["manifest_report"]
    assert report["skipped"]["empty_text"] == 4 and report["rows_used"] == len(rows) - 4
    assert report["first_bad"]["empty_text"] == f"{manifest}:1"
    line = one_error(*replay("search", [f"run_dir={run}", "query='\u200d\u2060'",
                                        f"search.output={tmp_path / 's.html'}"]))
    assert "query is empty" in line


def _sixteen_bit_png(width: int, height: int, seed: int = 0) -> bytes:
    pixels = np.zeros((height, width), dtype=np.uint16)
    pixels[seed::50] = 60000
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_serve_uploads_are_bounded_before_decoding_and_decoded_one_at_a_time(trained, monkeypatch):
    """Issue 26 item 4: a ~80 KB 16-bit PNG of 39.6 M pixels took 12 s and 1.8 GB to decode, four at once 5 GB.
    Now the header is refused (16-bit pixels count double against serve.max_upload_pixels) before any decoding,
    and uploads within it are decoded one at a time (serve.upload_workers=1)."""
    import threading

    pytest.importorskip("starlette", reason="the serve extra is not installed")
    import lineclip.preprocess
    from lineclip.serve import LineSearch, PageError

    run, _ = trained
    engine = LineSearch.load(compose("serve", [f"run_dir={run}", "device=cpu"]))
    decoding, most, original = [0], [0], lineclip.preprocess.load_image
    lock = threading.Lock()

    def counting(path, max_pixels=None):
        with lock:
            decoding[0] += 1
            most[0] = max(most[0], decoding[0])
        try:
            threading.Event().wait(0.2)  # long enough for the other threads to arrive, were they let in
            return original(path, max_pixels)
        finally:
            with lock:
                decoding[0] -= 1

    monkeypatch.setattr(lineclip.preprocess, "load_image", counting)
    bomb = _sixteen_bit_png(9000, 4400)
    assert len(bomb) < 100_000
    with pytest.raises(PageError) as refused:
        engine.add_upload(bomb, "scan.png")
    assert refused.value.status == 400 and "9000x4400 pixels, 16-bit counted x2" in refused.value.message
    assert "max_upload_pixels=4,000,000" in refused.value.message and most == [0]  # never decoded
    with pytest.raises(PageError, match="1500x1500 pixels, 16-bit"):  # 2.25 M pixels, 4.5 M counted
        engine.add_upload(_sixteen_bit_png(1500, 1500), "big16.png")
    uploads = [_sixteen_bit_png(1200, 60, seed) for seed in range(3)]
    keys: list[str] = []
    threads = [threading.Thread(target=lambda d=d: keys.append(engine.add_upload(d, "line.png"))) for d in uploads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(keys) == sorted(hashlib.sha256(d).hexdigest() for d in uploads) and most == [1]
