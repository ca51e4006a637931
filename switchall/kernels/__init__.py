"""Conditional vector-matrix multiplication (CVMM), the expert matmul of SwitchHead and σ-MoE.

`cvmm` runs Triton kernels on CUDA tensors and the torch backend (cvmm_torch.py) on CPU
tensors, both behind the `switchall::cvmm_fwd` / `switchall::cvmm_bwd` custom ops (see
`cvmm_op.py`), except eager training calls on the torch backend, which autograd differentiates
directly (faster on CPU; the op's backward trades that speed for memory). Nothing here imports
triton: the Triton backend is loaded on its first use.

Options resolve per call, then from the environment, then from defaults:
- `backend`: "torch" | "triton" | "auto"; `$SWITCHALL_CVMM_BACKEND`; auto = triton on CUDA.
- `deterministic`: `$SWITCHALL_CVMM_DETERMINISTIC` (0/1);
  `torch.are_deterministic_algorithms_enabled()`.
- `allow_tf32`: only ever per call (default False); no global switch.
`CVMMConfig` bundles the three for a component's config tree.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

from switchall.kernels.cvmm_op import cvmm_fwd, resolve_backend, resolve_deterministic
from switchall.kernels.cvmm_torch import cvmm_reference, cvmm_torch, torch_forward
from switchall.kernels.selection import CVMMSelection, cvmm_prepare, row_layout

__all__ = ["CVMMConfig", "CVMMSelection", "cvmm", "cvmm_prepare", "cvmm_reference", "cvmm_torch"]

# fp64 is for tests and numerical checks on the torch backend; the kernels take 16/32-bit.
_FLOAT_DTYPES = {
    "torch": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
    "triton": (torch.float16, torch.bfloat16, torch.float32),
}


@dataclass(kw_only=True)
class CVMMConfig:
    """How `cvmm` runs; pass to it as `cvmm(..., **cfg.kwargs())`."""

    backend: Literal["auto", "torch", "triton"] | None = None
    """None defers to `$SWITCHALL_CVMM_BACKEND`, then auto (triton on CUDA, torch on CPU)."""
    deterministic: bool | None = None
    """Bitwise reproducible reductions (no atomics). None defers to
    `$SWITCHALL_CVMM_DETERMINISTIC`, then to `torch.are_deterministic_algorithms_enabled()`."""
    allow_tf32: bool = False
    """Let fp32 inputs use TF32 tensor cores (10-bit mantissa products)."""

    def kwargs(self) -> dict[str, Any]:
        return asdict(self)


def _eager_autograd(*tensors: torch.Tensor | None) -> bool:
    """Whether this call records an autograd graph outside torch.compile's tracing."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    return any(t is not None and t.requires_grad for t in tensors)


def cvmm(
    x: torch.Tensor,
    expert_idx: torch.Tensor | CVMMSelection,
    weight: torch.Tensor,
    gates: torch.Tensor | None = None,
    *,
    deterministic: bool | None = None,
    allow_tf32: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Multiply each row of `x` by the expert matrices its slots select.

    Args:
        x: `[N, d_in]`, or `[N, R, d_in]` when R input rows share one output row (the heads of a
            token in SwitchHead's output projection, the k hidden rows of a σ-MoE expert).
        expert_idx: `[N, k]` (or `[N, R, k]`) int64 expert ids, or a `CVMMSelection` prepared
            by `cvmm_prepare` to reuse one sort across matmuls. With x `[N, d_in]`, ids
            `[N, G, k]` feed each row of x to G groups of k slots (SwitchHead's value
            projection, G = heads) without copying it.
        weight: `[E, d_in, d_out]` expert bank, same dtype as x (outside autocast): fp16,
            bf16 or fp32 (fp64 too on the torch backend).
        gates: optional weights, same shape as `expert_idx`; any float dtype, applied in fp32.
        deterministic: bitwise run-to-run reproducible results (the fused gated sums and the
            weight gradient without atomics); slower. None: see the module docstring.
        allow_tf32: allow TF32 tensor cores for fp32 inputs.
        backend: "torch", "triton" or "auto" (None: `$SWITCHALL_CVMM_BACKEND`, else auto).

    Returns:
        `[*expert_idx.shape, d_out]` without gates; with gates, `[N, d_out]`: the gate-weighted
        sum over all R*k slots of each row (`[N, G, d_out]`, the sum over each group's k slots,
        for the grouped form), computed without materialising the per-slot outputs.
        Differentiable in x, weight and gates. Accumulation is fp32; the output has x's dtype,
        or the autocast dtype under `torch.autocast`.
    """
    sel = (
        expert_idx
        if isinstance(expert_idx, CVMMSelection)
        else cvmm_prepare(expert_idx, weight.shape[0])
    )
    slots_per_x_row, out_rows, out_lead = row_layout(tuple(x.shape), sel.shape)
    if weight.dim() != 3 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must be [E, {x.shape[-1]}, d_out], got {tuple(weight.shape)}")
    if weight.shape[0] != sel.num_experts:
        raise ValueError(f"weight has {weight.shape[0]} experts, selection {sel.num_experts}")
    if gates is not None and tuple(gates.shape) != sel.shape:
        raise ValueError(f"gates {tuple(gates.shape)} must match expert_idx {sel.shape}")
    if gates is not None and not gates.is_floating_point():
        raise TypeError(f"gates must be floating point, got {gates.dtype}")
    tensors = [x, weight, sel.order_M] + ([gates] if gates is not None else [])
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"tensors on different devices: {[str(t.device) for t in tensors]}")
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        # Compute in the autocast dtype, as a matmul would; the casts are differentiable, so
        # fp32 master weights get their gradient back in fp32.
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dtype), weight.to(dtype)
    resolved_backend = resolve_backend(backend, x.device)
    allowed = _FLOAT_DTYPES[resolved_backend]
    if x.dtype not in allowed or weight.dtype != x.dtype:
        raise TypeError(
            f"x and weight must share a dtype among {[str(d) for d in allowed]} for the "
            f"{resolved_backend} backend; got {x.dtype}, {weight.dtype}"
        )
    x_rows, gates_M = x.reshape(-1, x.shape[-1]), None if gates is None else gates.reshape(-1)
    deterministic = resolve_deterministic(deterministic)
    # Eager training on the torch backend: autograd differentiates the recorded gather /
    # matmul / weighted sum, keeping the gathered rows (or the all-experts product) that the
    # op's hand-written backward recomputes to save memory; measured 14-43% faster per
    # forward+backward at the demo and 47M shapes on CPU (BENCHMARKS.md, issue 12), no
    # custom-op dispatch either. Not for one slot per input row (the σ-MoE W2 form): there
    # it measured no faster and would keep [assignments, d_out] per-slot outputs. The op
    # stays for torch.compile and for no-grad calls.
    if resolved_backend == "torch" and slots_per_x_row > 1 and _eager_autograd(x, weight, gates):
        out = torch_forward(x_rows, weight, sel.order_M, sel.offsets_E1, gates_M,
                            slots_per_x_row, out_rows, "auto", sel.sorted_expert_M)  # fmt: skip
    else:
        out = cvmm_fwd(x_rows, weight, sel.sorted_expert_M, sel.order_M, sel.offsets_E1,
                       gates_M, slots_per_x_row, out_rows, deterministic, allow_tf32,
                       resolved_backend)  # fmt: skip
    shape = out_lead if gates is not None else sel.shape
    return out.view(*shape, weight.shape[-1])
