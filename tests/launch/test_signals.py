"""SIGTERM, SIGUSR1 and SIGINT stop a local run after the step it is in, with a checkpoint and
exit code 3; a second Ctrl-C exits at once with 130; the run then resumes to the exact losses
of an uninterrupted one, with one metrics record per step."""

from __future__ import annotations

import re
import signal
import time

import pytest

from switchall.pretrain.control import EXIT_INTERRUPTED, EXIT_STOPPED
from switchall.pretrain.metrics import read_metrics
from tests.launch.helpers import finish, local_args, logged_steps, start, train_losses, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def stop_with(sig_list, run, args, log, after: int, **env) -> tuple[int, str]:
    """Start the run, send the signals once it logged step `after`; (exit code, output)."""
    offset = log.stat().st_size if log.exists() else 0
    proc = start(args, log, driver=bool(env), **env)
    wait_for(lambda: logged_steps(run) >= after or proc.poll() is not None, 120, "training")
    for i, sig in enumerate(sig_list):
        if i:
            time.sleep(0.5)  # a separate Ctrl-C, not two at once
        proc.send_signal(sig)
    code = finish(proc, 120)
    return code, log.read_bytes()[offset:].decode()


def test_each_stop_signal_checkpoints_and_the_run_resumes_exactly(
    launch_dataset, local_reference, tmp_path
):
    run, log = tmp_path / "run", tmp_path / "out.txt"
    step = 0
    for i, sig in enumerate((signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)):
        args = local_args(launch_dataset, run, *(["--resume"] if i else []))
        code, out = stop_with([sig], run, args, log, after=step + 8)
        assert code == EXIT_STOPPED, out
        m = re.search(rf"stopped by {sig.name} after step (\d+): checkpoint (\S+);", out)
        assert m, out
        stopped_at = int(m.group(1))
        assert step + 8 <= stopped_at < 160, out
        assert m.group(2).endswith(f"step_{stopped_at:08d}")
        assert "Traceback" not in out and "KeyboardInterrupt" not in out
        step = stopped_at
    # Ctrl-C twice, the second while the stop's checkpoint is being written (made slow):
    # out at once; the checkpoint it interrupted never counts, the earlier ones stay.
    code, out = stop_with(
        [signal.SIGINT, signal.SIGINT], run, local_args(launch_dataset, run, "--resume"), log,
        after=step + 8, FAULT_SLOW_STOP_SAVE_S="0.3",
    )  # fmt: skip
    assert code == EXIT_INTERRUPTED, out
    assert "second interrupt: exiting now" in out and "Traceback" not in out
    proc = start(local_args(launch_dataset, run, "--resume"), log)
    assert finish(proc, 240) == 0, log.read_text()
    assert train_losses(run) == local_reference  # bitwise, one record per step
    resumes = [r["step"] for r in read_metrics(run / "metrics.jsonl") if r.get("event")]
    assert len(resumes) == 4, resumes  # one per resumed start
