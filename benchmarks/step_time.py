"""Whole training step of SwitchAll / SwitchHead against the parameter-matched dense model.

    python benchmarks/step_time.py                          # the demo models, 2 threads, fp32
    python benchmarks/step_time.py --pair c4_47m            # the 47M C4 configs (batch 2)
    python benchmarks/step_time.py --pair demo --profile    # torch.profiler table of a step
    python benchmarks/step_time.py --breakdown --threads 1 --clock cpu   # per phase and module

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


def build_trainers(
    configs, data: Path, batch: int | None, extra: list[str], work: Path, compiled: bool = False
):
    import torch

    from switchall.config import load_run_config
    from switchall.pretrain.runtime import LocalRuntime
    from switchall.pretrain.trainer import Trainer

    # fp32: the benchmark's premise (the paper configs say fp16, which needs CUDA).
    overrides = [
        f"data.path={data}",
        "logging.wandb=disabled",
        "train.steps=100000",
        "train.precision=fp32",
        *extra,
    ]
    if batch:
        overrides.append(f"train.batch_size={batch}")
    trainers = {}
    for config in configs:
        for suffix, more in [("", [])] + (
            [("+compile", ["train.compile=true"])] if compiled else []
        ):
            cfg = load_run_config(REPO / config, [*overrides, *more])
            name = Path(config).stem + suffix
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


PHASES = ("forward", "loss", "backward", "optimizer", "step")


def breakdown(trainers: dict, steps: int, clock: str) -> None:
    """Where a step's time goes: forward (by module), loss, backward, optimiser; interleaved.

    Forward times per module come from forward pre/post hooks (a module's time includes its
    children's); backward and optimiser are not split further."""
    import collections

    import torch.nn.functional as F

    now = CLOCKS[clock]
    spans: dict[str, collections.defaultdict] = {}
    for name, tr in trainers.items():
        acc = spans[name] = collections.defaultdict(list)
        for mname, m in tr.model.named_modules():
            parts = mname.split(".")
            if not mname or len(parts) > 4 or "drop" in parts[-1]:
                continue
            key = ".".join(p for p in parts if not p.isdigit() and p != "blocks") or "blocks"
            start = {}
            m.register_forward_pre_hook(lambda *_, s=start: s.__setitem__("t", now()))
            m.register_forward_hook(lambda *_, s=start, k=key, a=acc: a[k].append(now() - s["t"]))
    batches = {name: iter(tr.loader) for name, tr in trainers.items()}
    phases = {name: collections.defaultdict(list) for name in trainers}
    for step in range(steps + 2):
        for name, tr in trainers.items():
            if step == 2:
                spans[name].clear()
            batch = next(batches[name])
            t0 = now()
            out = tr.model(batch[:, :-1], tr.memory[0])
            t1 = now()
            lm = F.cross_entropy(out.logits_BTV.float().flatten(0, 1), batch[:, 1:].flatten())
            t2 = now()
            tr.engine.backward(lm + out.aux_loss)
            t3 = now()
            tr.engine.step(tr.step)
            t4 = now()
            tr.memory[0], tr.step = out.memory, tr.step + 1
            if step >= 2:
                times = (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)
                for k, v in zip(PHASES, times, strict=True):
                    phases[name][k].append(v)
    print(f"# ms per step ({clock} clock, mean of {steps} interleaved steps)")
    for name, tr in trainers.items():
        ph = {k: sum(v) / len(v) * 1e3 for k, v in phases[name].items()}
        mods = {k: sum(v) / steps * 1e3 for k, v in spans[name].items()}
        print(f"\n## {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in ph.items()))
        by_time = sorted(mods.items(), key=lambda kv: -kv[1])
        print("forward by module: " + ", ".join(f"{k} {v:.1f}" for k, v in by_time))
        shared = shared_part(tr, next(batches[name]), steps, now) * 1e3
        print(f"embedding + final norm + output layer + loss, forward+backward: {shared:.1f}")


def shared_part(tr, batch, steps: int, now) -> float:
    """Seconds of the part of a step every variant of one size shares: embedding, final norm,
    output layer and loss, forward and backward, without the blocks (median of `steps`)."""
    import statistics

    import torch.nn.functional as F

    model, times = tr.model, []
    for _ in range(steps + 1):
        start = now()
        logits = model.output(model.ln_f(model.embedding(batch[:, :-1])))
        F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten()).backward()
        times.append(now() - start)
    model.zero_grad(set_to_none=True)
    return statistics.median(times[1:])


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
    p.add_argument("--breakdown", action="store_true", help="time per phase and module instead")
    p.add_argument("--compile-speedup", action="store_true",
                   help="each model also with train.compile=true, interleaved")  # fmt: skip
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
        trainers = build_trainers(
            configs, data, batch, args.overrides, Path(work), args.compile_speedup
        )
        if args.profile:
            profile(trainers, steps=3, rows=30)
            return
        if args.breakdown:
            breakdown(trainers, args.steps, args.clock)
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
    if args.compile_speedup:
        print("\n| model | eager step (s) | compiled step (s) | speed-up |")
        print("|---|---:|---:|---:|")
        for name in (n for n in trainers if not n.endswith("+compile")):
            eager, comp = (statistics.median(times[n]) for n in (name, f"{name}+compile"))
            print(f"| {name} | {eager:.4f} | {comp:.4f} | {eager / comp:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(times, indent=1))


if __name__ == "__main__":
    main()
