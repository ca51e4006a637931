"""How sweep points get run: one small interface, and the local implementation.

The runner turns points into run directories and one command per point (`PointJob`); a backend
runs the commands and records each one's exit code in `job.exit_file`. `LocalBackend` runs them
as subprocesses on this machine, N at a time. A Slurm job array is a second implementation of
the same interface: one array task per job, each running `job.command` with `job.env`, its
output appended to `job.log` and `$?` written to `job.exit_file`, after which the runner reads
the run directories exactly as it does for local points.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from switchall.fileio import write_atomic


@dataclass
class PointJob:
    name: str
    run_dir: Path
    command: list[str]
    env: dict[str, str]
    log: Path
    """stdout and stderr of every attempt, appended."""
    exit_file: Path
    """Where the backend writes the exit code of the attempt."""


# (job, exit code, seconds) after each attempt, on the runner's side.
OnDone = Callable[[PointJob, int, float], None]


class Backend(Protocol):
    def run(self, jobs: list[PointJob], on_done: OnDone) -> None:
        """Run every job to completion (or until interrupted); call `on_done` after each."""
        ...


def record_exit(job: PointJob, code: int) -> None:
    write_atomic(job.exit_file, f"{code}\n".encode())


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the runner dies, even by SIGKILL (Linux), so a
    killed sweep never leaves a trainer writing into a run directory the next sweep resumes."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class LocalBackend:
    """Subprocesses on this machine, `parallel` at a time, each with its share of the cores."""

    def __init__(self, parallel: int = 1, poll_s: float = 0.2):
        if parallel < 1:
            raise ValueError("--parallel must be >= 1")
        self.parallel, self.poll_s = parallel, poll_s

    def _threads(self) -> str:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return str(max(1, (cores or 1) // self.parallel))

    def _start(self, job: PointJob) -> subprocess.Popen:
        env = dict(job.env)
        # Points running side by side would oversubscribe the cores with torch's default
        # threads; a user's own setting wins.
        env.setdefault("OMP_NUM_THREADS", self._threads())
        job.log.parent.mkdir(parents=True, exist_ok=True)
        with open(job.log, "ab") as log:
            log.write(
                f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(job.command)}\n".encode()
            )
            log.flush()
            return subprocess.Popen(
                job.command,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
            )

    def run(self, jobs: list[PointJob], on_done: OnDone) -> None:
        queue = list(jobs)
        running: list[tuple[PointJob, subprocess.Popen, float]] = []
        try:
            while queue or running:
                while queue and len(running) < self.parallel:
                    job = queue.pop(0)
                    running.append((job, self._start(job), time.time()))
                time.sleep(self.poll_s)
                still = []
                for job, proc, start in running:
                    code = proc.poll()
                    if code is None:
                        still.append((job, proc, start))
                        continue
                    record_exit(job, code)
                    on_done(job, code, time.time() - start)
                running = still
        finally:
            for _, proc, _ in running:  # interrupted: stop our children, leave their checkpoints
                if proc.poll() is None:
                    proc.terminate()
            for _, proc, _ in running:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
