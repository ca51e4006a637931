"""Benchmark CVMM (expert matmuls) on the paper's shapes against a dense-matmul ceiling.

    python benchmarks/cvmm.py                          # CUDA: 16k and 64k tokens, bf16
    python benchmarks/cvmm.py --tokens 2048            # CPU: torch backend, fp32

Problems (spec §1.5, §4): the V and O projections of SwitchHead 262M (d_model 1024; 4 heads
x 4 experts, k 2, d_head 112; 2 heads x 8 experts, k 4, d_head 132) and both σ-MoE matmuls of
SwitchAll 259M (32 experts of size 128, k 4), called as the models call them: V (x [T, d],
ids [T, heads, k]) returns each head's gated sum, O (summing all heads' slots) and W2
(x [T, k, 128], ids [T, k, 1]) the row's gated sum, W1 per-slot rows.

Useful FLOPs are 2 * assignments * d_in * d_out forward and twice that backward. "dense"
multiplies [assignments, d_in] by one [d_in, d_out] matrix: the same FLOPs with no routing,
the ceiling. Baselines: the loop over experts with autograd (`cvmm_torch`), and
`torch._grouped_mm` with the gather and scatter around it, where this PyTorch build has it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from switchall.kernels import cvmm, cvmm_prepare, cvmm_torch
from switchall.kernels.selection import row_layout


@dataclass(frozen=True)
class Problem:
    """Routing: top-k per group (a head, or the single σ-MoE group) over its own experts."""

    name: str
    groups: int
    experts_per_group: int
    k: int
    d_in: int
    d_out: int
    input_rows: str  # "token": x [T, d]; "group": x [T, G, d]; "slot": x [T, G*k, d]
    # (gated "token" problems keep ids [T, G, k]: each head's gated sum, as SwitchHead's V)
    gated: bool

    @property
    def num_experts(self) -> int:
        return self.groups * self.experts_per_group

    def assignments(self, tokens: int) -> int:
        return tokens * self.groups * self.k


PROBLEMS = [
    Problem("switchhead_v_h4e4k2", 4, 4, 2, 1024, 112, "token", gated=True),
    Problem("switchhead_o_h4e4k2", 4, 4, 2, 112, 1024, "group", gated=True),
    Problem("switchhead_v_h2e8k4", 2, 8, 4, 1024, 132, "token", gated=True),
    Problem("switchhead_o_h2e8k4", 2, 8, 4, 132, 1024, "group", gated=True),
    Problem("sigma_moe_w1_e32k4", 1, 32, 4, 1024, 128, "token", gated=False),
    Problem("sigma_moe_w2_e32k4", 1, 32, 4, 128, 1024, "slot", gated=True),
]


def make_inputs(p: Problem, tokens: int, dtype: torch.dtype, device: str):
    """x, expert ids, expert bank and gates, with balanced random routing."""
    gen = torch.Generator(device=device).manual_seed(0)
    scores = torch.rand(tokens, p.groups, p.experts_per_group, generator=gen, device=device)
    first_expert = torch.arange(p.groups, device=device)[:, None] * p.experts_per_group
    idx = scores.topk(p.k, dim=-1).indices + first_expert  # [T, G, k]
    if p.input_rows == "token":
        lead, idx = (tokens,), (idx if p.gated else idx.view(tokens, -1))
    elif p.input_rows == "group":
        lead = (tokens, p.groups)
    else:
        lead, idx = (tokens, p.groups * p.k), idx.view(tokens, -1, 1)
    x = torch.randn(*lead, p.d_in, generator=gen, device=device).to(dtype)
    w = torch.randn(p.num_experts, p.d_in, p.d_out, generator=gen, device=device) / p.d_in**0.5
    gates = torch.rand(idx.shape, generator=gen, device=device) if p.gated else None
    return x, idx, w.to(dtype), gates


def grouped_mm_cvmm(x, sel, w, gates):
    """Gather rows in expert order, torch._grouped_mm, scatter back (gated sum with index_add)."""
    k, out_rows, out_lead = row_layout(tuple(x.shape), sel.shape)
    x_MI = x.reshape(-1, x.shape[-1]).index_select(0, sel.order_M // k)
    y_MO = torch._grouped_mm(x_MI, w, offs=sel.offsets_E1[1:].to(torch.int32))
    if gates is None:
        out = y_MO.new_zeros(y_MO.shape).index_copy(0, sel.order_M, y_MO)
        return out.view(*sel.shape, -1)
    g_M = gates.reshape(-1).index_select(0, sel.order_M).to(y_MO.dtype)
    rows = sel.order_M // (sel.num_assignments // out_rows)
    out = y_MO.new_zeros(out_rows, w.shape[2]).index_add(0, rows, y_MO * g_M[:, None])
    return out.view(*out_lead, -1)


def implementations(device: str) -> dict[str, Callable]:
    impls = {"loop_autograd": lambda x, sel, w, g: cvmm_torch(x, sel, w, g)}
    if device == "cuda":
        impls["cvmm_triton"] = lambda x, sel, w, g: cvmm(x, sel, w, g, backend="triton")
        impls["cvmm_triton_det"] = lambda x, sel, w, g: cvmm(
            x, sel, w, g, backend="triton", deterministic=True
        )
    else:
        impls["cvmm_torch"] = lambda x, sel, w, g: cvmm(x, sel, w, g, backend="torch")
    if hasattr(torch, "_grouped_mm"):
        impls["grouped_mm"] = grouped_mm_cvmm
    return impls


def timer(device: str, repeats: int) -> Callable[[Callable], float]:
    """Median milliseconds of fn(): triton's do_bench on CUDA, wall clock on CPU."""
    if device == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100)

    def cpu_time(fn):
        fn()  # warm-up (first-call allocations)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    return cpu_time


