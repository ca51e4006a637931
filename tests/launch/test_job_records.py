"""The batch script's per-attempt records (`RunSpec.exit_file`, `attempts_file`): every way an
attempt ends (finished, configuration error, stopped by the warning signal and requeued,
crashed and requeued, crashed with no requeue left) leaves its exit code and one JSON line.

The script runs here as Slurm would run it, but with `srun` and `scontrol` replaced by small
stand-ins on PATH (the real cluster runs it in `test_sweep_slurm.py`): the stand-in srun
exits with a given code, or waits for the SIGUSR1 the script forwards and exits 3 as the
trainer does; the stand-in scontrol records the requeue it is asked for."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from switchall.launch.sbatch_script import render
from tests.launch.helpers import wait_for

pytestmark = pytest.mark.timeout(60)

SRUN = """#!/bin/bash
case $FAKE_SRUN in
  stop) trap 'exit 3' USR1; touch "$FAKE_READY"; while :; do sleep 0.02; done ;;
  *) exit "$FAKE_SRUN" ;;
esac
"""
SCONTROL = """#!/bin/bash
case $1 in
  show) [ "$2" = hostnames ] && echo n1 || echo "NodeName=n1 NodeAddr=127.0.0.1" ;;
  requeue) echo "$2" >>"$FAKE_CALLS" ;;
esac
"""


@pytest.fixture
def job(tmp_path):
    """Renders a two-run array script with records; returns a function that runs task 1."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in {"srun": SRUN, "scontrol": SCONTROL}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    runs = [tmp_path / "a", tmp_path / "b"]
    for r in runs:
        r.mkdir()
    script = tmp_path / "array.sbatch"
    script.write_text(
        render(
            script=str(script),
            sbatch=["--array=0-1"],
            python="python",
            run_dirs=[str(r) for r in runs],
            max_requeues=2,
            shape="test",
            pretrain_flags=[],
            array=True,
            exit_files=[str(r / "exit_code") for r in runs],
            attempt_files=[str(r / "attempts.jsonl") for r in runs],
        )
    )

    def run(mode: str, attempt: int = 0) -> tuple[int, str]:
        env = {
            **os.environ,
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "FAKE_SRUN": mode,
            "FAKE_READY": str(tmp_path / "ready"),
            "FAKE_CALLS": str(tmp_path / "requeues"),
            "SLURM_JOB_ID": "8",
            "SLURM_ARRAY_JOB_ID": "7",
            "SLURM_ARRAY_TASK_ID": "1",
            "SLURM_JOB_NODELIST": "n1",
            "SLURM_NNODES": "1",
            "SLURM_NTASKS": "1",
            "SLURM_RESTART_COUNT": str(attempt),
        }
        proc = subprocess.Popen(["bash", str(script)], env=env)
        if mode == "stop":  # the warning signal reaches the batch shell, as --signal=B: sends it
            wait_for((tmp_path / "ready").is_file, 20, "the stand-in srun to start")
            time.sleep(0.2)
            proc.send_signal(signal.SIGUSR1)
        code = proc.wait(timeout=30)
        requeues = tmp_path / "requeues"
        return code, requeues.read_text() if requeues.is_file() else ""

    return runs, run


@pytest.mark.parametrize(
    "mode, attempt, code, requeued",
    [
        ("0", 0, 0, False),  # finished
        ("2", 0, 2, False),  # configuration / data error: not requeued
        ("stop", 0, 3, True),  # the warning signal: checkpoint, exit 3, requeue (no failure)
        ("137", 1, 137, True),  # a rank killed: requeued
        ("1", 2, 1, False),  # a crash with every requeue used
    ],
)
def test_every_attempt_records_its_exit_code(job, mode, attempt, code, requeued):
    runs, run = job
    rc, requeues = run(mode, attempt)
    assert rc == code
    assert requeues == ("7_1\n" if requeued else "")
    assert (runs[1] / "exit_code").read_text() == f"{code}\n"
    lines = (runs[1] / "attempts.jsonl").read_text().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["exit"] == code and record["job"] == "7_1" and record["attempt"] == attempt
    assert 0 <= record["seconds"] < 30 and abs(record["time"] - time.time()) < 60
    assert not (runs[0] / "exit_code").exists()  # task 1 writes run 1's files only


def test_attempts_append_and_the_exit_file_is_replaced(job):
    runs, run = job
    assert run("stop")[0] == 3
    assert run("0", attempt=1)[0] == 0
    assert (runs[1] / "exit_code").read_text() == "0\n"
    records = [json.loads(x) for x in (runs[1] / "attempts.jsonl").read_text().splitlines()]
    assert [(r["exit"], r["attempt"]) for r in records] == [(3, 0), (0, 1)]
    assert not list(runs[1].glob("*.tmp"))


def test_a_script_without_records_has_none():
    text = render(
        script="/x/job.sbatch",
        sbatch=[],
        python="python",
        run_dirs=["/r"],
        max_requeues=1,
        shape="test",
        pretrain_flags=[],
        array=False,
    )
    assert "EXIT_FILES" not in text and 'record "$rc"' not in text
