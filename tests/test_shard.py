"""Tar shards (lineclip.shard): every usable line once, readable by any tar reader, read back as exactly the
manifest's lines, counted bad rows and images; training from shards is training from the manifest, resume
included."""

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from usage_support import compose_cfg, run_in_process

from lineclip.batch import LineDataset
from lineclip.manifest import ManifestError, read_manifest
from lineclip.preprocess import LineGeometry, LineImageTransform, header_size
from lineclip.shard import INDEX_FILE, SHARDS_FILE, build, load_shards, write_shards


def dataset_with_bad_lines(tiny_dataset: Path, tmp_path: Path) -> Path:
    """The tiny train split plus a broken row, an empty image and a truncated JPEG (its header reads, its pixels
    do not)."""
    root = tmp_path / "data"
    shutil.copytree(tiny_dataset, root)
    manifest = root / "train" / "meta" / "lines.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    (root / "train" / "lines" / "empty.jpg").write_bytes(b"")
    whole = (root / rows[0]["line_path"]).read_bytes()
    (root / "train" / "lines" / "truncated.jpg").write_bytes(whole[: len(whole) // 3])
    extra = [{**rows[1], "id": "empty", "line_path": "train/lines/empty.jpg"},
             {**rows[2], "id": "truncated", "line_path": "train/lines/truncated.jpg"}]
    with manifest.open("a") as handle:
        handle.write("\n{not json\n" + "\n".join(json.dumps(r, ensure_ascii=False) for r in extra) + "\n")
    return root


def test_shards_hold_every_usable_line_once_and_read_back_as_the_manifest(tiny_dataset, tmp_path):
    root = dataset_with_bad_lines(tiny_dataset, tmp_path)
    manifest = root / "train" / "meta" / "lines.jsonl"
    summary = write_shards(manifest, tmp_path / "shards", shard_size=10, dataset_dir=str(root), progress=False)
    records, report = read_manifest(manifest, root)
    usable = [r for r in records if r.sample_id != "empty"]  # the empty file is found when sharding
    assert summary["n_lines"] == 25 and [s["n_lines"] for s in summary["shards"]] == [10, 10, 5]
    skipped = summary["report"]["skipped"]
    assert skipped["invalid_json"] == 1 and skipped["empty_image"] == 1 and sum(skipped.values()) == 2
    assert summary["report"]["rows_total"] == report.rows_total == 27 and summary["report"]["rows_used"] == 25
    out = tmp_path / "shards"
    assert sorted(p.name for p in out.iterdir()) == [INDEX_FILE, "shard-000000.tar", "shard-000001.tar",
                                                     "shard-000002.tar", SHARDS_FILE]
    assert not list(tmp_path.glob(".staging*"))

    # any tar reader sees webdataset-style pairs: <key>.jpg with the file's bytes, <key>.json with the line
    members = []
    for shard in summary["shards"]:
        with tarfile.open(out / shard["name"]) as tar:
            members += [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    assert [name for name, _ in members[:4]] == ["000000000.jpg", "000000000.json", "000000001.jpg",
                                                 "000000001.json"]
    for k, record in enumerate(usable):
        (image_name, image_bytes), (meta_name, meta_bytes) = members[2 * k], members[2 * k + 1]
        assert (image_name, meta_name) == (f"{k:09d}.jpg", f"{k:09d}.json")
        assert image_bytes == Path(record.image_path).read_bytes()
        meta = json.loads(meta_bytes)
        assert (meta["text"], meta["sample_id"], meta["source"]) == (record.text, record.sample_id, record.source)
        assert meta["extra"] == dict(record.extra) and meta["image"] == record.image_path
        assert [meta["width"], meta["height"]] == list(header_size(record.image_path))

    # read back: the same records, sizes and report, and the same tensors as from the files themselves
    lines, shard_report = load_shards(str(out))
    assert list(lines) == usable
    assert shard_report.skipped["empty_image"] == 1 and shard_report.rows_used == 25
    transform = LineImageTransform("bdrc", LineGeometry())
    from_shards, from_files = LineDataset(lines, transform), LineDataset(usable, transform)
    assert np.array_equal(from_shards.buckets, from_files.buckets)
    for i in range(25):
        a, b = from_shards[i], from_files[i]
        if "corrupt" in b:
            assert a == b == {"index": i, "corrupt": "corrupt_image"}  # the truncated JPEG, counted when loaded
            assert usable[i].sample_id == "truncated"
        else:
            assert torch.equal(a["pixel_values"], b["pixel_values"]) and a["text"] == b["text"]
    # a glob or the summary file name the same dir
    assert list(load_shards(str(tmp_path / "sha*"))[0]) == usable
    assert list(load_shards(str(out / SHARDS_FILE))[0]) == usable
    with pytest.raises(ManifestError, match="on_bad_row=error"):
        load_shards(str(out), on_bad_row="error")


def test_shard_dirs_concatenate_and_damage_is_one_line(tiny_dataset, tmp_path):
    manifest = tiny_dataset / "train" / "meta" / "lines.jsonl"
    write_shards(manifest, tmp_path / "a", shard_size=7, dataset_dir=str(tiny_dataset), progress=False)
    write_shards(tiny_dataset / "eval" / "meta" / "lines.jsonl", tmp_path / "b", shard_size=7,
                 dataset_dir=str(tiny_dataset), progress=False)
    both, _ = load_shards(str(tmp_path / "*"))
    expected = read_manifest(manifest, tiny_dataset)[0] + read_manifest(tiny_dataset / "eval/meta/lines.jsonl",
                                                                        tiny_dataset)[0]
    assert list(both) == expected and len(both.images.shard_paths) == 4 + 2
    second = LineDataset(both, LineImageTransform("bdrc", LineGeometry()))[30]  # an eval line, second dir
    with Image.open(expected[30].image_path) as image:
        assert second["text"] == expected[30].text and second["pixel_values"].shape[-2] == 56 and image.size
    # a shard cut short (a failed copy) is refused before training, naming the file
    with open(tmp_path / "a" / "shard-000001.tar", "r+b") as handle:
        handle.truncate(1000)
    with pytest.raises(ManifestError, match=r"shards.json: shard shard-000001.tar has 1000 bytes"):
        load_shards(str(tmp_path / "a"))
    with pytest.raises(ManifestError, match="no shard dir"):
        load_shards(str(tmp_path / "nothing_here"))


def test_shard_command_refuses_an_existing_dir_and_a_missing_manifest(tiny_dataset, tmp_path):
    manifest = tiny_dataset / "train" / "meta" / "lines.jsonl"
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep")
    status, line = run_in_process(build, "shard", [f"manifest={manifest}", f"out_dir={tmp_path / 'taken'}"])
    assert status == 2 and "already exists" in line
    status, line = run_in_process(build, "shard", [f"manifest={manifest}", f"out_dir={tmp_path / 'taken'}",
                                                   "overwrite=true"])
    assert status == 2 and "not a shard dir" in line and (tmp_path / "taken" / "mine.txt").read_text() == "keep"
    status, line = run_in_process(build, "shard", [f"manifest={tmp_path / 'nope.jsonl'}", f"out_dir={tmp_path / 'o'}"])
    assert status == 2 and "does not exist" in line and not (tmp_path / "o").exists()
    status, line = run_in_process(build, "shard", [f"manifest={manifest}", f"out_dir={tmp_path / 'o'}", "shard_size=0"])
    assert status == 2 and "shard_size" in line


RUN = ["data.batch_size=4", "data.num_workers=0", "trainer.max_steps=12", "trainer.checkpoint_every_steps=100",
       "trainer.progress_bar=false", "text.max_length=64", "logger=none", "optim.lr=1e-3", "optim.warmup_steps=2",
       "trainer.export_embeddings=false", "trainer.eval_every_steps=6"]


def final_state(run: Path) -> dict:
    config = json.loads((run / "training_config.json").read_text())
    heads = torch.load(run / "text_hierarchy_projection_head.pt", weights_only=True)["state_dict"]
    return {"logit_scale": config["logit_scale"], "val": config["val_metrics"], "heads": heads}


@pytest.mark.slow
def test_training_from_shards_is_training_from_the_manifest_and_resumes(tiny_dataset, tmp_path, monkeypatch):
    """The same lines in the same order give the same batches: the run from shards ends with the manifest run's
    weights and validation; a SIGTERM mid-epoch, then resume, ends there too."""
    from test_resume import sigterm_during_step

    from lineclip import trainer

    for split in ("train", "eval"):
        write_shards(tiny_dataset / split / "meta" / "lines.jsonl", tmp_path / "shards" / split, shard_size=5,
                     dataset_dir=str(tiny_dataset), progress=False)
    manifests = ["data=openpecha", f"data.dataset_dir={tiny_dataset}",
                 f"data.train_manifest={tiny_dataset}/train/meta/lines.jsonl",
                 f"data.val_manifest={tiny_dataset}/eval/meta/lines.jsonl"]
    shards = ["data=openpecha", "data.format=shards", f"data.train_shards={tmp_path}/shards/train",
              f"data.val_shards={tmp_path}/shards/eval"]
    trainer.train(compose_cfg(*manifests, *RUN, f"output_dir={tmp_path / 'manifest_run'}"))
    trainer.train(compose_cfg(*shards, *RUN, f"output_dir={tmp_path / 'shard_run'}"))
    reference, from_shards = final_state(tmp_path / "manifest_run"), final_state(tmp_path / "shard_run")
    assert from_shards["logit_scale"] == pytest.approx(reference["logit_scale"], rel=1e-6)
    assert from_shards["val"] == pytest.approx(reference["val"], rel=1e-6)
    for key, value in reference["heads"].items():
        torch.testing.assert_close(from_shards["heads"][key], value, atol=1e-6, rtol=1e-5, msg=key)
    report = json.loads((tmp_path / "shard_run" / "data_report.json").read_text())
    assert report["train"]["rows_used"] == 24 and report["val"]["rows_used"] == 12

    original = sigterm_during_step(monkeypatch, 5)  # mid-epoch: 6 batches an epoch
    out = tmp_path / "resumed"
    result = trainer.train(compose_cfg(*shards, *RUN, f"output_dir={out}"))
    assert result.interrupted
    monkeypatch.setattr(trainer, "train_step", original)
    trainer.train(compose_cfg(*shards, *RUN, f"output_dir={out}", "trainer.resume=latest"))
    resumed = final_state(out)
    for key, value in reference["heads"].items():
        torch.testing.assert_close(resumed["heads"][key], value, atol=1e-6, rtol=1e-5, msg=key)
    assert json.loads((out / "training_config.json").read_text())["global_step"] == 12


def test_shard_images_read_by_offset_survive_pickling(tiny_dataset, tmp_path):
    import pickle

    write_shards(tiny_dataset / "train" / "meta" / "lines.jsonl", tmp_path / "s", shard_size=6,
                 dataset_dir=str(tiny_dataset), progress=False)
    lines, _ = load_shards(str(tmp_path / "s"))
    copy = pickle.loads(pickle.dumps(lines))
    for i in (0, 11, 23):
        assert copy.images.read(i) == Path(lines[i].image_path).read_bytes() == lines.images.read(i)
        with Image.open(io.BytesIO(copy.images.read(i))) as image:
            assert list(image.size) == lines.sizes[i].tolist()


def test_data_format_shards_needs_train_shards():
    from lineclip.config import ConfigError, check_config

    with pytest.raises(ConfigError, match="data.format=shards needs data.train_shards"):
        check_config(compose_cfg("data.format=shards"))
    with pytest.raises(Exception, match="format"):
        check_config(compose_cfg("data.format=webdataset"))
