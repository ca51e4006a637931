"""Launching multi-process jobs from tests: torchrun on a free port, killed on timeout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from switchall.launch.local import torchrun_command
from tests.subproc import REPO, subprocess_env

WORKER = Path(__file__).with_name("worker.py")

# Shared by both tiny models: byte vocabulary, short sequences, a short schedule.
_SHAPE = [
    "model.vocab_size=256",
    "model.d_model=32",
    "model.n_layers=2",
    "model.seq_len=16",
    "model.dropout=0.0",
]
_TRAIN = [
    "train.batch_size=8",
    "train.log_every=1",
    "train.eval_batches=2",
    "optim.lr=3e-3",
    "optim.warmup_steps=3",
    "logging.wandb=disabled",
]
# A small SwitchAll: 2 heads (the paper's small models' head count) of 3 experts, σ-MoE of
# 4 experts, byte vocabulary. Expert dropout on both sides: its draws are a hash of the global
# token row and expert, so every layout must drop the same experts. No residual dropout: that
# comes from the torch RNG, which a data-parallel layout splits differently.
TINY = [
    *_SHAPE,
    "model.attention.n_heads=2",
    "model.attention.d_head=16",
    "model.attention.n_experts=3",
    "model.attention.k=2",
    "model.attention.expert_dropout=0.1",
    "model.moe.n_experts=4",
    "model.moe.expert_size=16",
    "model.moe.k=2",
    "model.moe.expert_dropout=0.1",
    *_TRAIN,
]
TINY_TRANSFORMER = [
    *_SHAPE,
    "model.attention.n_heads=4",
    "model.attention.d_head=8",
    "model.mlp.d_ff=64",
    *_TRAIN,
]
SWITCHALL = str(REPO / "configs/demo_switchall.yaml")
TRANSFORMER = str(REPO / "configs/demo_transformer.yaml")


def torchrun(nproc: int, args: list[str], timeout: float, cwd: Path = REPO) -> str:
    """Run `torchrun --nproc_per_node nproc ARGS`; fail (killing every rank) on error or timeout.

    The job runs in its own session, so a hang is ended by killing the whole process group.
    """
    cmd = torchrun_command(nproc, args)
    env = subprocess_env(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} timed out after {timeout}s:\n{output[-6000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited with {proc.returncode}:\n{output[-6000:]}")
    return output


def run_cases(nproc: int, cases: list[dict], out: Path, timeout: float) -> dict:
    """Run `cases` (see worker.py) in one torchrun job; returns rank 0's results."""
    out.mkdir(parents=True, exist_ok=True)
    spec = out / "spec.json"
    spec.write_text(json.dumps({"out": str(out), "cases": cases}))
    torchrun(nproc, [str(WORKER), str(spec)], timeout)
    results = json.loads((out / "results.json").read_text())
    # Every rank imported the checkout under test, not an installed copy of switchall.
    imported = results.pop("switchall_imported_from")
    assert len(imported) == nproc, imported
    for path in imported:
        assert Path(path).resolve().is_relative_to(REPO / "switchall"), (path, REPO)
    return results
