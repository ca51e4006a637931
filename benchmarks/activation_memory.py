"""Memory that `train.activation_checkpointing` saves: peak of one forward + backward.

    python benchmarks/activation_memory.py                   # 262M C4 configs, CPU, fp32
    python benchmarks/activation_memory.py --batch 2 --configs configs/paper/c4_switchall_259m.yaml

Each (config, checkpointing) case runs in a fresh process: the model is built, every gradient
allocated (zeros), then one forward + backward of `--batch` sequences of the config's T with
a full XL memory (as in training after the first step). On CPU the figure is the growth of the
process's peak resident memory (VmHWM, reset just before the step) over the resident memory
before the step, i.e.
activations, the recomputation's working set and autograd temporaries; on CUDA the peak of
`torch.cuda.max_memory_allocated` over the allocation before the step.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = [
    "configs/paper/c4_transformer_262m.yaml",
    "configs/paper/c4_switchhead_262m.yaml",
    "configs/paper/c4_switchall_259m.yaml",
]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _reset_peak_rss() -> None:
    """Linux: restart the high-water mark (VmHWM) from the current resident set."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure(config: str, checkpointing: bool, batch: int, threads: int) -> dict:
    import torch

    from switchall.config import load_run_config
    from switchall.models import NoiseContext, build_model

    torch.set_num_threads(threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    cfg = load_run_config(REPO / config).model
    torch.manual_seed(0)
    model = build_model(cfg).to(device).train()
    model.activation_checkpointing = checkpointing
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len + 1), device=device)
    memory = None
    if cfg.mem_len:
        memory = [torch.randn(batch, cfg.mem_len, cfg.d_model, device=device)] * cfg.n_layers
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _reset_peak_rss()
        base = _rss_bytes()
    start = time.perf_counter()
    out = model(tokens[:, :-1], memory, noise=NoiseContext(seed=1))
    loss = torch.nn.functional.cross_entropy(
        out.logits_BTV.flatten(0, 1).float(), tokens[:, 1:].flatten()
    )
    (loss + out.aux_loss).backward()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _peak_rss_bytes() - base
    return {
        "config": Path(config).stem,
        "checkpointing": checkpointing,
        "peak_bytes": peak,
        "seconds": time.perf_counter() - start,
        "device": str(device),
        "tokens": batch * cfg.seq_len,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=CONFIGS)
    p.add_argument("--batch", type=int, default=1, help="sequences (of the config's T)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        config, ckpt = json.loads(args.case)
        print(json.dumps(measure(config, ckpt, args.batch, args.threads)))
        return
    results = []
    for config in args.configs:
        for ckpt in (False, True):
            cmd = [sys.executable, __file__, "--case", json.dumps([config, ckpt]),
                   "--batch", str(args.batch), "--threads", str(args.threads)]  # fmt: skip
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO)
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("| config | tokens | plain peak (MiB) | checkpointed peak (MiB) | saved | fwd+bwd s |")
    print("|---|---:|---:|---:|---:|---|")
    for plain, ckpt in zip(results[::2], results[1::2], strict=True):
        a, b = plain["peak_bytes"] / 2**20, ckpt["peak_bytes"] / 2**20
        print(
            f"| {plain['config']} | {plain['tokens']} | {a:,.0f} | {b:,.0f} | {1 - b / a:.0%} | "
            f"{plain['seconds']:.1f} plain, {ckpt['seconds']:.1f} checkpointed |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
