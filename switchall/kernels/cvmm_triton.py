"""Triton backend of the CVMM custom ops: buffers, passes and launches for forward and backward.

Imported lazily (it imports triton) by `cvmm_op.py`. Legend as in `cvmm_torch.py`: M
assignments, S slots per gated output row (R*k), k slots per input row, I = d_in, O = d_out.

Several slots summing into one row (the gated forward over S slots, and grad_x over k slots) is
never materialised per slot: memory is O(rows * width) whatever k is. Two schemes, chosen by
`deterministic`; DRAM bytes per output element for bf16, S = 4..8 here:

- atomic (default): every tile fp32-atomically adds its gate-scaled rows into a zeroed fp32
  [rows, width] buffer, cast once at the end. One launch, full tiles. With the round-robin
  tile order (cvmm_tiles.py) the S adds to a row land close together in time and hit L2: at
  64k tokens the rows touched concurrently are a few MB, where expert-major order would touch
  the whole output between two adds to one row. Traffic: zero fill, one fp32 write-back and
  the cast, ~14 B (4 + 4 + 4 + 2), against 4*S + 2 B to write the per-slot outputs, read them
  back and write the sum when they are materialised (18-34 B). The fp32 summation order of the
  S terms follows the hardware, so the last bits vary run to run.
- deterministic: the assignments are regrouped slot-position-major (a second, stable sort per
  call that keeps expert order inside each group), then S launches, one per slot position j.
  Launch j covers each destination row exactly once, so it reads the fp32 partial sums of
  launches < j, adds its own term and writes back without atomics; the last launch writes the
  output dtype. The order of the S terms is fixed (slot 0 first): bitwise reproducible. Cost:
  S launches with E partial tiles each, and an fp32 read + write per launch, 8*S - 6 B
  (26-58 B), plus the sort.
"""

from __future__ import annotations

import torch
import triton

from switchall.kernels.cvmm_gemm import gather_gemm
from switchall.kernels.cvmm_wgrad import cvmm_weight_grad