def fwd_and_fwd_bwd(fn: Callable, leaves: list[torch.Tensor]) -> tuple[Callable, Callable]:
    def fwd():
        with torch.no_grad():
            fn()

    cotangent = {}

    def fwd_bwd():
        out = fn()
        if "c" not in cotangent:
            cotangent["c"] = torch.randn_like(out)
        torch.autograd.grad(out, leaves, cotangent["c"])

    return fwd, fwd_bwd


def bench_problem(p: Problem, tokens: int, dtype, device: str, measure, impls) -> list[dict]:
    x, idx, w, gates = make_inputs(p, tokens, dtype, device)
    leaves = [x.requires_grad_(), w.requires_grad_()]
    if gates is not None:
        leaves.append(gates.requires_grad_())
    sel = cvmm_prepare(idx, w.shape[0])
    m = p.assignments(tokens)
    flops = 2.0 * m * p.d_in * p.d_out
    a = torch.randn(m, p.d_in, device=device, dtype=dtype, requires_grad=True)
    b = torch.randn(p.d_in, p.d_out, device=device, dtype=dtype, requires_grad=True)
    candidates = {"dense": (lambda: a @ b, [a, b])}
    for name, impl in impls.items():
        candidates[name] = (lambda impl=impl: impl(x, sel, w, gates), leaves)
    rows = []
    for name, (fn, params) in candidates.items():
        fwd, fwd_bwd = fwd_and_fwd_bwd(fn, params)
        try:
            t_fwd, t_all = measure(fwd), measure(fwd_bwd)
        except RuntimeError as e:  # e.g. grouped_mm's alignment rules on this shape
            print(f"  {p.name} {name}: skipped ({str(e).splitlines()[0][:80]})")
            continue
        rows.append(
            dict(problem=p.name, tokens=tokens, impl=name, fwd_ms=t_fwd, all_ms=t_all,
                 fwd_tflops=flops / t_fwd / 1e9, all_tflops=3 * flops / t_all / 1e9)
        )  # fmt: skip
    dense = next(r for r in rows if r["impl"] == "dense")
    for r in rows:
        r["ratio"] = dense["all_ms"] / r["all_ms"]
    return rows


def print_table(rows: list[dict]) -> None:
    columns = ["problem", "tokens", "impl", "fwd ms", "fwd TFLOP/s", "fwd+bwd ms",
               "fwd+bwd TFLOP/s", "fwd+bwd vs dense"]  # fmt: skip
    print("| " + " | ".join(columns) + " |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['problem']} | {r['tokens']} | {r['impl']} | {r['fwd_ms']:.3f} | "
            f"{r['fwd_tflops']:.3f} | {r['all_ms']:.3f} | {r['all_tflops']:.3f} | "
            f"{r['ratio']:.0%} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, nargs="+", help="default 16384 65536 (cpu: 2048)")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="bf16 (cpu: fp32)")
    parser.add_argument("--problems", nargs="+", choices=[p.name for p in PROBLEMS])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs on CPU (median)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    args = parser.parse_args()
    cpu = args.device == "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    tokens = args.tokens or ([2048] if cpu else [16384, 65536])
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("fp32" if cpu else "bf16")
    ]
    problems = [p for p in PROBLEMS if not args.problems or p.name in args.problems]
    measure, impls = timer(args.device, args.repeats), implementations(args.device)
    name = torch.cuda.get_device_name() if not cpu else f"CPU ({torch.get_num_threads()} threads)"
    print(f"# {name}, torch {torch.__version__}, {dtype}, tokens {tokens}")
    rows = []
    for t in tokens:
        for p in problems:
            rows += bench_problem(p, t, dtype, args.device, measure, impls)
    print_table(rows)


if __name__ == "__main__":
    main()
