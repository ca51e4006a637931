"""Wall-clock checkpoints, and a stop signal sent to a whole process group (as Slurm and a
terminal do) while DataLoader workers run."""

from __future__ import annotations

import os
import re
import signal

import pytest
import torch

from switchall.config import load_run_config
from switchall.pretrain.control import EXIT_STOPPED
from switchall.pretrain.runtime import LocalRuntime
from switchall.pretrain.trainer import Trainer
from tests.launch.helpers import (
    SWITCHALL,
    finish,
    local_args,
    logged_steps,
    start,
    tiny,
    wait_for,
)

pytestmark = pytest.mark.timeout(180)


def test_checkpoints_by_wall_clock(launch_dataset, tmp_path, monkeypatch):
    import switchall.pretrain.control as control

    clock = [0.0]
    monkeypatch.setattr(control, "_now", lambda: clock[0])
    cfg = load_run_config(
        SWITCHALL,
        tiny(
            launch_dataset,
            "train.steps=12",
            "train.ckpt_every=0",
            "train.keep_checkpoints=100",
            "train.ckpt_every_minutes=1",
        ),
    )
    trainer = Trainer(cfg, tmp_path / "run", LocalRuntime(torch.device("cpu")))
    original = trainer.train_step

    def step(batch):
        clock[0] += 25.0  # every step "takes" 25 s: a checkpoint is due every third step
        return original(batch)

    trainer.train_step = step
    trainer.run()
    steps = sorted(int(p.name[-8:]) for p in (tmp_path / "run/checkpoints").iterdir())
    assert steps == [3, 6, 9, 12]


def test_a_signal_to_the_process_group_with_dataloader_workers(launch_dataset, tmp_path):
    run, log = tmp_path / "run", tmp_path / "out.txt"
    proc = start(local_args(launch_dataset, run, "data.num_workers=1"), log)
    wait_for(lambda: logged_steps(run) >= 3 or proc.poll() is not None, 120, "training")
    os.killpg(proc.pid, signal.SIGTERM)  # the trainer and its DataLoader worker
    assert finish(proc, 60) == EXIT_STOPPED, log.read_text()
    out = log.read_text()
    assert re.search(r"stopped by SIGTERM after step \d+: checkpoint", out), out
    assert "DataLoader worker" not in out
