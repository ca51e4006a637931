"""The run-directory lock: a live holder is named in the refusal, a dead one's lock is taken
over, and where flock is missing the recorded holder decides."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from switchall.pretrain.runlock import RunLock, RunLockedError

pytestmark = pytest.mark.timeout(60)

HOLD = """
import sys, time
from switchall.pretrain.runlock import RunLock
RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(60)
"""


def holder(run_dir) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_live_holder_is_refused_by_name_and_a_dead_one_is_taken_over(tmp_path):
    proc = holder(tmp_path)
    try:
        with pytest.raises(RunLockedError) as e:
            RunLock(tmp_path).acquire()
        assert f"host {socket.gethostname()} pid {proc.pid}," in str(e.value)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    lock = RunLock(tmp_path).acquire()  # the kernel dropped the dead holder's flock
    assert lock.took_over["pid"] == proc.pid
    lock.release()
    again = RunLock(tmp_path).acquire()
    assert again.took_over is None  # a clean release leaves nothing to take over
    again.release()


def test_without_flock_the_recorded_holder_decides(tmp_path, monkeypatch):
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    proc = holder(tmp_path)
    monkeypatch.setattr(fcntl, "flock", no_flock)
    try:
        with pytest.raises(RunLockedError, match=f"pid {proc.pid}.*has no flock"):
            RunLock(tmp_path).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    time.sleep(0.05)
    lock = RunLock(tmp_path).acquire()  # same host, pid gone: stale
    assert lock.took_over["pid"] == proc.pid
    lock.release()
    assert not os.path.getsize(tmp_path / ".lock")
