"""torchrun jobs under faults: two torchrun "nodes" on this machine train and stop together
when only one rank gets the signal; a rank that raises ends the job within the failure bound,
with its rank and traceback; a killed torchrun takes its workers with it (they stop with a
checkpoint), and while a run is alive a second trainer on its directory is refused."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from switchall.cli import main as cli_main
from switchall.launch.local import free_port
from switchall.pretrain.checkpoint import CheckpointManager
from switchall.pretrain.control import StopSignals
from switchall.pretrain.runlock import RunLock
from tests.launch.helpers import (
    REPO,
    env,
    finish,
    local_args,
    logged_steps,
    train_losses,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.timeout(600)]

FAILURE_BOUND_S = 30.0
TIMEOUT = ["parallel.timeout_s=20"]
DRIVER = str(Path(__file__).with_name("driver.py"))


def torchrun(args: list[str], log: Path, *, nproc: int = 1, nodes: str = "", **extra):
    """Start torchrun (its own session) running the fault driver = `switchall ARGS`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    cmd += nodes.split() if nodes else ["--master-addr=127.0.0.1", f"--master-port={free_port()}"]
    return subprocess.Popen(
        [*cmd, DRIVER, *args],
        cwd=REPO,
        env=env(**extra),
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def rank_pid(run: Path, rank: int) -> int:
    """A worker's pid, from the banner of its rank log."""
    log = run / "logs" / f"rank-{rank}.log"
    text = wait_for(lambda: log.is_file() and log.read_text(), 120, f"{log}")
    return int(re.findall(rf"rank {rank}/\d+ on \S+ pid (\d+)", text)[-1])


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_two_nodes_agree_on_the_stop_step_and_a_raising_rank_ends_the_job(
    launch_dataset, local_reference, tmp_path
):
    run, log = tmp_path / "run", tmp_path / "out.txt"
    args = local_args(launch_dataset, run, "parallel.expert=2", *TIMEOUT)
    port = free_port()
    nodes = [
        torchrun(args, log, nodes=f"--nnodes=2 --node-rank={r} --rdzv-endpoint=127.0.0.1:{port}")
        for r in (0, 1)
    ]
    wait_for(
        lambda: logged_steps(run) >= 5 or any(p.poll() is not None for p in nodes),
        240,
        "the two-node job to train",
    )
    os.kill(rank_pid(run, 1), signal.SIGUSR1)  # only the rank on the second "node"
    codes = [finish(p, 120) for p in nodes]
    out = log.read_text()
    assert codes == [1, 1], out  # torchrun reports its worker's exit code 3 as a failure
    m = re.search(r"stopped by (\S+ ?.*?) after step (\d+): checkpoint", out)
    assert m and m.group(1) == "a stop signal on another rank", out
    step = int(m.group(2))
    # One checkpoint, complete, at the agreed step: both ranks stopped after the same one.
    assert CheckpointManager(run / "checkpoints").latest().name == f"step_{step:08d}"
    ref = dict(local_reference)
    for s, loss in train_losses(run):
        assert loss == pytest.approx(ref[s], rel=1e-5), s  # EP=2 over two nodes = one process
    # Resumed on one node; rank 1 raises a few steps later: the job ends within the bound,
    # naming the rank, with its traceback, and exits non-zero.
    stamp = tmp_path / "raised"
    proc = torchrun(
        local_args(launch_dataset, run, "parallel.expert=2", *TIMEOUT, "--resume"),
        log,
        nproc=2,
        FAULT_RAISE_AT_STEP=str(step + 3),
        FAULT_RAISE_RANK="1",
        FAULT_RAISE_STAMP=str(stamp),
    )
    code = finish(proc, 240)
    ended = time.time()
    out = log.read_text()
    assert code != 0, out
    bound = ended - float(stamp.read_text())
    assert bound < FAILURE_BOUND_S, f"{bound:.1f}s"
    print(f"a raising rank ended the 2-rank torchrun job in {bound:.1f}s")
    assert re.search(r"switchall pretrain: rank 1/2 on \S+ \(pid \d+\) failed:\nTraceback", out)
    assert f"RuntimeError: injected failure in step {step + 3} on rank 1" in out


def test_killed_torchrun_stops_its_workers_and_a_second_trainer_is_refused(
    launch_dataset, tmp_path, capsys
):
    run, log = tmp_path / "run", tmp_path / "out.txt"
    proc = torchrun(local_args(launch_dataset, run, *TIMEOUT), log, nproc=2)
    wait_for(lambda: logged_steps(run) >= 3 or proc.poll() is not None, 240, "training")
    assert proc.poll() is None, log.read_text()
    pids = [rank_pid(run, r) for r in (0, 1)]
    # A second trainer (here: `switchall pretrain --resume` in this process) is refused,
    # naming the holder, before it builds anything.
    try:
        assert cli_main(local_args(launch_dataset, run, "--resume")) == 2
    finally:
        StopSignals.uninstall()
    err = capsys.readouterr().err
    assert f"in use by another trainer (host {socket.gethostname()} pid {pids[0]}," in err, err
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its process group, not its workers
    proc.wait()
    wait_for(lambda: all(gone(p) for p in pids), 60, "the workers to exit")
    out = log.read_text()
    # Third-party notices (megatron's TE/Apex, DeepSpeed's accelerator and op build) are in the
    # rank logs, not on the console.
    for noise in ("Transformer Engine", "Setting accelerator", "built successfully"):
        assert noise not in out and noise in (run / "logs/rank-1.log").read_text(), noise
    assert out.count("SIGTERM: stopping after this step") == 2, out
    m = re.search(r"stopped by SIGTERM after step (\d+)", out)
    assert m, out
    assert CheckpointManager(run / "checkpoints").latest().name == f"step_{int(m.group(1)):08d}"
    RunLock(run).acquire().release()  # released by the workers' clean exit


def test_a_config_error_under_torchrun_is_printed_once_without_noise(launch_dataset, tmp_path):
    log = tmp_path / "out.txt"
    proc = torchrun(local_args(launch_dataset, tmp_path / "run", "parallel.expert=3"), log, nproc=2)
    assert finish(proc, 120) != 0
    out = log.read_text()
    error = "switchall pretrain: configuration error: parallel.expert: 3 does not divide"
    assert out.count(error) == 1, out
    assert "rank 1" not in out.split("ChildFailedError")[0], out  # rank 0 alone reports it
    assert not (tmp_path / "run").exists()
