"""Stopping a run cleanly: signals, the agreed last step, wall-clock checkpoints, exit codes.

SIGUSR1 (Slurm's warning signal before a time limit), SIGTERM (preemption, `scancel`, a
launcher shutting down) and SIGINT (Ctrl-C) only set a flag. The training loop calls
`RunControl.after_step` once per step; it reduces (max) the flag of every rank, together with
"a wall-clock checkpoint is due", in one tiny all-reduce over all ranks, so every rank stops
after the same step and a rank that got the signal a step later than another cannot leave
the job split. The loop then writes a checkpoint and `switchall pretrain` exits with
`EXIT_STOPPED`. A second SIGINT exits at once (`EXIT_INTERRUPTED`), without a checkpoint.

Exit codes of `switchall pretrain` (and the other verbs):
- 0 `EXIT_OK`: finished (a run that was already finished does nothing and exits 0);
- 1: an unexpected error (a bug, a crash); the traceback names the rank;
- 2 `EXIT_USAGE`: a configuration, data, checkpoint or run-directory error, in one line;
- 3 `EXIT_STOPPED`: stopped by SIGUSR1 / SIGTERM / SIGINT after writing a checkpoint; the same
  command with `--resume` (or `--auto-resume`, what Slurm jobs use) continues exactly;
- 130 `EXIT_INTERRUPTED`: Ctrl-C twice, or during start-up: no checkpoint was written.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import torch

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_STOPPED = 3
EXIT_INTERRUPTED = 130

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
_now = time.monotonic  # the wall clock of `train.ckpt_every_minutes` (tests replace it)


class StopSignals:
    """Process-wide record of the first stop signal received (installed once, early).

    Installed by `switchall pretrain` before the slow imports, so a warning signal that comes
    during start-up is not lost; `RunControl` installs it too (for the Python API).
    """

    received: int | None = None
    _installed = False
    _previous: dict[int, object] = {}

    @classmethod
    def install(cls) -> bool:
        """Install the handlers (main thread only); False where that is impossible."""
        if cls._installed:
            return True
        if threading.current_thread() is not threading.main_thread():
            return False
        for sig in STOP_SIGNALS:
            cls._previous[sig] = signal.signal(sig, cls._handle)
        cls._installed = True
        return True

    @classmethod
    def uninstall(cls) -> None:
        """Restore the previous handlers and forget any signal (tests, the Python API)."""
        if not cls._installed:
            return
        for sig, handler in cls._previous.items():
            signal.signal(sig, handler)
        cls._previous, cls._installed, cls.received = {}, False, None

    @classmethod
    def _handle(cls, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if cls.received is not None:
            if signum == signal.SIGINT:
                # Written with os.write: print() is not safe inside a signal handler.
                os.write(2, b"\nsecond interrupt: exiting now, without a checkpoint\n")
                os._exit(EXIT_INTERRUPTED)
            return  # a repeated SIGTERM/SIGUSR1 (e.g. srun tearing down the step) changes nothing
        cls.received = signum
        hint = " (Ctrl-C again to exit at once)" if signum == signal.SIGINT else ""
        os.write(2, f"\n{name}: stopping after this step with a checkpoint{hint}\n".encode())

    @classmethod
    def name(cls) -> str | None:
        return None if cls.received is None else signal.Signals(cls.received).name


class RunControl:
    """The loop's per-step hook: agreed stop flag and wall-clock checkpoints.

    `after_step()` returns `(save, stop)`: write a checkpoint now (the wall-clock interval
    `train.ckpt_every_minutes` has passed on some rank), and stop after it (some rank got a
    stop signal). Both are the same on every rank. `saved(step)` records a checkpoint the loop
    wrote for other reasons, so it is not written twice.
    """

    def __init__(self, device: torch.device, ckpt_every_minutes: float = 0.0):
        self.device = device
        self.interval_s = ckpt_every_minutes * 60.0
        self.last_save = _now()
        self.saved_step: int | None = None
        self.saved_path = None
        self.stop_signal: str | None = None
        self._installed_here = not StopSignals._installed and StopSignals.install()

    def saved(self, step: int, path=None) -> None:
        self.saved_step, self.saved_path, self.last_save = step, path, _now()

    def after_step(self) -> tuple[bool, bool]:
        due = self.interval_s > 0 and _now() - self.last_save >= self.interval_s
        flags = torch.tensor(
            [float(StopSignals.received is not None), float(due)], device=self.device
        )
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        save, stop = bool(flags[1]), bool(flags[0])
        if stop:
            self.stop_signal = StopSignals.name() or "a stop signal on another rank"
        return save, stop

    def close(self) -> None:
        """Restore signal handlers installed by this object (not those of the CLI)."""
        if self._installed_here:
            StopSignals.uninstall()
            self._installed_here = False
