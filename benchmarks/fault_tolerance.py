"""Stopping, checkpointing and failure detection at the demo size (configs/demo_switchall.yaml
on the embedded corpus, prepared into data/stdlib if missing).

- warning signal -> exit: `switchall pretrain` is sent SIGUSR1 mid-run; the time until the
  process has exited (the step it was in, the agreed stop, the checkpoint, shutdown);
- checkpoint save / load: `Trainer.save()` and the resume load, median of 5, and the size;
- failure detection: a 2-rank torchrun job (DP=2) whose rank 1 raises, or is `kill -9`ed,
  in a training step; the time until torchrun has exited, non-zero.

    .venv/bin/python benchmarks/fault_tolerance.py            # all three, 3 repeats
    .venv/bin/python benchmarks/fault_tolerance.py --repeats 1 --skip-distributed
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs/demo_switchall.yaml")
DATA = REPO / "data/stdlib"
BASE = [f"data.path={DATA}", "logging.wandb=disabled", "train.log_every=1", "train.steps=100000"]


def env() -> dict:
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
    }


def last_step(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(x).get("step", 0) for x in path.read_text().splitlines() if '"loss"' in x]
    return max(steps, default=0)


def wait_step(run: Path, proc, step: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while last_step(run) < step:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the run ended or stalled before step {step}")
        time.sleep(0.05)


def signal_to_exit(tmp: Path, i: int) -> dict:
    run = tmp / f"signal{i}"
    cmd = [sys.executable, "-m", "switchall", "pretrain", CONFIG, *BASE, "--run-dir", str(run)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, text=True)
    wait_step(run, proc, 5)
    sent = time.monotonic()
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=600)
    took = time.monotonic() - sent
    m = re.search(r"stopped by SIGUSR1 after step (\d+)", out)
    assert proc.returncode == 3 and m, out[-2000:]
    return {"seconds": took, "exit_code": proc.returncode}


def save_load(tmp: Path, repeats: int) -> dict:
    from switchall.config import load_run_config
    from switchall.pretrain.runtime import LocalRuntime
    from switchall.pretrain.trainer import Trainer

    torch.set_num_threads(1)
    cfg = load_run_config(CONFIG, [*BASE[:2], "train.steps=1", "train.keep_checkpoints=1"])
    run = tmp / "ckpt"
    trainer = Trainer(cfg, run, LocalRuntime(torch.device("cpu")))
    trainer.train_step(next(iter(trainer.loader)))  # so that the optimiser has its state
    saves, loads = [], []
    for i in range(repeats):
        # A new step each time: the trainer does not re-save a step already on disk.
        trainer.step = i + 1
        t = time.perf_counter()
        path = trainer.save()
        saves.append(time.perf_counter() - t)
        t = time.perf_counter()
        trainer._resume()
        loads.append(time.perf_counter() - t)
        assert trainer.step == i + 1, (trainer.step, i + 1)
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    params = sum(p.numel() for p in trainer.model.parameters())
    trainer.close()
    return {
        "params": params,
        "bytes": size,
        "save_s": statistics.median(saves),
        "load_s": statistics.median(loads),
    }


INJECT = """
import os, sys, time
from switchall.pretrain.trainer import Trainer
step, rank, how, stamp = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
original = Trainer.train_step
def train_step(self, batch):
    if self.runtime.rank == rank and self.step + 1 == step:
        open(stamp, "w").write(repr(time.time()))
        if how == "kill":
            os.kill(os.getpid(), 9)
        raise RuntimeError("injected failure")
    return original(self, batch)
Trainer.train_step = train_step
from switchall.cli import run
sys.argv = ["switchall", *sys.argv[5:]]
run()
"""


def failure_bound(tmp: Path, how: str, i: int) -> dict:
    from switchall.launch.local import torchrun_command

    run, stamp, script = tmp / f"{how}{i}", tmp / f"{how}{i}.stamp", tmp / "inject.py"
    script.write_text(INJECT)
    args = [str(script), "10", "1", how, str(stamp), "pretrain", CONFIG, *BASE]
    cmd = torchrun_command(2, [*args, "--run-dir", str(run)])
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    proc.wait(timeout=900)
    ended = time.time()
    assert proc.returncode != 0
    return {"seconds": ended - float(stamp.read_text()), "exit_code": proc.returncode}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-distributed", action="store_true")
    args = ap.parse_args()
    if not (DATA / "manifest.json").is_file():
        subprocess.run(
            [sys.executable, "-m", "switchall", "prepare", "--out", str(DATA), "--no-progress"],
            cwd=REPO,
            env=env(),
            check=True,
        )
    machine = platform.processor() or platform.machine()
    print(f"# {machine}, {os.cpu_count()} CPUs, python {platform.python_version()}, ", end="")
    print(f"torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        ck = save_load(tmp, 5)
        print(
            f"checkpoint of the demo SwitchAll ({ck['params'] / 1e6:.2f}M parameters, with "
            f"AdamW state): {ck['bytes'] / 2**20:.1f} MiB, save {ck['save_s']:.3f} s, "
            f"load {ck['load_s']:.3f} s"
        )
        sig = [signal_to_exit(tmp, i)["seconds"] for i in range(args.repeats)]
        print(f"SIGUSR1 -> exit (checkpoint written, exit 3): median {_summary(sig)}")
        if not args.skip_distributed:
            for how in ("raise", "kill"):
                b = [failure_bound(tmp, how, i)["seconds"] for i in range(args.repeats)]
                print(f"rank 1 {how}s in a step, 2-rank torchrun -> it exits: {_summary(b)}")


def _summary(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} s (runs: {', '.join(f'{x:.2f}' for x in xs)})"


if __name__ == "__main__":
    main()
