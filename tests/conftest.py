import json
import os

import pytest

# No W&B server and no model hub here: every test logs offline (files on disk) and never downloads.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist (the Quickstart's `-n auto`) each worker already has a core: one PyTorch thread each (and in
# the commands they start), or two workers' threads fight over the cores and the suite runs slower than serially.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """24 train and 12 eval real lines (from the bundled demo) in an OpenPecha layout; two eval lines share a
    transcription."""
    from lineclip.config import asset_dir

    root = tmp_path_factory.mktemp("openpecha")
    demo = asset_dir("demo")
    for split, n in (("train", 24), ("eval", 12)):
        rows = [json.loads(x) for x in (demo / split / "meta" / "lines.jsonl").read_text().splitlines()[:n]]
        (root / split / "meta").mkdir(parents=True)
        (root / split / "lines").mkdir()
        for row in rows:
            (root / row["line_path"]).write_bytes((demo / row["line_path"]).read_bytes())
        if split == "eval":
            rows[1]["text"] = rows[0]["text"]
        (root / split / "meta" / "lines.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    return root


@pytest.fixture
def compose_cfg():
    """`compose_cfg(*overrides, config_name="train")`: a config composed from conf/ as Hydra's command line does."""
    from usage_support import compose_cfg

    return compose_cfg
