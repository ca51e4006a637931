"""SwitchHead attention vs the parameter-matched dense attention of the paper's 262M configs.

Forward + backward time of one attention sub-layer (LayerNorm'd input and XL memory in, output
out) and its memory: bytes of activations saved for backward (device-independent, counted with
`torch.autograd.graph.saved_tensors_hooks`) and, on CUDA, the peak allocated memory.

Targets (issue 3): SwitchHead at most 0.55x the time and 0.35x the memory of the dense layer.

    .venv/bin/python benchmarks/attention_layer.py                 # GPU if present, else CPU
    .venv/bin/python benchmarks/attention_layer.py --batch 2 --seq-len 128   # quick CPU run
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from switchall.config import load_run_config
from switchall.models.attention import DenseAttention
from switchall.models.switchhead import SwitchHeadAttention

PAIRS = {
    "C4 262M": ("configs/paper/c4_transformer_262m.yaml", "configs/paper/c4_switchhead_262m.yaml"),
    "WT103 262M": (
        "configs/paper/wt103_transformer_262m.yaml",
        "configs/paper/wt103_switchhead_262m.yaml",
    ),
}


def saved_bytes(fn) -> int:
    """Bytes of tensors autograd keeps for backward while running `fn` (storages counted once)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def build_layer(cfg_path: str, batch: int, seq_len: int, device, dtype):
    """(step function: one fwd+bwd, fwd function, parameter count) of one attention layer."""
    cfg = load_run_config(cfg_path, [f"model.seq_len={seq_len}"]).model
    cls = SwitchHeadAttention if cfg.uses_switchhead else DenseAttention
    layer = cls(cfg).to(device)
    mem_len = cfg.mem_len
    x = torch.randn(batch, mem_len + seq_len, cfg.d_model, device=device, requires_grad=True)
    amp = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else None

    def fwd():
        with amp or torch.autocast(device.type, enabled=False):
            return layer(x[:, mem_len:], x, mem_len)

    def step():
        fwd().float().square().mean().backward()

    return step, fwd, sum(p.numel() for p in layer.parameters())


def paired_cpu_ms(steps: dict, iters: int, clock) -> dict[str, float]:
    """CPU: median ms of each layer's step, the layers interleaved round by round."""
    for step in steps.values():
        for _ in range(2):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(iters):
        for name, step in steps.items():
            start = clock()
            step()
            times[name].append((clock() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_layer(cfg_path: str, batch: int, seq_len: int, device, dtype, iters: int) -> dict:
    """Saved bytes, and on CUDA the peak allocation and the time (CPU times: `paired_cpu_ms`)."""
    step, fwd, params = build_layer(cfg_path, batch, seq_len, device, dtype)
    for _ in range(2):
        step()
    saved = saved_bytes(fwd)
    peak = ms = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            step()
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / iters
    return {"ms": ms, "saved": saved, "peak": peak, "params": params, "step": step}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=None, help="default: 8 on GPU, 2 on CPU")
    p.add_argument("--seq-len", type=int, default=None, help="default: 512 (paper) on GPU, 128 CPU")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None)
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="CPU timer")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    batch = args.batch or (8 if cuda else 2)
    seq_len = args.seq_len or (512 if cuda else 128)
    iters = args.iters or (20 if cuda else 3)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[
        args.dtype or ("bf16" if cuda else "fp32")
    ]
    torch.manual_seed(0)
    name = torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or 'x86_64'})"
    print(
        f"# {name}, torch {torch.__version__}, {dtype}, batch {batch}, T {seq_len} "
        f"+ one memory chunk, fwd+bwd of one attention sub-layer"
    )
    print(
        "| pair | model | params | ms fwd+bwd | saved for bwd (MiB) | CUDA peak (MiB) "
        "| time ratio | memory ratio |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for pair, (dense_cfg, moe_cfg) in PAIRS.items():
        dense = bench_layer(dense_cfg, batch, seq_len, device, dtype, iters)
        moe = bench_layer(moe_cfg, batch, seq_len, device, dtype, iters)
        if not cuda:  # both layers interleaved, so that load on the machine hits them alike
            clock = time.process_time if args.clock == "cpu" else time.perf_counter
            ms = paired_cpu_ms({"dense": dense["step"], "moe": moe["step"]}, iters, clock)
            dense["ms"], moe["ms"] = ms["dense"], ms["moe"]
        for label, r in (("dense", dense), ("SwitchHead", moe)):
            peak = f"{r['peak'] / 2**20:.1f}" if r["peak"] is not None else "n/a"
            ratio_t = f"{r['ms'] / dense['ms']:.2f}" if r is moe else "1.00"
            mem_key = "peak" if cuda else "saved"
            ratio_m = f"{r[mem_key] / dense[mem_key]:.2f}" if r is moe else "1.00"
            print(
                f"| {pair} | {label} | {r['params'] / 1e6:.2f}M | {r['ms']:.1f} | "
                f"{r['saved'] / 2**20:.1f} | {peak} | {ratio_t} | {ratio_m} |"
            )


if __name__ == "__main__":
    main()
