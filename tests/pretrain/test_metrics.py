"""The metrics logger: metrics.jsonl records, and the offline wandb run (the default)."""

from __future__ import annotations

from switchall.pretrain.config import LoggingConfig
from switchall.pretrain.metrics import MetricsLogger, read_metrics


def test_jsonl_and_offline_wandb_resume_the_same_run(tmp_path):
    for step in (1, 2):  # a run, then its resumption into the same directory
        logger = MetricsLogger(tmp_path, LoggingConfig(wandb="offline"), run_config={"a": 1})
        logger.log({"step": step, "loss": 3.0 - step})
        logger.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [
        (1, 2.0),
        (2, 1.0),
    ]
    run_id = (tmp_path / "wandb_id.txt").read_text().strip()
    assert run_id.isalnum() and run_id.islower()
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(run.name.endswith(run_id) for run in runs)
    assert all((run / f"run-{run_id}.wandb").stat().st_size > 0 for run in runs)


def test_logger_on_other_ranks_writes_nothing(tmp_path):
    logger = MetricsLogger(tmp_path, LoggingConfig(wandb="offline"), enabled=False)
    logger.log({"step": 1, "loss": 1.0})
    logger.close()
    assert list(tmp_path.iterdir()) == []
