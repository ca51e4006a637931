"""Conditional vector-matrix multiplication (CVMM), the expert matmul of SwitchHead and σ-MoE."""

from __future__ import annotations

import torch

from switchall.kernels.cvmm_torch import cvmm_reference, cvmm_torch
from switchall.kernels.selection import CVMMSelection, cvmm_prepare

__all__ = ["CVMMSelection", "cvmm", "cvmm_prepare", "cvmm_reference"]


def cvmm(
    x: torch.Tensor,
    expert_idx: torch.Tensor | CVMMSelection,
    weight: torch.Tensor,
    gates: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multiply each row of `x` by the expert matrices its slots select.

    Args:
        x: `[N, d_in]`, or `[N, R, d_in]` when R input rows share one output row (the heads of a
            token in SwitchHead's output projection, the k hidden rows of a σ-MoE expert).
        expert_idx: `[N, k]` (or `[N, R, k]`) int64 expert ids, or a `CVMMSelection` prepared
            by `cvmm_prepare` to reuse one sort across matmuls.
        weight: `[E, d_in, d_out]` expert bank.
        gates: optional weights, same shape as `expert_idx`.

    Returns:
        `[N, k, d_out]` (`[N, R, k, d_out]`) without gates; with gates, `[N, d_out]`: the
        gate-weighted sum over all R*k slots of each row. Differentiable in x, weight and gates.
    """
    sel = expert_idx if isinstance(expert_idx, CVMMSelection) else cvmm_prepare(
        expert_idx, weight.shape[0]
    )
    if tuple(x.shape[:-1]) != tuple(sel.shape[:-1]):
        raise ValueError(f"x {tuple(x.shape)} does not match expert_idx {sel.shape}")
    if weight.dim() != 3 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must be [E, {x.shape[-1]}, d_out], got {tuple(weight.shape)}")
    if gates is not None and tuple(gates.shape) != sel.shape:
        raise ValueError(f"gates {tuple(gates.shape)} must match expert_idx {sel.shape}")
    return cvmm_torch(x, sel, weight, gates)