def _slot_major(
    order_M: torch.Tensor, sorted_expert_M: torch.Tensor, num_experts: int, slots: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Assignments grouped by slot position (flat slot % slots), then expert; with offsets.

    Group j holds exactly one slot of every destination row. `offsets[j*E + e]` starts expert e
    of group j; launch j reads `offsets[j*E : (j+1)*E + 1]`.
    """
    key_M = (order_M % slots) * num_experts + sorted_expert_M
    key_sorted, perm = torch.sort(key_M, stable=True)
    bounds = torch.arange(slots * num_experts + 1, device=order_M.device)
    return order_M[perm], torch.searchsorted(key_sorted, bounds)


def _gather_gemm_reduce(
    a: torch.Tensor,
    a_div: int,
    b_EKN: torch.Tensor,
    order_M: torch.Tensor,
    offsets_E1: torch.Tensor,
    sorted_expert_M: torch.Tensor,
    *,
    num_out_rows: int,
    slots: int,
    out_dtype: torch.dtype,
    gates_M: torch.Tensor | None,
    deterministic: bool,
    allow_tf32: bool,
    x: torch.Tensor | None = None,
    gate_grad_part: torch.Tensor | None = None,
) -> torch.Tensor:
    """out[r] = sum over the `slots` slots s of row r of gate[s] * (a[s // a_div] @ b[e(s)])."""
    num_experts, _, width = b_EKN.shape
    common = dict(gates=gates_M, x=x, gate_grad_part=gate_grad_part, allow_tf32=allow_tf32)
    if slots <= 1 or order_M.numel() == 0:
        # One slot per row: a plain scatter-store writes every row exactly once. No slots at
        # all (M = 0): the sum is empty, zeros.
        alloc = torch.empty if slots == 1 else torch.zeros
        out = alloc(num_out_rows, width, dtype=out_dtype, device=a.device)
        gather_gemm(
            a, a_div, b_EKN, order_M, offsets_E1, order_M.numel(), out=out, out_div=1, **common
        )
        return out
    if not deterministic:
        acc = torch.zeros(num_out_rows, width, dtype=torch.float32, device=a.device)
        gather_gemm(
            a, a_div, b_EKN, order_M, offsets_E1, order_M.numel(),
            out=acc, out_div=slots, atomic=True, **common,
        )  # fmt: skip
        return acc.to(out_dtype)
    order_J, offsets_J = _slot_major(order_M, sorted_expert_M, num_experts, slots)
    out = torch.empty(num_out_rows, width, dtype=out_dtype, device=a.device)
    partial = out if out_dtype == torch.float32 else torch.empty_like(out, dtype=torch.float32)
    for j in range(slots):
        gather_gemm(
            a, a_div, b_EKN, order_J, offsets_J[j * num_experts : (j + 1) * num_experts + 1],
            num_out_rows,
            out=out if j == slots - 1 else partial,
            out_div=slots,
            prev=partial if j > 0 else None,
            **common,
        )  # fmt: skip
    return out


def cvmm_forward(
    x_rows: torch.Tensor,
    weight_EIO: torch.Tensor,
    sorted_expert_M: torch.Tensor,
    order_M: torch.Tensor,
    offsets_E1: torch.Tensor,
    gates_M: torch.Tensor | None,
    k: int,
    num_out_rows: int,
    deterministic: bool,
    allow_tf32: bool,
) -> torch.Tensor:
    """Per-slot outputs `[M, O]`, or the gated sums `[num_out_rows, O]` when `gates_M` is set."""
    num_rows = order_M.numel()
    if gates_M is None:
        out = torch.empty(num_rows, weight_EIO.shape[2], dtype=x_rows.dtype, device=x_rows.device)
        gather_gemm(
            x_rows, k, weight_EIO, order_M, offsets_E1, num_rows,
            out=out, out_div=1, allow_tf32=allow_tf32,
        )  # fmt: skip
        return out
    return _gather_gemm_reduce(
        x_rows, k, weight_EIO, order_M, offsets_E1, sorted_expert_M,
        num_out_rows=num_out_rows,
        slots=num_rows // num_out_rows if num_out_rows else 0,
        out_dtype=x_rows.dtype,
        gates_M=gates_M,
        deterministic=deterministic,
        allow_tf32=allow_tf32,
    )  # fmt: skip


def cvmm_backward(
    grad_out: torch.Tensor,
    x_rows: torch.Tensor,
    weight_EIO: torch.Tensor,
    sorted_expert_M: torch.Tensor,
    order_M: torch.Tensor,
    offsets_E1: torch.Tensor,
    gates_M: torch.Tensor | None,
    k: int,
    num_out_rows: int,
    need_x: bool,
    need_w: bool,
    need_gates: bool,
    deterministic: bool,
    allow_tf32: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients in x rows, weight and flat gates; same contract as `torch_backward`."""
    num_rows = order_M.numel()
    d_in = x_rows.shape[1]
    # Gradient row of each slot: its own row without gates, its gated output row with them.
    grad_div = 1
    if gates_M is not None and num_out_rows:
        grad_div = num_rows // num_out_rows
    grad_out = grad_out.to(x_rows.dtype)
    w_EOI = weight_EIO.transpose(1, 2)  # a strided view: the kernel reads W^T without a copy
    grad_x = grad_w = grad_g = None
    part = None
    if need_gates:
        # One fp32 partial dot per (N tile, slot); N tiles are >= 16 wide.
        part = x_rows.new_zeros(triton.cdiv(d_in, 16), num_rows, dtype=torch.float32)
    if need_x:
        grad_x = _gather_gemm_reduce(
            grad_out, grad_div, w_EOI, order_M, offsets_E1, sorted_expert_M,
            num_out_rows=x_rows.shape[0],
            slots=k,
            out_dtype=x_rows.dtype,
            gates_M=gates_M,
            deterministic=deterministic,
            allow_tf32=allow_tf32,
            x=x_rows if need_gates else None,
            gate_grad_part=part,
        )  # fmt: skip
    elif need_gates:
        gather_gemm(
            grad_out, grad_div, w_EOI, order_M, offsets_E1, num_rows,
            out=x_rows, out_div=k, write_out=False, x=x_rows, gate_grad_part=part,
            allow_tf32=allow_tf32,
        )  # fmt: skip
    if need_gates:
        grad_g = part.sum(0).to(gates_M.dtype)
    if need_w:
        grad_w = cvmm_weight_grad(
            x_rows, k, grad_out, grad_div, order_M, offsets_E1,
            gates=gates_M,
            out_dtype=weight_EIO.dtype,
            deterministic=deterministic,
            allow_tf32=allow_tf32,
        )  # fmt: skip
    return grad_x, grad_w, grad_g
