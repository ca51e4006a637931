"""`switchall::cvmm_fwd` / `cvmm_bwd` as custom ops: opcheck, and torch.compile without breaks."""

from __future__ import annotations

import pytest
import torch

from switchall.kernels import cvmm, cvmm_prepare
from tests.kernels.cvmm_cases import CASE_BY_NAME, TOLERANCE, assert_close_scaled, make_inputs


def _op_args(case_name: str, gated: bool, backend: str, requires_grad: bool = True):
    case = CASE_BY_NAME[case_name]
    x, idx, w, gates = make_inputs(case)
    sel = cvmm_prepare(idx, case.num_experts)
    x_rows = x.reshape(-1, case.d_in).requires_grad_(requires_grad)
    w.requires_grad_(requires_grad)
    gates_M = gates.reshape(-1).requires_grad_(requires_grad) if gated else None
    tensors = (x_rows, w, sel.sorted_expert_M, sel.order_M, sel.offsets_E1, gates_M)
    return tensors, (case.k, sel.shape[0], False, False, backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("gated", [False, True], ids=["slots", "gated"])
def test_opcheck_forward(gated, backend):
    tensors, options = _op_args("R_heads_oproj", gated, backend)
    torch.library.opcheck(torch.ops.switchall.cvmm_fwd.default, (*tensors, *options))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck_backward(backend):
    tensors, (k, rows, det, tf32, _) = _op_args("R_heads_oproj", True, backend, False)
    grad_out = torch.randn(rows, tensors[1].shape[2])
    for needs in [(True, True, True), (False, True, False), (True, False, True)]:
        args = (grad_out, *tensors, k, rows, *needs, det, tf32, backend)
        torch.library.opcheck(torch.ops.switchall.cvmm_bwd.default, args)


def _sigma_moe(x, idx, w1, w2, gates, backend):
    """Both σ-MoE matmuls, sorting inside the compiled region."""
    n, k = idx.shape
    sel = cvmm_prepare(idx, w1.shape[0])
    h = torch.relu(cvmm(x, sel, w1, backend=backend))
    return cvmm(h, sel.reshape(n, k, 1), w2, gates[..., None], backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compile_fullgraph_matches_eager(backend):
    """fullgraph=True fails on any graph break; aot_eager runs Dynamo and AOTAutograd (fake
    tensors, the registered autograd) and then eager kernels, which keeps the test fast."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(5)
    n, k, num_experts, d, hidden = 48, 2, 5, 20, 12
    x = torch.randn(n, d, generator=gen)
    idx = torch.stack([torch.randperm(num_experts, generator=gen)[:k] for _ in range(n)])
    w1 = torch.randn(num_experts, d, hidden, generator=gen) / d**0.5
    w2 = torch.randn(num_experts, hidden, d, generator=gen) / hidden**0.5
    gates = torch.rand(n, k, generator=gen)
    compiled = torch.compile(_sigma_moe, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (_sigma_moe, compiled):
        leaves = [t.clone().requires_grad_() for t in (x, w1, w2, gates)]
        out = fn(leaves[0], idx, leaves[1], leaves[2], leaves[3], backend)
        out.square().sum().backward()
        results.append([out.detach(), *(t.grad for t in leaves)])
    for eager, comp in zip(*results, strict=True):
        assert_close_scaled(comp, eager, TOLERANCE[torch.float32], "compiled vs eager")


def _sigma_moe_dense(x, idx, w1, w2, gates):
    """The same σ-MoE written without cvmm: gather each slot's expert matrices (float64)."""
    h_NKH = torch.relu(torch.einsum("nd,nkdh->nkh", x, w1[idx]))
    return torch.einsum("nkh,nkhd,nk->nd", h_NKH, w2[idx], gates)


@pytest.mark.slow
def test_inductor_compiles_around_the_op():
    """The default backend: Inductor generates C++ for the sort around the opaque op (~30 s).
    Output and every gradient (x, both expert banks, gates) against a float64 einsum."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(6)
    n, k, num_experts, d, hidden = 24, 2, 4, 16, 8
    x = torch.randn(n, d, generator=gen)
    idx = torch.stack([torch.randperm(num_experts, generator=gen)[:k] for _ in range(n)])
    w1 = torch.randn(num_experts, d, hidden, generator=gen) / d**0.5
    w2 = torch.randn(num_experts, hidden, d, generator=gen) / hidden**0.5
    gates = torch.rand(n, k, generator=gen)
    cotangent = torch.randn(n, d, generator=gen)
    leaves = [t.clone().requires_grad_() for t in (x, w1, w2, gates)]
    out = torch.compile(_sigma_moe, fullgraph=True)(leaves[0], idx, *leaves[1:], "torch")
    (out * cotangent).sum().backward()
    ref_leaves = [t.double().requires_grad_() for t in (x, w1, w2, gates)]
    want = _sigma_moe_dense(ref_leaves[0], idx, *ref_leaves[1:])
    (want * cotangent.double()).sum().backward()
    assert_close_scaled(out.detach(), want.detach(), TOLERANCE[torch.float32], "inductor out")
    for name, got, ref in zip(("x", "w1", "w2", "gates"), leaves, ref_leaves, strict=True):
        assert_close_scaled(got.grad, ref.grad, TOLERANCE[torch.float32], f"inductor d{name}")
