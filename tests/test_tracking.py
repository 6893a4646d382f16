"""The run dir's metrics.jsonl: the learning curves beside (or without) W&B."""

import json
import os

from lineclip.tracking import METRICS_FILE, start_metrics_file


def test_metrics_file_keeps_the_rows_a_resumed_run_continues_from(tmp_path):
    rows = [{"step": s, "train/loss": 5.0 - s / 10} for s in (10, 20, 30)] + [{"step": 20, "val_t2i_r1": 0.1}]
    (tmp_path / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    start_metrics_file(tmp_path, 20)  # resumed from the step-20 checkpoint: step 30 will be logged again
    kept = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert kept == [rows[0], rows[1], rows[3]]
    start_metrics_file(tmp_path, 0)  # a new run (after trainer.overwrite) starts an empty curve
    assert (tmp_path / METRICS_FILE).read_text() == ""
    start_metrics_file(tmp_path / "nothing_here", 0)  # no file yet: nothing to do


def test_throughput_counts_the_wait_for_the_loader(monkeypatch):
    from lineclip import tracking

    clock = [100.0]
    monkeypatch.setattr(tracking.time, "perf_counter", lambda: clock[0])

    def loader():  # each batch takes 2 s to arrive
        for batch in range(4):
            clock[0] += 2.0
            yield batch

    throughput = tracking.Throughput(step=10)
    seen = []
    for batch in throughput.batches(loader()):
        seen.append(batch)
        throughput.samples += 8
        clock[0] += 3.0  # the step itself
    assert seen == [0, 1, 2, 3]
    # 4 steps in 20 s, of which 8 s waiting for data
    assert throughput.metrics(14) == {"train/samples_per_s": 32 / 20, "train/data_wait_s": 2.0,
                                      "train/data_wait_fraction": 8 / 20}
    clock[0] += 5.0  # the next window starts afresh: no batch, no wait
    assert throughput.metrics(15) == {"train/samples_per_s": 0.0, "train/data_wait_s": 0.0,
                                      "train/data_wait_fraction": 0.0}


def test_offline_staging_goes_to_the_run_dir_unless_the_user_chose(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from lineclip import tracking

    monkeypatch.delenv(tracking.DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(tracking, "_data_dir_set", None)
    nobody = SimpleNamespace(trackers=[])
    tracking.stage_in_run_dir(tmp_path / "run1")
    assert os.environ[tracking.DATA_DIR_ENV] == str(tmp_path / "run1" / "wandb" / "data")
    tracking.stage_in_run_dir(tmp_path / "run2")  # the next job of a sweep in the same process: its own dir
    assert os.environ[tracking.DATA_DIR_ENV] == str(tmp_path / "run2" / "wandb" / "data")
    tracking.finish_tracking(nobody)
    assert tracking.DATA_DIR_ENV not in os.environ  # undone at the end of the run
    monkeypatch.setenv(tracking.DATA_DIR_ENV, "/somewhere/of/mine")
    tracking.stage_in_run_dir(tmp_path / "run3")
    tracking.finish_tracking(nobody)
    assert os.environ[tracking.DATA_DIR_ENV] == "/somewhere/of/mine"  # a user's own is never touched
