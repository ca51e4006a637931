"""Shared pieces of the launch tests: the tiny SwitchAll, metrics checks, polling."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from tests.parallel.launch import REPO, SWITCHALL, TINY

__all__ = ["REPO", "SWITCHALL", "env", "logged_steps", "tiny", "train_losses", "wait_for"]


def tiny(dataset: Path, *extra: str) -> list[str]:
    """The tiny SwitchAll of the parallel tests (EP-shardable) on `dataset`."""
    return [*TINY, f"data.path={dataset}", *extra]


def env(**extra: str) -> dict[str, str]:
    """Environment of a training subprocess: this checkout, one thread, no warnings noise."""
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
        **extra,
    }


def records(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            out.append({"torn": line})
    return out


def logged_steps(run_dir: Path) -> int:
    """The last training step in metrics.jsonl (0 if none yet)."""
    steps = [r["step"] for r in records(run_dir) if "loss" in r]
    return max(steps, default=0)


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) of every training record, in file order; also asserts the file is what an
    uninterrupted run writes: whole lines, and no step or validation logged twice."""
    recs = records(run_dir)
    assert not [r for r in recs if "torn" in r], f"torn lines in {run_dir}/metrics.jsonl"
    train = [(r["step"], r["loss"]) for r in recs if "loss" in r]
    steps = [s for s, _ in train]
    assert steps == sorted(set(steps)), f"duplicated or out-of-order steps: {steps}"
    vals = [r["step"] for r in recs if "val_loss" in r]
    assert vals == sorted(set(vals)), f"duplicated validations: {vals}"
    return train


def wait_for(condition, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


PYTHON = sys.executable
