"""One trainer per run directory: `RUN/.lock`, held by global rank 0 for the life of the run.

The lock is an exclusive `flock` on `RUN/.lock`, so the kernel (or the NFS lock manager)
releases it whenever its holder dies, however it dies: a `kill -9` never leaves a stale lock
behind, and taking over after a dead holder is the same atomic `flock` call. The file's content
names the holder (host, pid, Slurm job, start time) for the error a second trainer gets; it
is emptied on a clean release, so content found when the lock is free names a holder that
died, which is reported as taken over.

On a filesystem without working `flock` (some Lustre mounts) the content alone decides: a
holder on this host whose pid is gone is taken over, a holder on another host is refused
unless it is an earlier attempt of this same Slurm job (requeued jobs restart elsewhere).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_NAME = ".lock"


class RunLockedError(RuntimeError):
    """Another live trainer holds the run directory; the message names it."""


def _holder() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job": os.environ.get("SLURM_JOB_ID"),
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _describe(h: dict) -> str:
    job = f", Slurm job {h['slurm_job']}" if h.get("slurm_job") else ""
    return f"host {h.get('host')} pid {h.get('pid')}{job}, since {h.get('since')}"


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True
    return True


class RunLock:
    """`RunLock(run_dir).acquire()`; `release()` (or process exit) frees it.

    Locks this process holds are registered by path, so the trainer finds the one that
    `switchall pretrain` took before the process group existed (`RunLock.held_here`).
    """

    _held: dict[str, RunLock] = {}

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None
        self.took_over: dict | None = None
        """The holder recorded by a run that died holding the lock, if any."""

    @classmethod
    def held_here(cls, run_dir: str | Path) -> RunLock | None:
        return cls._held.get(os.path.realpath(Path(run_dir) / LOCK_NAME))

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _read(self, fd: int) -> dict | None:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 4096)
        try:
            return json.loads(raw) if raw.strip() else None
        except ValueError:
            return {"host": "?", "pid": "?", "since": "?"}

    def acquire(self) -> RunLock:
        if self.held:
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                flock_works = True
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    holder = self._read(fd) or {}
                    raise RunLockedError(
                        f"{self.path.parent} is in use by another trainer ({_describe(holder)}); "
                        "stop it first, or use another --run-dir"
                    ) from None
                flock_works = False  # ENOLCK / EOPNOTSUPP: no locking on this filesystem
            previous = self._read(fd)
            if previous and not flock_works and not self._stale(previous):
                raise RunLockedError(
                    f"{self.path.parent} is in use by another trainer ({_describe(previous)}) "
                    f"(this filesystem has no flock, so if that process is gone, delete "
                    f"{self.path})"
                )
            self.took_over = previous
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, json.dumps(_holder()).encode())
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        RunLock._held[os.path.realpath(self.path)] = self
        return self

    @staticmethod
    def _stale(h: dict) -> bool:
        if h.get("host") == socket.gethostname():
            return not _pid_alive(h.get("pid"))
        job = os.environ.get("SLURM_JOB_ID")
        return job is not None and h.get("slurm_job") == job

    def release(self) -> None:
        if self._fd is None:
            return
        RunLock._held.pop(os.path.realpath(self.path), None)
        try:
            os.ftruncate(self._fd, 0)  # empty: a clean release, nothing to take over
        finally:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __del__(self):
        if self._fd is not None and sys is not None:
            self.release()


def holder_of(run_dir: str | Path) -> str | None:
    """Who holds `run_dir` now (for `switchall launch`'s pre-submission check), else None."""
    try:
        RunLock(run_dir).acquire().release()
    except RunLockedError as e:
        return str(e)
    except FileNotFoundError:
        return None
    return None
