"""What every launched training process sets up for itself: its log, quiet third-party
imports, and an exit when its launcher dies.

Rank log: `$SWITCHALL_LOG_DIR/rank-R.log` (the Slurm script points it at the attempt's
directory) or `RUN/logs/rank-R.log`. It gets a banner per start (host, pid, command), what
third-party libraries print while the distributed stack is imported and set up (megatron's
Transformer Engine/Apex notices, DeepSpeed's accelerator and op-build lines, and DeepSpeed's
later log lines, whose handler is bound to it), and the traceback of a failure. Until the run
directory is known to exist on this rank, the text is kept in memory.

Launcher death: torchrun starts its workers in their own sessions, so a `kill -9` of torchrun
(or of its process group) used to leave them training. Under torchrun each worker asks the
kernel for SIGTERM when its parent dies (Linux `prctl(PR_SET_PDEATHSIG)`, else a watchdog
thread polling the parent pid), which stops it like any other SIGTERM: at the end of the step,
with a checkpoint, the ranks agreeing on the step.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import shlex
import signal
import socket
import sys
import threading
import time
import warnings
from pathlib import Path

PR_SET_PDEATHSIG = 1


def log_dir_for(run_dir: str | Path) -> Path:
    return Path(os.environ.get("SWITCHALL_LOG_DIR") or Path(run_dir) / "logs")


class RankLog(io.TextIOBase):
    """A text stream that buffers until `attach(path)`, then appends to that file."""

    def __init__(self):
        self._buffer: list[str] = []
        self._file = None
        self.path: Path | None = None
        self._lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with self._lock:
            if self._file is not None:
                self._file.write(text)
                self._file.flush()
            else:
                self._buffer.append(text)
        return len(text)

    def attach(self, path: Path) -> None:
        with self._lock:
            if self._file is not None:
                return
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", buffering=1)
            self.path = path
            self._file.write("".join(self._buffer))
            self._buffer = []

    def banner(self, rank: int, world: int) -> None:
        self.write(
            f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} rank {rank}/{world} on "
            f"{socket.gethostname()} pid {os.getpid()}: {shlex.join(sys.argv)}\n"
        )


RANK_LOG = RankLog()


@contextlib.contextmanager
def third_party_output_to_log():
    """Send what is printed or warned inside the block to the rank log, not the console."""
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # each notice once per process, in the log
        with contextlib.redirect_stdout(RANK_LOG), contextlib.redirect_stderr(RANK_LOG):
            yield


def exit_with_parent(sig: int = signal.SIGTERM) -> None:
    """Deliver `sig` to this process when its parent (the launcher) dies."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0:
                if os.getppid() != parent:  # it died before prctl took effect
                    os.kill(os.getpid(), sig)
                return
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), sig)

    threading.Thread(target=watch, name="switchall-parent-watch", daemon=True).start()


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ
