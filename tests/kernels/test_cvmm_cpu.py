"""The CPU backend's matmul paths (`F.grouped_mm` over sorted rows, the per-expert loop, and every
expert densely) against the float64 oracle: forward and the hand-written backward (every
gradient), each call form, awkward shapes, and which path `gemm="auto"` takes."""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch

from switchall.kernels import cvmm, cvmm_prepare
from switchall.kernels.selection import row_layout
from tests.kernels.cvmm_cases import (
    CASE_BY_NAME,
    CASES,
    TOLERANCE,
    assert_close_scaled,
    make_inputs,
    reference_with_grads,
    run_with_grads,
)

# The module, not the `cvmm_torch` function that switchall.kernels exports under its name.
ct = importlib.import_module("switchall.kernels.cvmm_torch")
NAMES = ("out", "grad_x", "grad_weight", "grad_gates")


# The cases whose widths grouped_mm cannot take (fp32 widths must be multiples of 4), made
# aligned, so that every call form runs on both paths.
def _aligned(name: str, **widths) -> object:
    return dataclasses.replace(CASE_BY_NAME[name], name=f"{name}_aligned", **widths)


ALIGNED = [
    _aligned("R_heads_oproj", d_out=52),
    _aligned("G_heads_vproj", d_in=32, d_out=16),
    _aligned("M0", d_out=8),
]
ALL_CASES = CASES + ALIGNED


class _Backend(torch.autograd.Function):
    """torch_forward / torch_backward wired as the custom op wires them, with a forced path."""

    @staticmethod
    def forward(ctx, x_rows, weight, gates_M, sel, k, out_rows, gemm):
        ctx.save_for_backward(x_rows, weight, gates_M)
        ctx.args = (sel, k, out_rows, gemm)
        return ct.torch_forward(
            x_rows, weight, sel.order_M, sel.offsets_E1, gates_M, k, out_rows, gemm=gemm
        )

    @staticmethod
    def backward(ctx, grad_out):
        x_rows, weight, gates_M = ctx.saved_tensors
        sel, k, out_rows, gemm = ctx.args
        need = ctx.needs_input_grad
        gx, gw, gg = ct.torch_backward(
            grad_out, x_rows, weight, sel.order_M, sel.offsets_E1, gates_M, k, out_rows,
            need[0], need[1], gates_M is not None and need[2], gemm=gemm,
        )  # fmt: skip
        return gx, gw, gg, None, None, None, None


def _fn(gemm: str):
    def run(x, idx, w, g):
        sel = cvmm_prepare(idx, w.shape[0])
        k, out_rows, lead = row_layout(tuple(x.shape), sel.shape)
        flat_g = None if g is None else g.reshape(-1)
        out = _Backend.apply(x.reshape(-1, x.shape[-1]), w, flat_g, sel, k, out_rows, gemm)
        return out.view(*(lead if g is not None else sel.shape), w.shape[-1])

    return run


def _gemms(case, dtype) -> list[str]:
    x, _, w, _ = make_inputs(case, dtype)
    dense = ["dense"] if dtype in (torch.float32, torch.float64) else []
    return ["loop", *dense] + (["grouped_mm"] if ct.grouped_mm_supported(x, w) else [])


@pytest.mark.parametrize("gated", [False, True], ids=["slots", "gated"])
@pytest.mark.parametrize("case", ALL_CASES, ids=str)
def test_both_paths_match_reference_fp32(case, gated):
    x, idx, w, gates = make_inputs(case)
    gates = gates if gated else None
    gemms = _gemms(case, torch.float32)
    for gemm in gemms:
        results, cot = run_with_grads(_fn(gemm), x, idx, w, gates)
        want = reference_with_grads(x, idx, w, gates, cot)
        for name, got, ref in zip(NAMES, results, want, strict=False):
            assert got.dtype == (gates.dtype if name == "grad_gates" else x.dtype), name
            assert_close_scaled(got, ref, TOLERANCE[torch.float32], f"{gemm} {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("gated", [False, True], ids=["slots", "gated"])
@pytest.mark.parametrize("case", ALL_CASES, ids=str)
def test_eager_cvmm_differentiates_by_autograd_and_matches_reference(case, gated, dtype,
                                                                     monkeypatch):  # fmt: skip
    """Eager training calls skip the custom op (autograd differentiates the backend's forward)
    unless each input row has one slot (σ-MoE W2's form); no-grad calls run it. Every
    gradient against the float64 oracle."""
    import switchall.kernels as kernels

    ops = []
    real = kernels.cvmm_fwd
    monkeypatch.setattr(kernels, "cvmm_fwd", lambda *a: ops.append(1) or real(*a))
    x, idx, w, gates = make_inputs(case, dtype)
    gates = gates if gated else None
    results, cot = run_with_grads(lambda *a: cvmm(*a), x, idx, w, gates)
    slots_per_x_row = row_layout(tuple(x.shape), tuple(idx.shape))[0]
    assert ops == ([] if slots_per_x_row > 1 else [1])
    ops.clear()
    want = reference_with_grads(x, idx, w, gates, cot)
    for name, got, ref in zip(NAMES, results, want, strict=False):
        assert got.dtype == (gates.dtype if name == "grad_gates" else x.dtype), name
        tol = TOLERANCE.get(got.dtype, 1e-12)  # grad_gates in the gates dtype (fp32)
        assert_close_scaled(got, ref, tol, f"eager {name}")
    with torch.no_grad():
        assert torch.equal(cvmm(x, idx, w, gates), results[0])
    assert ops == [1]


def test_aligned_cases_cover_every_form_on_grouped_mm():
    """Plain, gated, heads-summed (R), grouped (G) and empty inputs all reach grouped_mm."""
    on_grouped = {c.name for c in ALL_CASES if "grouped_mm" in _gemms(c, torch.float32)}
    assert {"nonmultiple_k2", "empty_experts", "sigma_moe_w2", "R_heads_oproj_aligned",
            "G_heads_vproj_aligned", "M0_aligned"} <= on_grouped  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case_name", ["nonmultiple_k2", "k_eq_E"])
def test_grouped_mm_half_precision(case_name, dtype):
    case = CASE_BY_NAME[case_name]
    x, idx, w, gates = make_inputs(case, dtype)
    assert ct.grouped_mm_supported(x, w)
    for g in (None, gates):
        results, cot = run_with_grads(_fn("grouped_mm"), x, idx, w, g)
        want = reference_with_grads(x, idx, w, g, cot)
        for name, got, ref in zip(NAMES, results, want, strict=False):
            assert_close_scaled(got, ref, TOLERANCE[dtype], f"{dtype} {name}")


def test_dense_layouts_and_the_auto_rule():
    """Every expert densely where that costs <= 2x the routed FLOPs: SwitchHead's V (expand:
    each token row against every expert) and O (combine: inputs summed per expert first);
    the sorted path for the sigma-MoE matmuls (E / K = 4)."""
    from switchall.kernels.cvmm_torch_dense import dense_layout

    # (experts, slots per input row, slots per output row or None, d_in, d_out)
    assert dense_layout(8, 4, 2, 128, 28) == ("expand", 2.0)  # demo V: 2 heads x top-2 of 4
    assert dense_layout(8, 2, 4, 28, 128) == ("combine", 2.0)  # demo O
    assert dense_layout(10, 6, 3, 412, 76) == ("expand", 10 / 6)  # C4 47M V
    assert dense_layout(16, 4, None, 128, 32)[1] == 4.0  # sigma-MoE W1: sorted
    assert dense_layout(16, 1, 4, 32, 128) == ("combine", 4.0)  # sigma-MoE W2: sorted
    # x [40, 4 heads, 28], 8 experts, 2 per row: 8 slots per output row, factor 1: combine.
    x, idx, w, gates = make_inputs(CASE_BY_NAME["R_heads_oproj"])
    sel = cvmm_prepare(idx, w.shape[0])
    rows = x.reshape(-1, x.shape[-1])
    assert ct._dense_plan("auto", rows, w, sel.order_M, gates.reshape(-1), 2, 40) == "combine"
    assert ct._dense_plan("auto", rows.bfloat16(), w.bfloat16(), sel.order_M, None, 2, 40) is None
    assert ct._dense_plan("grouped_mm", rows, w, sel.order_M, gates.reshape(-1), 2, 40) is None


def test_auto_takes_grouped_mm_where_it_can(monkeypatch):
    """fp32 with aligned widths runs F.grouped_mm (forward and backward); fp64 and odd widths
    the loop; forcing grouped_mm on operands it cannot take is an error."""
    calls = []
    real = torch.nn.functional.grouped_mm
    monkeypatch.setattr(ct.F, "grouped_mm", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    x, idx, w, gates = make_inputs(CASE_BY_NAME["nonmultiple_k2"])
    run_with_grads(_fn("auto"), x, idx, w, gates)  # the op's hand-written backward
    assert len(calls) == 3  # forward, grad input, grad weight
    calls.clear()
    # Eager `cvmm`: autograd differentiates the one forward call (its backward is aten's).
    run_with_grads(lambda *a: cvmm(*a), x, idx, w, gates)
    assert len(calls) == 1
    calls.clear()
    run_with_grads(lambda *a: cvmm(*a), x.double(), idx, w.double(), gates.double())
    odd = make_inputs(CASE_BY_NAME["R_heads_oproj"])
    run_with_grads(lambda *a: cvmm(*a), *odd)
    assert calls == []
    assert not ct.grouped_mm_supported(odd[0], odd[2])
    with pytest.raises(ValueError, match="grouped_mm cannot take"):
        _fn("grouped_mm")(*odd)
    with pytest.raises(ValueError, match="gemm must be"):
        _fn("blas")(x, idx, w, gates)


def test_grouped_mm_supported_checks_strides_and_addresses():
    a = torch.randn(8, 32)
    assert ct.grouped_mm_supported(a, torch.randn(2, 32, 16))
    assert not ct.grouped_mm_supported(a, torch.randn(2, 32, 18))  # 72-byte rows
    assert not ct.grouped_mm_supported(a.view(-1)[1:].view(-1)[:248].view(8, 31), a)
    assert not ct.grouped_mm_supported(a.double(), a.double())
    # A transposed weight (strides (., 1, I)) is fine when its rows are aligned.
    assert ct.grouped_mm_supported(a, torch.randn(2, 16, 32).transpose(1, 2))
