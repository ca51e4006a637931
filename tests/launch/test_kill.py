"""kill -9 at random moments, of training and of checkpoint saving, in one run directory:
every restart resumes from the latest complete checkpoint (losing only the steps since it),
and after the last one the run's losses equal an uninterrupted run's bit for bit, with one
metrics record per step (a torn last line, as a kill mid-write leaves, is cut off too).

Seeded: a failure names its trial and reproduces with the same seed."""

from __future__ import annotations

import random
import re
import signal
import time

import pytest

from switchall.pretrain.checkpoint import CheckpointManager
from switchall.pretrain.metrics import read_metrics
from tests.launch.helpers import (
    LOCAL_CKPT_EVERY,
    LOCAL_STEPS,
    finish,
    local_args,
    logged_steps,
    start,
    train_losses,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SEED = 20261201
TRIALS = 12
# Filesystem write events of one save of this tiny single-process run (see driver.py), about;
# a random event number up to this many saves' worth lands in a random save or prune.
EVENTS_PER_SAVE = 12


def latest_step(run) -> int:
    latest = CheckpointManager(run / "checkpoints").latest()
    return int(re.search(r"(\d+)$", latest.name).group(1)) if latest else 0


def test_kill9_at_random_moments_resumes_exactly(launch_dataset, local_reference, tmp_path):
    rng = random.Random(SEED)
    run, log = tmp_path / "run", tmp_path / "out.txt"
    kinds = ["training", "checkpoint"] * (TRIALS // 2)
    rng.shuffle(kinds)
    for trial, kind in enumerate(kinds):
        flags = ["--resume"] if trial else []
        resumed_from = latest_step(run)
        if trial == 5:  # a kill mid-write leaves a torn last line in metrics.jsonl
            with open(run / "metrics.jsonl", "a") as f:
                f.write('{"step": 99999, "loss": 1.')
        where = f"trial {trial} ({kind}, seed {SEED})"
        if kind == "training":
            proc = start(local_args(launch_dataset, run, *flags), log)
            # Past what the killed run logged, so that the kill lands in new training.
            target = max(resumed_from, logged_steps(run)) + rng.randint(1, 10)
            wait_for(
                lambda t=target, p=proc: logged_steps(run) >= t or p.poll() is not None,
                120,
                f"{where}: step {target}",
                interval=0.02,
            )
            time.sleep(rng.uniform(0, 0.05))
            proc.send_signal(signal.SIGKILL)
            code = finish(proc, 60)
        else:
            # Events 1-2 are the start-up writability probe; every later one is inside a
            # checkpoint save or prune, so exit by SIGKILL proves the kill landed there.
            event = rng.randint(3, 3 * EVENTS_PER_SAVE)
            proc = start(
                local_args(launch_dataset, run, *flags),
                log,
                driver=True,
                FAULT_KILL_AT_CKPT_EVENT=str(event),
            )
            code = finish(proc, 120)
        assert code == -signal.SIGKILL, f"{where}: exit {code}\n{log.read_text()[-3000:]}"
        # Whatever was complete before the kill is still there and is what the next start uses.
        assert latest_step(run) >= resumed_from, where
    proc = start(local_args(launch_dataset, run, "--resume"), log)
    assert finish(proc, 240) == 0, log.read_text()[-3000:]
    assert train_losses(run) == local_reference
    records = read_metrics(run / "metrics.jsonl")
    assert not [r for r in records if r.get("step") == 99999]
    assert len([r for r in records if r.get("event") == "resume"]) >= TRIALS - 1
    assert [r["step"] for r in records if "val_loss" in r] == [0, LOCAL_STEPS]
    assert LOCAL_CKPT_EVERY == 10
