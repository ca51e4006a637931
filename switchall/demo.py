"""`make demo`: prepare the embedded corpus, pretrain a small SwitchAll and its parameter-matched
dense Transformer-XL, and print them side by side.

Runs on the GPU when there is one, else on the CPU (a few minutes on 2 cores). Each demo run
goes into a fresh directory under runs/, so earlier demo runs are never overwritten.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from switchall.cli import main as cli_main
from switchall.config import load_run_config

MODELS = {
    "SwitchAll": "configs/demo_switchall.yaml",
    "Transformer-XL": "configs/demo_transformer.yaml",
}


def _si(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def steady_state(history: list[dict], tokens_per_step: int) -> tuple[float, float]:
    """(seconds per step, tokens per second) over the steady-state logging windows.

    Each logged step record closes a window and carries its mean `step_time`; the window's
    length is the step count since the previous record. The first window (warm-up) is left
    out when there is another. Both figures are totals over the same windows, total time /
    total steps and total tokens / total time, so tokens/s = tokens per step / step time.
    """
    windows, last = [], 0
    for r in history:
        if "step_time" in r:
            windows.append((r["step"] - last, r["step_time"]))
            last = r["step"]
    steady = windows[1:] or windows
    if not steady:
        raise ValueError("no logged training steps to time")
    steps = sum(n for n, _ in steady)
    seconds = sum(n * t for n, t in steady)
    return seconds / steps, tokens_per_step * steps / seconds


def train_one(config: str, run_dir: Path, overrides: list[str]) -> dict:
    from switchall.analysis.accounting import account
    from switchall.models import build_model
    from switchall.pretrain.runtime import LocalRuntime, resolve_device
    from switchall.pretrain.trainer import Trainer

    cfg = load_run_config(config, overrides)
    runtime = LocalRuntime(resolve_device(cfg.train.device))
    result = Trainer(cfg, run_dir, runtime).run()
    params = sum(p.numel() for p in build_model(cfg.model).parameters())
    counts = account(cfg.model, params)
    step_time, tokens_per_s = steady_state(
        result["history"], cfg.train.batch_size * cfg.model.seq_len
    )
    vals = [r for r in result["history"] if "val_ppl" in r]
    return {
        "params": params,
        "attn_macs": counts["attn_macs"],
        "attn_mem": counts["attn_mem"],
        "step_time": step_time,
        "tokens_per_s": tokens_per_s,
        "ppl_start": vals[0]["val_ppl"],
        "ppl_end": vals[-1]["val_ppl"],
        "device": str(runtime.device),
    }


def machine() -> str:
    """One line naming what the figures were measured on, to paste next to the table."""
    import os
    import platform

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU only"
    return (
        f"{device}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, Python {platform.python_version()}"
    )


def print_table(rows: dict[str, dict]) -> None:
    names = list(rows)
    lines = [
        ("parameters", lambda r: _si(r["params"])),
        ("attention MACs / layer / seq", lambda r: _si(r["attn_macs"])),
        ("attention memory / layer / seq (floats)", lambda r: _si(r["attn_mem"])),
        ("step time (s)", lambda r: f"{r['step_time']:.3f}"),
        ("tokens / s", lambda r: f"{r['tokens_per_s']:,.0f}"),
        ("validation perplexity at start", lambda r: f"{r['ppl_start']:,.1f}"),
        ("validation perplexity at end", lambda r: f"{r['ppl_end']:,.2f}"),
    ]
    width = max(len(label) for label, _ in lines)
    col = max(14, *(len(n) for n in names))
    print()
    print(f"{'':<{width}}  " + "  ".join(f"{n:>{col}}" for n in names))
    for label, fmt in lines:
        print(f"{label:<{width}}  " + "  ".join(f"{fmt(rows[n]):>{col}}" for n in names))
    print(
        f"\n(step time and tokens/s: totals over the logging windows after the first; {machine()})"
    )
    print()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default="data/stdlib", help="prepared dataset directory")
    p.add_argument("--runs", default="runs", help="parent of the demo's run directory")
    p.add_argument(
        "--prepare-args",
        default="",
        help="inputs and options for `switchall prepare` (default: the embedded corpus), "
        'e.g. "corpus/ --val valid.txt --vocab-size 400"',
    )
    p.add_argument("--steps", type=int, help="train.steps of both runs")
    p.add_argument("overrides", nargs="*", help="overrides for both runs, e.g. train.steps=50")
    args = p.parse_args(argv)

    prepare_args = shlex.split(args.prepare_args)
    what = " ".join(prepare_args) if prepare_args else "the embedded corpus"
    print(f"== preparing {what} into {args.data}", flush=True)
    if cli_main(["prepare", *prepare_args, "--out", args.data]) != 0:
        return 1
    root = Path(args.runs) / time.strftime("demo-%Y%m%d-%H%M%S")
    steps = [] if args.steps is None else [f"train.steps={args.steps}"]
    overrides = [f"data.path={args.data}", *steps, *args.overrides]
    rows = {}
    for name, config in MODELS.items():
        print(f"\n== pretraining {name} ({config}) into {root / Path(config).stem}", flush=True)
        rows[name] = train_one(config, root / Path(config).stem, overrides)
    print_table(rows)
    print(f"runs, metrics.jsonl and checkpoints: {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
