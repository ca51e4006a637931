"""Shared pieces of the launch tests: the tiny SwitchAll, metrics checks, polling."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from tests.parallel.launch import REPO, SWITCHALL, TINY

__all__ = ["REPO", "SWITCHALL", "env", "logged_steps", "tiny", "train_losses", "wait_for"]


def tiny(dataset: Path, *extra: str) -> list[str]:
    """The tiny SwitchAll of the parallel tests (EP-shardable) on `dataset`."""
    return [*TINY, f"data.path={dataset}", *extra]


def env(**extra: str) -> dict[str, str]:
    """Environment of a training subprocess: this checkout, one thread, no warnings noise."""
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
        **extra,
    }


def records(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            out.append({"torn": line})
    return out


def logged_steps(run_dir: Path) -> int:
    """The last training step in metrics.jsonl (0 if none yet)."""
    steps = [r["step"] for r in records(run_dir) if "loss" in r]
    return max(steps, default=0)


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) of every training record, in file order; also asserts the file is what an
    uninterrupted run writes: whole lines, and no step or validation logged twice."""
    recs = records(run_dir)
    assert not [r for r in recs if "torn" in r], f"torn lines in {run_dir}/metrics.jsonl"
    train = [(r["step"], r["loss"]) for r in recs if "loss" in r]
    steps = [s for s, _ in train]
    assert steps == sorted(set(steps)), f"duplicated or out-of-order steps: {steps}"
    vals = [r["step"] for r in recs if "val_loss" in r]
    assert vals == sorted(set(vals)), f"duplicated validations: {vals}"
    return train


def wait_for(condition, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


PYTHON = sys.executable

DRIVER = Path(__file__).with_name("driver.py")
# The local fault-injection runs: short steps, a checkpoint every 10, every step logged.
LOCAL_STEPS = 160
LOCAL_CKPT_EVERY = 10


def local_args(dataset: Path, run_dir: Path, *extra: str) -> list[str]:
    """`pretrain` arguments of the local chains; `extra`: overrides and `--flags`."""
    overrides = [x for x in extra if not x.startswith("--")]
    flags = [x for x in extra if x.startswith("--")]
    return [
        "pretrain",
        SWITCHALL,
        *tiny(dataset, f"train.steps={LOCAL_STEPS}", f"train.ckpt_every={LOCAL_CKPT_EVERY}"),
        *overrides,
        "--run-dir",
        str(run_dir),
        *flags,
    ]


class Zygote:
    """The fork server of `zygote.py`, started on first use (one per test session)."""

    _instance: Zygote | None = None

    def __init__(self):
        import subprocess

        self.proc = subprocess.Popen(
            [PYTHON, str(Path(__file__).with_name("zygote.py"))],
            cwd=REPO,
            env=env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    @classmethod
    def get(cls) -> Zygote:
        if cls._instance is None or cls._instance.proc.poll() is not None:
            import atexit

            cls._instance = cls()
            atexit.register(cls._instance.close)
        return cls._instance

    def ask(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the zygote died")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Child:
    """A forked trainer, with the part of Popen's interface the tests use."""

    def __init__(self, zygote: Zygote, pid: int, args: list[str]):
        self.zygote, self.pid, self.args = zygote, pid, args
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.zygote.ask(op="poll", pid=self.pid)["status"]
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        import subprocess

        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.02)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)


def start(args: list[str], log: Path, driver: bool = False, **extra_env: str) -> Child:
    """Start `switchall ARGS` (with the fault driver's faults from `extra_env` if `driver`)
    as a fresh process in its own session, output appended to `log`."""
    z = Zygote.get()
    pid = z.ask(op="start", args=args, log=str(log), env=extra_env, driver=driver)["pid"]
    return Child(z, pid, args)


def finish(proc, timeout: float) -> int:
    """Wait for `proc`; kill its whole session and fail on timeout."""
    import signal
    import subprocess

    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"{proc.args} did not end within {timeout}s") from None
