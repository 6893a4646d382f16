"""The run dir's metrics.jsonl: the learning curves beside (or without) W&B."""

import json

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
