"""Benchmark CVMM (expert matmuls) per call form against a dense-matmul ceiling.

    python benchmarks/cvmm.py                               # CUDA: 262M shapes, 16k/64k, bf16
    python benchmarks/cvmm.py --set demo 47m --tokens 1024  # CPU: demo and 47M shapes, fp32

Problem sets (spec §1.5, §4), each call form as the models call it: V (x [T, d], ids
[T, heads, k]: each head's gated sum, the grouped form), O (x [T, heads, d_head]: one gated sum
over all heads' slots), σ-MoE W1 (per-slot rows, the plain form), the same with gates (the
gated-sum form, x [T, d], ids [T, k]), and W2 (x [T, k, G], ids [T, k, 1]):
- `262m`: SwitchHead 262M (d_model 1024; 4 heads x 4 experts k 2, d_head 112; 2 x 8, k 4,
  d_head 132) and SwitchAll 259M's σ-MoE (32 experts of 128, k 4);
- `47m`: C4 47M (d_model 412; 2 heads x 5 experts, k 3, d_head 76; σ-MoE 16 x 128, k 4);
- `demo`: configs/demo_switchall.yaml (d_model 128; 2 heads x 4, k 2, d_head 28; σ-MoE
  16 x 32, k 4).
In the models V sees the keys' rows, which include the XL memory (2T rows for one chunk).

Useful FLOPs are 2 * assignments * d_in * d_out forward and twice that backward. "dense"
multiplies [assignments, d_in] by one [d_in, d_out] matrix: the same FLOPs with no routing,
the ceiling. Implementations: CUDA `cvmm_triton` (+ `_det`, deterministic=True), CPU
`cvmm_torch` (the torch backend as `cvmm` runs it), `grouped_mm` (`F.grouped_mm` with the
gather and scatter around it, autograd), `loop_autograd` (the torch backend's forward with its
per-expert loop, differentiated by autograd) and on CPU the candidates of `cvmm_candidates.py`.
On CPU the implementations of one problem are timed in interleaved rounds (median), so a load
change on a shared machine hits all of them alike.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from switchall.kernels import cvmm, cvmm_prepare, cvmm_torch
from switchall.kernels.cvmm_torch import grouped_mm_supported


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
    # (gated "token" problems keep ids [T, G, k]: each head's gated sum, as SwitchHead's V;
    # with one group, ids [T, k] and one gated sum per row: the plain gated form)
    gated: bool

    @property
    def num_experts(self) -> int:
        return self.groups * self.experts_per_group

    def assignments(self, tokens: int) -> int:
        return tokens * self.groups * self.k


SETS = {
    "262m": [
        Problem("switchhead_v_h4e4k2", 4, 4, 2, 1024, 112, "token", gated=True),
        Problem("switchhead_o_h4e4k2", 4, 4, 2, 112, 1024, "group", gated=True),
        Problem("switchhead_v_h2e8k4", 2, 8, 4, 1024, 132, "token", gated=True),
        Problem("switchhead_o_h2e8k4", 2, 8, 4, 132, 1024, "group", gated=True),
        Problem("sigma_moe_w1_e32k4", 1, 32, 4, 1024, 128, "token", gated=False),
        Problem("gated_sum_e32k4", 1, 32, 4, 1024, 128, "token", gated=True),
        Problem("sigma_moe_w2_e32k4", 1, 32, 4, 128, 1024, "slot", gated=True),
    ],
    "47m": [
        Problem("c4_47m_v_h2e5k3", 2, 5, 3, 412, 76, "token", gated=True),
        Problem("c4_47m_o_h2e5k3", 2, 5, 3, 76, 412, "group", gated=True),
        Problem("c4_47m_w1_e16k4", 1, 16, 4, 412, 128, "token", gated=False),
        Problem("c4_47m_gated_e16k4", 1, 16, 4, 412, 128, "token", gated=True),
        Problem("c4_47m_w2_e16k4", 1, 16, 4, 128, 412, "slot", gated=True),
    ],
    "demo": [
        Problem("demo_v_h2e4k2", 2, 4, 2, 128, 28, "token", gated=True),
        Problem("demo_o_h2e4k2", 2, 4, 2, 28, 128, "group", gated=True),
        Problem("demo_w1_e16k4", 1, 16, 4, 128, 32, "token", gated=False),
        Problem("demo_gated_e16k4", 1, 16, 4, 128, 32, "token", gated=True),
        Problem("demo_w2_e16k4", 1, 16, 4, 32, 128, "slot", gated=True),
    ],
}
PROBLEMS = SETS["262m"]


def make_inputs(p: Problem, tokens: int, dtype: torch.dtype, device: str):
    """x, expert ids, expert bank and gates, with balanced random routing."""
    gen = torch.Generator(device=device).manual_seed(0)
    scores = torch.rand(tokens, p.groups, p.experts_per_group, generator=gen, device=device)
    first_expert = torch.arange(p.groups, device=device)[:, None] * p.experts_per_group
    idx = scores.topk(p.k, dim=-1).indices + first_expert  # [T, G, k]
    if p.input_rows == "token":
        lead = (tokens,)
        if not p.gated or p.groups == 1:
            idx = idx.view(tokens, -1)
    elif p.input_rows == "group":
        lead = (tokens, p.groups)
    else:
        lead, idx = (tokens, p.groups * p.k), idx.view(tokens, -1, 1)
    x = torch.randn(*lead, p.d_in, generator=gen, device=device).to(dtype)
    w = torch.randn(p.num_experts, p.d_in, p.d_out, generator=gen, device=device) / p.d_in**0.5
    gates = torch.rand(idx.shape, generator=gen, device=device) if p.gated else None
    return x, idx, w.to(dtype), gates


def grouped_mm_cvmm(x, sel, w, gates):
    from cvmm_candidates import grouped_mm_autograd

    return grouped_mm_autograd(x, sel, w, gates)


def implementations(device: str) -> dict[str, Callable]:
    impls = {}
    if device == "cuda":
        impls["cvmm_triton"] = lambda x, sel, w, g: cvmm(x, sel, w, g, backend="triton")
        impls["cvmm_triton_det"] = lambda x, sel, w, g: cvmm(
            x, sel, w, g, backend="triton", deterministic=True
        )
    else:
        from cvmm_candidates import CPU_CANDIDATES

        impls["cvmm_torch"] = lambda x, sel, w, g: cvmm(x, sel, w, g, backend="torch")
        impls.update(CPU_CANDIDATES)
    impls["loop_autograd"] = lambda x, sel, w, g: cvmm_torch(x, sel, w, g, gemm="loop")
    impls["grouped_mm"] = grouped_mm_cvmm
    return impls


def cuda_time(fn: Callable) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def cpu_times(fns: dict[str, Callable], repeats: int, clock: str = "wall") -> dict[str, float]:
    """Median milliseconds of each fn, timed in `repeats` interleaved rounds after a warm-up.

    clock "cpu" is the process's CPU time: with one thread it leaves out the time other
    processes hold the core (a loaded shared machine); with more it counts every thread's
    time, spin-waits included, so it is the wall clock that speaks for a quiet machine."""
    now = CLOCKS[clock]
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = now()
            fn()
            times[name].append((now() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


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


def _runnable(name: str, fwd: Callable, fwd_bwd: Callable, problem: str) -> bool:
    try:  # e.g. grouped_mm's alignment rules on this shape
        fwd()
        fwd_bwd()
        return True
    except (RuntimeError, ValueError) as e:
        print(f"  {problem} {name}: skipped ({str(e).splitlines()[0][:80]})")
        return False


def bench_problem(
    p: Problem, tokens: int, dtype, device: str, repeats: int, impls, clock: str = "wall"
) -> list[dict]:
    x, idx, w, gates = make_inputs(p, tokens, dtype, device)
    leaves = [x.requires_grad_(), w.requires_grad_()]
    if gates is not None:
        leaves.append(gates.requires_grad_())
    sel = cvmm_prepare(idx, w.shape[0])
    m = p.assignments(tokens)
    flops = 2.0 * m * p.d_in * p.d_out
    a = torch.randn(m, p.d_in, device=device, dtype=dtype, requires_grad=True)
    b = torch.randn(p.d_in, p.d_out, device=device, dtype=dtype, requires_grad=True)
    candidates = {"dense": fwd_and_fwd_bwd(lambda: a @ b, [a, b])}
    for name, impl in impls.items():
        pair = fwd_and_fwd_bwd(lambda impl=impl: impl(x, sel, w, gates), leaves)
        if _runnable(name, *pair, p.name):
            candidates[name] = pair
    if device == "cuda":
        t_fwd = {n: cuda_time(f) for n, (f, _) in candidates.items()}
        t_all = {n: cuda_time(fb) for n, (_, fb) in candidates.items()}
    else:
        t_fwd = cpu_times({n: f for n, (f, _) in candidates.items()}, repeats, clock)
        t_all = cpu_times({n: fb for n, (_, fb) in candidates.items()}, repeats, clock)
    rows = [
        dict(problem=p.name, tokens=tokens, impl=name, fwd_ms=t_fwd[name], all_ms=t_all[name],
             fwd_tflops=flops / t_fwd[name] / 1e9, all_tflops=3 * flops / t_all[name] / 1e9)
        for name in candidates
    ]  # fmt: skip
    for r in rows:
        r["ratio"] = t_all["dense"] / r["all_ms"]
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--set", nargs="+", choices=list(SETS), help="default 262m (cpu: demo 47m)")
    parser.add_argument("--tokens", type=int, nargs="+", help="default 16384 65536 (cpu: 1024)")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="bf16 (cpu: fp32)")
    parser.add_argument("--problems", nargs="+", help="only these problem names")
    parser.add_argument("--impls", nargs="+", help="only these implementations (and dense)")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds on CPU (median)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall", help="CPU timer")
    args = parser.parse_args(argv)
    cpu = args.device == "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    tokens = args.tokens or ([1024] if cpu else [16384, 65536])
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("fp32" if cpu else "bf16")
    ]
    sets = args.set or (["demo", "47m"] if cpu else ["262m"])
    problems = [p for s in sets for p in SETS[s] if not args.problems or p.name in args.problems]
    impls = implementations(args.device)
    if args.impls:
        impls = {n: f for n, f in impls.items() if n in args.impls}
    name = torch.cuda.get_device_name() if not cpu else f"CPU ({torch.get_num_threads()} threads)"
    clock = f", {args.clock} clock" if cpu else ""
    print(f"# {name}, torch {torch.__version__}, {dtype}, tokens {tokens}{clock}")
    probe = torch.empty(8, 128, dtype=dtype)
    print(f"# grouped_mm takes {dtype} on CPU: {grouped_mm_supported(probe, probe)}")
    rows = []
    for t in tokens:
        for p in problems:
            rows += bench_problem(p, t, dtype, args.device, args.repeats, impls, args.clock)
    print_table(rows)


if __name__ == "__main__":
    main()
