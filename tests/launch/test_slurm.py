"""`switchall launch slurm` on a real two-node Slurm cluster (see `slurm_cluster`): a tiny
SwitchAll with EP=2 over 2 nodes x 1 task trains to the end; sent the warning signal it
checkpoints, requeues itself and resumes bitwise; a killed rank ends the attempt within the
failure bound and the requeue resumes."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

from switchall.cli import main as cli_main
from tests.launch.helpers import REPO, SWITCHALL, logged_steps, tiny, train_losses, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.timeout(600)]

STEPS = 60
# What the tests assert for "one rank died -> the attempt ends": srun's --kill-on-bad-exit
# ends the other ranks; parallel.timeout_s bounds a rank stuck in a collective.
FAILURE_BOUND_S = 30.0
TIMEOUT_S = 20  # parallel.timeout_s in these jobs


def launch(cluster, dataset: Path, run_dir: Path, monkeypatch, *extra: str) -> str:
    monkeypatch.setenv("SLURM_CONF", cluster.env["SLURM_CONF"])
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = [
        "launch",
        "slurm",
        SWITCHALL,
        *tiny(
            dataset,
            f"train.steps={STEPS}",
            "train.ckpt_every=5",
            "parallel.expert=2",
            f"parallel.timeout_s={TIMEOUT_S}",
        ),
        *extra,
        "--run-dir",
        str(run_dir),
        "--nodes",
        "2",
        "--tasks-per-node",
        "1",
        "--signal-grace",
        "30",
        "--max-requeues",
        "2",
    ]
    assert cli_main(args) == 0
    return (run_dir / "launch/submissions.txt").read_text().split()[-2]


_PENDING_SINCE: dict[str, float] = {}


def advance(cluster, job: str) -> str:
    """The job's state; a requeued job is released at once rather than after Slurm's requeue
    delay, but not within the second of the requeue (slurmd refuses credentials issued in the
    second it revoked the old attempt's: "Job credential revoked")."""
    state = cluster.job_state(job)
    if state == "PENDING" and cluster.job_field(job, "Reason") == "BeginTime":
        since = _PENDING_SINCE.setdefault(job, time.monotonic())
        if time.monotonic() - since > 2.5:
            cluster.release(job)
            _PENDING_SINCE.pop(job)
    return state


def wait_done(cluster, job: str, timeout: float = 400) -> str:
    def finished():
        state = advance(cluster, job)
        return state if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") else None

    try:
        return wait_for(finished, timeout, f"job {job} to end", interval=0.3)
    except AssertionError:
        raise AssertionError(f"job {job} did not end:\n{cluster.logs()}") from None


def job_output(run_dir: Path, job: str) -> str:
    path = run_dir / f"logs/slurm-{job}.out"
    return path.read_text() if path.is_file() else ""


@pytest.fixture(scope="module")
def reference(slurm, launch_dataset, tmp_path_factory):
    """An uninterrupted job: its losses are what the interrupted one must reproduce."""
    run = tmp_path_factory.mktemp("slurm_ref") / "run"
    with pytest.MonkeyPatch.context() as mp:
        job = launch(slurm, launch_dataset, run, mp)
    return run, job, wait_done(slurm, job)


@pytest.fixture(scope="module")
def interrupted(slurm, launch_dataset, tmp_path_factory):
    """The same job, sent the warning signal in its first attempt and with rank 1 killed in
    its second; the third finishes. Returns what the tests look at."""
    run = tmp_path_factory.mktemp("slurm_faults") / "run"
    with pytest.MonkeyPatch.context() as mp:
        job = launch(slurm, launch_dataset, run, mp)
    wait_for(lambda: logged_steps(run) >= 3, 300, "training to start")
    slurm.run("scancel", "--signal=USR1", "--batch", job)
    stopped = wait_for(
        lambda: re.search(r"stopped by SIGUSR1 after step (\d+)", job_output(run, job)),
        120,
        "the stop",
    )
    stopped = int(stopped.group(1))
    second = run / "logs" / f"attempt-01-job{job}"
    wait_for(lambda: advance(slurm, job) and (second / "rank-1.log").is_file(), 300, "a requeue")
    wait_for(lambda: logged_steps(run) >= stopped + 4, 300, "the requeued attempt to train")
    pid = int(re.search(r"rank 1/2 on \S+ pid (\d+)", (second / "rank-1.log").read_text())[1])
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    wait_for(lambda: "failed with exit code" in job_output(run, job), 120, "the attempt to end")
    bound = time.monotonic() - killed
    print(f"rank 1 killed -> the attempt ended in {bound:.1f}s")
    return run, job, stopped, bound, wait_done(slurm, job)


def test_job_trains_to_the_end(reference):
    run, job, state = reference
    out = job_output(run, job)
    assert state == "COMPLETED", out
    assert "the run is finished" in out and f"done: step {STEPS}" in out
    assert [s for s, _ in train_losses(run)] == list(range(1, STEPS + 1))
    # Two ranks on two nodes, each with its log in the attempt's directory.
    logs = sorted((run / "logs" / f"attempt-00-job{job}").glob("rank-*.log"))
    assert [p.name for p in logs] == ["rank-0.log", "rank-1.log"]
    assert "rank 1/2" in logs[1].read_text()
    # Third-party notices went to the rank logs, not to the job's console.
    assert "Transformer Engine" not in out and "Setting accelerator" not in out


def test_a_finished_run_resubmitted_does_nothing(slurm, reference):
    run, _, _ = reference
    before = (run / "metrics.jsonl").read_bytes()
    job = slurm.run("sbatch", "--parsable", str(run / "launch/job.sbatch")).strip()
    assert wait_done(slurm, job) == "COMPLETED"
    out = job_output(run, job)
    assert f"is finished (checkpoint at step {STEPS}" in out and "the run is finished" in out
    assert (run / "metrics.jsonl").read_bytes() == before


def test_warning_signal_checkpoints_requeues_and_resumes(interrupted):
    run, job, stopped, _, state = interrupted
    out = job_output(run, job)
    assert state == "COMPLETED", out
    assert "SIGUSR1: the ranks stop after this step" in out
    assert 3 <= stopped < STEPS
    assert f"checkpoint {run}/checkpoints/step_{stopped:08d}" in out
    assert "stopped by a signal after writing a checkpoint (exit code 3): requeueing (1 of" in out
    assert f"resumed from {run}/checkpoints/step_{stopped:08d}" in out


def test_killed_rank_ends_the_attempt_and_the_requeue_resumes_exactly(interrupted, reference):
    run, job, _, bound, state = interrupted
    out = job_output(run, job)
    assert bound < FAILURE_BOUND_S, f"{bound:.1f}s:\n{out}"
    assert re.search(r"attempt 1: failed with exit code \d+ .*requeueing \(2 of at most 2", out)
    assert state == "COMPLETED" and "attempt 2: the run is finished" in out, out
    assert train_losses(run) == train_losses(reference[0])  # bitwise, one record per step
