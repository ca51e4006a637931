"""The Triton CVMM kernels (run by the interpreter on CPU) against the PyTorch backend and a
float64 einsum oracle: forward, grad x, grad weight and grad gates, on awkward shapes, dtypes,
both reduction modes, and the σ-MoE reuse of one selection across two matmuls.
"""

from __future__ import annotations

import pytest
import torch

from switchall.kernels import cvmm, cvmm_prepare, cvmm_torch
from tests.kernels.cvmm_cases import (
    CASE_BY_NAME,
    CASES,
    TOLERANCE,
    assert_close_scaled,
    make_inputs,
    reference_with_grads,
    run_with_grads,
)

NAMES = ("out", "grad_x", "grad_weight", "grad_gates")


def _cvmm_fn(backend: str, deterministic: bool):
    return lambda x, idx, w, g: cvmm(x, idx, w, g, backend=backend, deterministic=deterministic)


def _check_against_reference(results, cotangent, x, idx, w, gates, tol, label):
    want = reference_with_grads(x, idx, w, gates, cotangent)
    for name, got, ref in zip(NAMES, results, want, strict=False):
        assert got.dtype == (gates.dtype if name == "grad_gates" else x.dtype), name
        assert_close_scaled(got, ref, tol, f"{label} {name}")


@pytest.mark.parametrize("deterministic", [False, True], ids=["fast", "deterministic"])
@pytest.mark.parametrize("gated", [False, True], ids=["slots", "gated"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_triton_matches_reference_fp32(case, gated, deterministic):
    x, idx, w, gates = make_inputs(case)
    gates = gates if gated else None
    results, cot = run_with_grads(_cvmm_fn("triton", deterministic), x, idx, w, gates)
    _check_against_reference(results, cot, x, idx, w, gates, TOLERANCE[torch.float32], "triton")
    # The CPU backend (hand-written backward) agrees too, as does autograd through cvmm_torch.
    torch_results, _ = run_with_grads(_cvmm_fn("torch", deterministic), x, idx, w, gates)
    autograd_results, _ = run_with_grads(
        lambda x, idx, w, g: cvmm_torch(x, cvmm_prepare(idx, case.num_experts), w, g),
        x, idx, w, gates,
    )  # fmt: skip
    for name, got, want, ag in zip(NAMES, results, torch_results, autograd_results, strict=False):
        assert_close_scaled(got, want, TOLERANCE[torch.float32], f"triton vs torch {name}")
        assert_close_scaled(want, ag, TOLERANCE[torch.float32], f"torch vs autograd {name}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["fast", "deterministic"])
@pytest.mark.parametrize("case_name", ["nonmultiple_k2", "R_heads_oproj", "G_heads_vproj"])
def test_half_precision_matches_reference(case_name, dtype, deterministic):
    case = CASE_BY_NAME[case_name]
    x, idx, w, gates = make_inputs(case, dtype)
    for backend in ("triton", "torch"):
        for g in (None, gates):
            results, cot = run_with_grads(_cvmm_fn(backend, deterministic), x, idx, w, g)
            _check_against_reference(results, cot, x, idx, w, g, TOLERANCE[dtype], backend)


def test_sigma_moe_two_matmuls_share_one_selection():
    """x -> relu(x W1[e]) -> sum_e g_e (.) W2[e], sorted once; both backends agree with einsum."""
    n, k, num_experts, d, hidden = 50, 3, 6, 24, 20
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(n, d, generator=gen)
    idx = torch.stack([torch.randperm(num_experts, generator=gen)[:k] for _ in range(n)])
    w1 = torch.randn(num_experts, d, hidden, generator=gen) / d**0.5
    w2 = torch.randn(num_experts, hidden, d, generator=gen) / hidden**0.5
    gates = torch.rand(n, k, generator=gen)

    def mlp(backend, x, w1, w2, gates):
        sel = cvmm_prepare(idx, num_experts)
        h = torch.relu(cvmm(x, sel, w1, backend=backend))  # [n, k, hidden]
        return cvmm(h, sel.reshape(n, k, 1), w2, gates[..., None], backend=backend)

    def reference(x, w1, w2, gates):
        h = torch.relu(torch.einsum("ni,nkio->nko", x, w1[idx]))
        return torch.einsum("nki,nkio,nk->no", h, w2[idx], gates)

    params64 = [t.double().requires_grad_() for t in (x, w1, w2, gates)]
    out64 = reference(*params64)
    cot = torch.randn(out64.shape, generator=gen)
    want = [out64.detach(), *torch.autograd.grad(out64, params64, cot.double())]
    for backend in ("triton", "torch"):
        params = [t.clone().requires_grad_() for t in (x, w1, w2, gates)]
        out = mlp(backend, *params)
        got = [out.detach(), *torch.autograd.grad(out, params, cot)]
        for name, g, r in zip(("out", "x", "w1", "w2", "gates"), got, want, strict=True):
            assert_close_scaled(g, r, TOLERANCE[torch.float32], f"{backend} {name}")


def test_only_some_inputs_need_grad():
    """Each gradient is computed alone (need_x / need_w / need_gates) and still correct."""
    case = CASE_BY_NAME["R_heads_oproj"]
    x, idx, w, gates = make_inputs(case)
    _, cot = run_with_grads(_cvmm_fn("torch", False), x, idx, w, gates)
    want = reference_with_grads(x, idx, w, gates, cot)
    for which in range(3):
        leaves = [t.clone().requires_grad_(i == which) for i, t in enumerate((x, w, gates))]
        out = cvmm(leaves[0], idx, leaves[1], leaves[2], backend="triton")
        (grad,) = torch.autograd.grad(out, [leaves[which]], cot)
        assert_close_scaled(grad, want[1 + which], TOLERANCE[torch.float32], NAMES[1 + which])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_strided_inputs_and_broadcast_gradients(backend):
    """A transposed weight view, bf16 gates next to fp32 x, and the stride-0 gradient that
    `out.sum()` produces all go through the strided kernels unchanged."""
    case = CASE_BY_NAME["R_heads_oproj"]
    x, idx, w, gates = make_inputs(case)
    w_view = w.transpose(1, 2).contiguous().transpose(1, 2)  # same values, strides (., 1, I)
    gates = gates.bfloat16()
    leaves = [x.clone().requires_grad_(), w_view.requires_grad_(), gates.requires_grad_()]
    out = cvmm(leaves[0], idx, leaves[1], leaves[2], backend=backend)
    grads = torch.autograd.grad(out.sum(), leaves)
    want = reference_with_grads(x, idx, w, gates, torch.ones(out.shape))
    for name, got, ref in zip(NAMES, [out.detach(), *grads], want, strict=True):
        # Gates are applied in fp32, so only their own gradient is rounded to bf16.
        tol = TOLERANCE[torch.bfloat16 if name == "grad_gates" else torch.float32]
        assert_close_scaled(got, ref, tol, f"{backend} {name}")
