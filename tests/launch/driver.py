"""`python tests/launch/driver.py ARGS...` = `switchall ARGS...` with a fault injected, for the
fault-injection tests. Set by environment variables (read once, at start):

- `FAULT_KILL_AT_CKPT_EVENT=N`: SIGKILL this process at its N-th filesystem write event under
  a `checkpoints` directory (creating, opening for writing, renaming, removing; counted with a
  Python audit hook, so it does not depend on how the checkpoint code is written). A random N
  is a random moment inside some checkpoint save (or pruning).
- `FAULT_SLOW_STOP_SAVE_S=T`: once a stop signal was received, sleep T seconds at every such
  event, so the checkpoint written for the stop takes long (a second Ctrl-C lands inside it).
- `FAULT_RAISE_AT_STEP=S`, `FAULT_RAISE_RANK=R`: rank R raises RuntimeError in training step S
  (after writing the time to `FAULT_RAISE_STAMP`, a file, for the failure-bound measurement).
"""

from __future__ import annotations

import os
import signal
import sys
import time


def _checkpoint_events(kill_at: int | None, slow_stop_s: float | None) -> None:
    count = 0

    def hook(event: str, args: tuple) -> None:
        nonlocal count
        if event not in ("open", "os.rename", "os.remove", "os.rmdir", "os.mkdir"):
            return
        path = str(args[0]) if args else ""
        if event == "open":
            mode = args[1] if len(args) > 1 else None
            if mode is not None and not any(c in str(mode) for c in "wax+"):
                return  # a read
        in_checkpoints = "checkpoints" in path
        # shutil.rmtree removes entries by name relative to an open directory
        relative_removal = event in ("os.remove", "os.rmdir") and "/" not in path
        if in_checkpoints or relative_removal:
            count += 1
            if count == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if slow_stop_s:
                from switchall.pretrain.control import StopSignals

                if StopSignals.received is not None:
                    time.sleep(slow_stop_s)

    sys.addaudithook(hook)


def _raise_at_step(step: int, rank: int, stamp: str | None) -> None:
    from switchall.pretrain.trainer import Trainer

    original = Trainer.train_step

    def train_step(self, batch):
        if self.runtime.rank == rank and self.step + 1 == step:
            if stamp:
                with open(stamp, "w") as f:
                    f.write(repr(time.time()))
            raise RuntimeError(f"injected failure in step {step} on rank {rank}")
        return original(self, batch)

    Trainer.train_step = train_step


def install_faults(env) -> None:
    """Install the faults the environment asks for (see the module docstring)."""
    if env.get("FAULT_KILL_AT_CKPT_EVENT") or env.get("FAULT_SLOW_STOP_SAVE_S"):
        _checkpoint_events(
            int(env.get("FAULT_KILL_AT_CKPT_EVENT") or 0) or None,
            float(env.get("FAULT_SLOW_STOP_SAVE_S") or 0) or None,
        )
    if env.get("FAULT_RAISE_AT_STEP"):
        _raise_at_step(
            int(env["FAULT_RAISE_AT_STEP"]),
            int(env.get("FAULT_RAISE_RANK", "0")),
            env.get("FAULT_RAISE_STAMP"),
        )


if __name__ == "__main__":
    install_faults(os.environ)
    from switchall.cli import run

    run()
