"""PyTorch implementation of CVMM: gather rows in expert order, one matmul per expert, scatter.

Legend: N logical rows, R input rows per logical row, k slots per input row, S = R*k slots per
logical row, M = N*R*k assignments, E experts, I = d_in, O = d_out. Loops run over experts
(tens), never over tokens. Sums over several slots are taken in fp32 (fp64 for fp64 inputs,
which only this backend accepts) and rounded once, as the Triton kernels do.

- `torch_forward` / `torch_backward`: the CPU backend of the `switchall::cvmm_*` custom ops,
  with a hand-written backward (no autograd inside the op).
- `cvmm_torch`: the same forward called outside the op, so autograd derives every gradient
  from the recorded gather / mm / scatter. Tests use it as an independent oracle for the
  hand-written backward.
- `cvmm_reference`: naive einsum over gathered expert matrices, for tests.
"""

from __future__ import annotations

import math

import torch

from switchall.kernels.selection import CVMMSelection, row_layout


def _per_expert_mm(a_MK: torch.Tensor, w_EKN: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Rows of `a_MK` sorted by expert, `counts[e]` rows each, times `w_EKN[e]`."""
    return torch.cat([a_e.matmul(w_EKN[e]) for e, a_e in enumerate(a_MK.split(counts))])


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for 16-bit inputs, the input dtype otherwise (fp64 stays fp64)."""
    return torch.promote_types(dtype, torch.float32)


def _slots_per_out_row(num_assignments: int, num_out_rows: int) -> int:
    return num_assignments // num_out_rows if num_out_rows else 0


def torch_forward(
    x_rows: torch.Tensor,
    weight_EIO: torch.Tensor,
    order_M: torch.Tensor,
    offsets_E1: torch.Tensor,
    gates_M: torch.Tensor | None,
    k: int,
    num_out_rows: int,
) -> torch.Tensor:
    """`[M, O]` per-slot outputs, or with flat gates `[M]` the gated sums `[num_out_rows, O]`."""
    counts = (offsets_E1[1:] - offsets_E1[:-1]).tolist()
    y_MO = _per_expert_mm(x_rows.index_select(0, order_M // k), weight_EIO, counts)
    d_out = weight_EIO.shape[-1]
    if gates_M is None:
        return y_MO.new_zeros(order_M.numel(), d_out).index_copy(0, order_M, y_MO)
    slots = _slots_per_out_row(order_M.numel(), num_out_rows)
    acc = _accumulation_dtype(y_MO.dtype)
    g_M = gates_M.index_select(0, order_M).to(acc)
    out_NO = torch.zeros(num_out_rows, d_out, dtype=acc, device=y_MO.device)
    out_NO = out_NO.index_add(0, order_M // max(slots, 1), y_MO.to(acc) * g_M[:, None])
    return out_NO.to(y_MO.dtype)


def torch_backward(
    grad_out: torch.Tensor,
    x_rows: torch.Tensor,
    weight_EIO: torch.Tensor,
    order_M: torch.Tensor,
    offsets_E1: torch.Tensor,
    gates_M: torch.Tensor | None,
    k: int,
    num_out_rows: int,
    need_x: bool,
    need_w: bool,
    need_gates: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of `torch_forward` in x rows, weight and flat gates (None where not needed).

    grad_out is `[M, O]` without gates, `[num_out_rows, O]` with them. For the slot of sorted
    position p (input row i, gradient row r, gate g):
      grad_W[e] += x[i]^T (g * grad_out[r]);  t = grad_out[r] @ W_e^T;
      grad_x[i] += g * t;  grad_g[slot] = x[i] . t.
    """
    counts = (offsets_E1[1:] - offsets_E1[:-1]).tolist()
    acc = _accumulation_dtype(x_rows.dtype)
    if gates_M is None:
        go_MO = grad_out.index_select(0, order_M)
    else:
        slots = _slots_per_out_row(order_M.numel(), num_out_rows)
        go_MO = grad_out.index_select(0, order_M // max(slots, 1))
        g_M = gates_M.index_select(0, order_M).to(acc)
    in_row_M = order_M // k
    grad_x = grad_w = grad_g = None
    # One gather of the input rows in expert order serves the gate and the weight gradients.
    x_MI = x_rows.index_select(0, in_row_M) if need_gates or need_w else None
    if need_x or need_gates:
        t_MI = _per_expert_mm(go_MO, weight_EIO.transpose(1, 2), counts).to(acc)
        if need_gates:
            dots_M = (t_MI * x_MI.to(acc)).sum(-1)
            grad_g = torch.zeros_like(dots_M).index_copy(0, order_M, dots_M).to(gates_M.dtype)
        if need_x:
            if gates_M is not None:
                t_MI = t_MI * g_M[:, None]
            grad_x = torch.zeros(x_rows.shape, dtype=acc, device=x_rows.device)
            grad_x = grad_x.index_add(0, in_row_M, t_MI).to(x_rows.dtype)
    if need_w:
        if gates_M is not None:
            # Rounded to the input dtype before the matmul, like the kernel's tensor-core input.
            go_MO = (go_MO.to(acc) * g_M[:, None]).to(go_MO.dtype)
        grad_w = torch.stack(
            [
                x_e.transpose(0, 1).matmul(go_e)
                for x_e, go_e in zip(x_MI.split(counts), go_MO.split(counts), strict=True)
            ]
        ).to(weight_EIO.dtype)
    return grad_x, grad_w, grad_g


def cvmm_torch(
    x: torch.Tensor,
    sel: CVMMSelection,
    weight_EIO: torch.Tensor,
    gates: torch.Tensor | None = None,
) -> torch.Tensor:
    """CVMM with autograd-derived gradients; same contract as `switchall.kernels.cvmm`."""
    slots_per_x_row, out_rows, out_lead = row_layout(tuple(x.shape), sel.shape)
    out = torch_forward(
        x.reshape(-1, x.shape[-1]),
        weight_EIO,
        sel.order_M,
        sel.offsets_E1,
        None if gates is None else gates.reshape(-1),
        slots_per_x_row,
        out_rows,
    )
    return out.view(*(out_lead if gates is not None else sel.shape), weight_EIO.shape[-1])


def cvmm_reference(
    x: torch.Tensor,
    expert_idx: torch.Tensor,
    weight_EIO: torch.Tensor,
    gates: torch.Tensor | None = None,
) -> torch.Tensor:
    """Naive reference for tests: gather each slot's expert matrix and contract with einsum.

    Memory is O(M * I * O); use only on small shapes.
    """
    _, _, out_lead = row_layout(tuple(x.shape), tuple(expert_idx.shape))
    # Insert a unit dim for every dim x lacks (the grouped form's G, then k) and broadcast.
    lead = x.shape[:-1] + (1,) * (expert_idx.dim() - x.dim() + 1)
    x_rows = x.reshape(*lead, x.shape[-1]).expand(*expert_idx.shape, -1)
    w = weight_EIO[expert_idx]  # [..., k, I, O]
    y = torch.einsum("...i,...io->...o", x_rows, w)
    if gates is None:
        return y
    y = y * gates.to(y.dtype)[..., None]
    slots_per_out_row = math.prod(expert_idx.shape[len(out_lead) :])
    return y.reshape(*out_lead, slots_per_out_row, weight_EIO.shape[-1]).sum(-2)
