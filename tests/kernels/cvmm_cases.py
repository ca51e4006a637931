"""Shared CVMM test cases: awkward routings and a float64 einsum oracle for every gradient."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from switchall.kernels import cvmm_reference

# Tolerances, as max |got - want| / max(1, max |want|) per tensor. Reference values are float64
# computed from the same (already rounded) inputs, so only the implementations' own roundings
# count (measured: ~2e-7 fp32, ~5e-4 fp16, ~6e-3 bf16 at these sizes).
# - fp32: products accumulated in fp32 over at most a few hundred terms (K < 100 per slot,
#   <= ~300 rows per expert in dW): ~sqrt(300) * 2^-24 ~ 1e-6 typically, 2e-5 in the worst
#   case; 1e-5 catches any real indexing or scaling bug (those are O(1)).
# - fp16 (unit roundoff u = 2^-11 ~ 4.9e-4): results are rounded once, twice on the torch
#   path (matmul output, then the fp32 slot sum); the gated dW also rounds gate * grad to the
#   input dtype before the matmul, as the tensor cores need. 2e-3 = 4u.
# - bf16 (u = 2^-8 ~ 3.9e-3): the Triton interpreter truncates fp32 -> bf16 instead of
#   rounding to nearest, an error below 2^-7 ~ 7.8e-3 per rounding; 1.6e-2 is twice that
#   (compiled kernels round to nearest, so on GPU it is 4u).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@dataclass(frozen=True)
class Case:
    """x `[N, *rows, I]` with expert ids `[N, *rows, k]` into E experts of `[I, O]`."""

    name: str
    n: int
    rows: tuple[int, ...]  # () for 2-D x, (R,) for the 3-D form
    k: int
    num_experts: int
    d_in: int
    d_out: int
    experts_used: tuple[int, ...] | None = None  # restrict routing (leaves others empty)
    skew: bool = False  # send almost every row to expert 0
    grouped: bool = False  # x `[N, I]` shared by the `rows` groups (SwitchHead's V projection)

    def __str__(self) -> str:
        return self.name


CASES = [
    Case("N1_E1_k1", n=1, rows=(), k=1, num_experts=1, d_in=8, d_out=8),
    Case("N1_k3", n=1, rows=(), k=3, num_experts=4, d_in=19, d_out=5),
    Case("nonmultiple_k2", n=67, rows=(), k=2, num_experts=5, d_in=40, d_out=72),
    Case("k_eq_E", n=90, rows=(), k=4, num_experts=4, d_in=24, d_out=96),
    Case("E1_many_rows", n=200, rows=(), k=1, num_experts=1, d_in=33, d_out=17),
    Case(
        "empty_experts",
        n=90,
        rows=(),
        k=2,
        num_experts=8,
        d_in=36,
        d_out=20,
        experts_used=(1, 5, 6),
    ),  # fmt: skip
    Case("skewed", n=260, rows=(), k=1, num_experts=3, d_in=16, d_out=48, skew=True),
    Case("R_heads_oproj", n=40, rows=(4,), k=2, num_experts=8, d_in=28, d_out=50),
    Case("sigma_moe_w2", n=60, rows=(3,), k=1, num_experts=6, d_in=20, d_out=36),
    Case("G_heads_vproj", n=45, rows=(3,), k=2, num_experts=9, d_in=30, d_out=14, grouped=True),
    Case("M0", n=0, rows=(), k=2, num_experts=3, d_in=12, d_out=10),
]
CASE_BY_NAME = {c.name: c for c in CASES}


def make_inputs(case: Case, dtype: torch.dtype = torch.float32, seed: int = 0):
    """(x, expert_idx, weight, gates) with k distinct experts per input row."""
    gen = torch.Generator().manual_seed(seed)
    lead = (case.n, *case.rows)
    num_in_rows = case.n * (case.rows[0] if case.rows else 1)
    pool = torch.tensor(case.experts_used or range(case.num_experts))
    picks = [pool[torch.randperm(len(pool), generator=gen)[: case.k]] for _ in range(num_in_rows)]
    idx = torch.stack(picks) if picks else torch.zeros(0, case.k, dtype=torch.int64)
    if case.skew:
        idx[: num_in_rows - 3] = 0  # one expert gets many tiles, two get a single row
    x = torch.randn(*(lead[:1] if case.grouped else lead), case.d_in, generator=gen)
    weight = torch.randn(case.num_experts, case.d_in, case.d_out, generator=gen) / case.d_in**0.5
    gates = torch.rand(*lead, case.k, generator=gen) + 0.1
    return x.to(dtype), idx.view(*lead, case.k), weight.to(dtype), gates


def _grads(out: torch.Tensor, params: list[torch.Tensor], cotangent: torch.Tensor):
    """d<out, cotangent>/d params; zeros for params out does not reach (e.g. M = 0)."""
    if not out.requires_grad:
        return [torch.zeros_like(p) for p in params]
    grads = torch.autograd.grad(out, params, cotangent, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


def run_with_grads(fn, x, idx, weight, gates, grad_seed: int = 1):
    """Output and gradients (x, weight, gates) of fn(x, idx, weight, gates), fixed cotangent."""
    params = [x.detach().requires_grad_(), weight.detach().requires_grad_()]
    if gates is not None:
        params.append(gates.detach().requires_grad_())
    out = fn(params[0], idx, params[1], params[2] if gates is not None else None)
    gen = torch.Generator().manual_seed(grad_seed)
    cotangent = torch.randn(out.shape, generator=gen).to(out.dtype)
    return [out.detach(), *_grads(out, params, cotangent)], cotangent


def reference_with_grads(x, idx, weight, gates, cotangent):
    """float64 oracle: the naive einsum from `cvmm_reference`, differentiated by autograd."""
    params = [x.detach().double().requires_grad_(), weight.detach().double().requires_grad_()]
    if gates is not None:
        params.append(gates.detach().double().requires_grad_())
    out = cvmm_reference(params[0], idx, params[1], params[2] if gates is not None else None)
    return [out.detach(), *_grads(out, params, cotangent.double())]


def assert_close_scaled(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    """max |got - want| <= tol * max(1, max |want|), with matching shapes."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if want.numel() == 0:
        return
    err = (got.double() - want.double()).abs().max().item()
    scale = max(1.0, want.double().abs().max().item())
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:.1g} * {scale:.3g}"
