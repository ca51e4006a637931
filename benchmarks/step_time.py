"""Whole training step of SwitchAll / SwitchHead against the parameter-matched dense model.

    python benchmarks/step_time.py                          # the demo models, 2 threads, fp32
    python benchmarks/step_time.py --pair c4_47m            # the 47M C4 configs (batch 2)
    python benchmarks/step_time.py --pair demo --profile    # where the time of a step goes

Every model is a real `Trainer` (forward, cross-entropy, backward, clipping, AdamW: exactly
`Trainer.train_step`) on the same prepared dataset (default `data/stdlib`, which `make demo`
prepares; prepared here when missing). The models' steps are interleaved in one process
(A, B, C, A, B, C, ...), so a load change on a shared machine hits every model alike; the
report gives each model's median step time and the median over rounds of the paired ratio
(model / dense of the same round), which cancels slow drifts in load best.

Targets (issue 12): SwitchAll's and SwitchHead's step at most 0.75x the dense model's, at the
demo size and at 47M, on CPU, fp32, 2 threads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAIRS = {  # name -> (dense config, routed configs...)
    "demo": (
        "configs/demo_transformer.yaml",
        "configs/demo_switchall.yaml",
        "configs/demo_switchhead.yaml",
    ),
    "c4_47m": (
        "configs/paper/c4_transformer_47m.yaml",
        "configs/paper/c4_switchall_47m.yaml",
        "configs/paper/c4_switchhead_47m.yaml",
    ),
    "wt103_47m": (
        "configs/paper/wt103_transformer_47m.yaml",
        "configs/paper/wt103_switchall_47m.yaml",
        "configs/paper/wt103_switchhead_47m.yaml",
    ),
}
DEFAULT_BATCH = {"demo": None, "c4_47m": 2, "wt103_47m": 2}  # None: the config's own


def ensure_data(path: Path) -> Path:
    if not (path / "manifest.json").is_file():
        cmd = [sys.executable, "-m", "switchall", "prepare", "--out", str(path), "--no-progress"]
        subprocess.run(cmd, check=True, cwd=REPO)
    return path


def build_trainers(configs, data: Path, batch: int | None, extra: list[str], work: Path):
    import torch

    from switchall.config import load_run_config
    from switchall.pretrain.runtime import LocalRuntime
    from switchall.pretrain.trainer import Trainer

    overrides = [f"data.path={data}", "logging.wandb=disabled", "train.steps=100000", *extra]
    if batch:
        overrides.append(f"train.batch_size={batch}")
    trainers = {}
    for config in configs:
        cfg = load_run_config(REPO / config, overrides)
        name = Path(config).stem
        trainers[name] = Trainer(cfg, work / name, LocalRuntime(torch.device("cpu")))
    return trainers


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def interleaved(
    trainers: dict, warmup: int, steps: int, clock: str = "wall"
) -> dict[str, list[float]]:
    """Per model, the times of its steps, taken in rounds of one step of every model.

    clock "cpu" is the process's CPU time: with one thread it leaves out the time other
    processes hold the core (a loaded shared machine); with more it counts every thread's
    time, spin-waits included, so the wall clock speaks for a quiet machine."""
    now = CLOCKS[clock]
    batches = {name: iter(tr.loader) for name, tr in trainers.items()}
    times: dict[str, list[float]] = {name: [] for name in trainers}
    for step in range(warmup + steps):
        for name, tr in trainers.items():
            batch = next(batches[name])
            start = now()
            tr.train_step(batch)
            tr.step += 1
            if step >= warmup:
                times[name].append(now() - start)
    return times


def profile(trainers: dict, steps: int, rows: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for name, tr in trainers.items():
        batches = iter(tr.loader)
        for _ in range(2):
            tr.train_step(next(batches))
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                tr.train_step(next(batches))
        print(f"\n## {name}: {steps} steps")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pair", choices=list(PAIRS), default="demo")
    p.add_argument("--data", default=str(REPO / "data/stdlib"))
    p.add_argument("--batch-size", type=int, help="global batch (default: config; 47M: 2)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clock", choices=list(CLOCKS), default="wall")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table instead")
    p.add_argument("--json", help="also write the raw step times here")
    p.add_argument(
        "overrides", nargs="*", help="overrides for every model, e.g. train.compile=true"
    )
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    data = ensure_data(Path(args.data))
    batch = args.batch_size or DEFAULT_BATCH[args.pair]
    configs = PAIRS[args.pair]
    with tempfile.TemporaryDirectory() as work:
        trainers = build_trainers(configs, data, batch, args.overrides, Path(work))
        if args.profile:
            profile(trainers, steps=3, rows=30)
            return
        times = interleaved(trainers, args.warmup, args.steps, args.clock)
    dense = Path(configs[0]).stem
    tokens = {n: tr.cfg.train.batch_size * tr.cfg.model.seq_len for n, tr in trainers.items()}
    print(
        f"# {args.pair}: CPU, {torch.get_num_threads()} threads, {args.clock} clock, fp32, "
        f"torch {torch.__version__}, "
        f"median of {args.steps} interleaved steps after {args.warmup} warm-up "
        f"({' '.join(args.overrides) or 'no overrides'})"
    )
    print(
        "| model | params | tokens/step | step time (s) | vs dense (medians) | vs dense (paired) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, tr in trainers.items():
        params = sum(q.numel() for q in tr.model.parameters())
        med = statistics.median(times[name])
        paired = statistics.median(a / b for a, b in zip(times[name], times[dense], strict=True))
        ratio = med / statistics.median(times[dense])
        print(
            f"| {name} | {params / 1e6:.2f}M | {tokens[name]:,} | {med:.4f} | {ratio:.2f} | "
            f"{paired:.2f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(times, indent=1))


if __name__ == "__main__":
    main()
