"""CPU CVMM through dense matmuls over all experts, for banks where a row's slots select a large
share of the experts (SwitchHead's V and O: E / slots = 2 in the paper's configs).

Legend as in `cvmm_torch.py`: X input rows, R output rows, k slots per input row, S slots per
output row, M = X*k = R*S assignments, E experts, I = d_in, O = d_out; ids_M, gates_M flat in
the caller's order.

At d_head-wide experts a CPU spends more on moving rows than on multiplying: the sorted path
gathers M rows of the wide side (x for V: G*k copies of every token row) and reduces them again.
Computing every expert's output instead costs E / (slots) times the useful FLOPs, but in one
wide matmul, and only the narrow side is ever gathered or scattered:
- "expand" (each input row against every expert: V, per-slot outputs): Y = x @ [W_0 .. W_E]
  is [X, E*O]; a slot's output is row (x row, expert) of Y. E / k times the FLOPs.
- "combine" (every expert's input summed first: O, where S = R*k slots share an output row):
  A[r, e] = sum of g * x over the slots of output row r that chose e, [R, E*I]; out = A @ W.
  E / S times the FLOPs.
Duplicate (row, expert) pairs are summed (index_add), so any selection is handled. Results are
the sorted path's up to fp32 rounding; only fp32 / fp64 take this path (16-bit inputs keep the
sorted one and its rounding points).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DENSE_DTYPES = (torch.float32, torch.float64)


def dense_layout(num_experts: int, k: int, slots_per_out: int | None, d_in: int, d_out: int):
    """("expand" | "combine", FLOP factor over the routed matmul) for this selection shape;
    `slots_per_out` is None without gates (per-slot outputs: expand only)."""
    expand = num_experts / max(k, 1)
    if slots_per_out is None:
        return "expand", expand
    combine = num_experts / max(slots_per_out, 1)
    if combine < expand or (combine == expand and d_in < d_out):
        return "combine", combine
    return "expand", expand


def _flat_weight(weight_EIO: torch.Tensor) -> torch.Tensor:
    """[E, I, O] -> [I, E*O]: every expert side by side."""
    e, i, o = weight_EIO.shape
    return weight_EIO.permute(1, 0, 2).reshape(i, e * o)


def _combined_inputs(x_rows, ids_M, gates_M, k: int, rows: int, num_experts: int):
    """A [R*E, I]: per (output row, expert), the gate-weighted sum of the input rows sent there."""
    m = ids_M.numel()
    slot_M = torch.arange(m, device=ids_M.device)
    target_M = (slot_M // (m // rows)) * num_experts + ids_M
    src_MI = x_rows.index_select(0, slot_M // k) * gates_M.to(x_rows.dtype)[:, None]
    a = x_rows.new_zeros(rows * num_experts, x_rows.shape[1])
    return a.index_add_(0, target_M, src_MI), target_M


def dense_forward(x_rows, weight_EIO, ids_M, gates_M, k: int, num_out_rows: int, layout: str):
    e, _, o = weight_EIO.shape
    m = ids_M.numel()
    if m == 0:
        return x_rows.new_zeros(num_out_rows if gates_M is not None else 0, o)
    if layout == "combine":
        a, _ = _combined_inputs(x_rows, ids_M, gates_M, k, num_out_rows, e)
        return a.view(num_out_rows, -1) @ weight_EIO.reshape(-1, o)
    y = (x_rows @ _flat_weight(weight_EIO)).view(-1, o)  # row x*E + e: x row x, expert e
    row_M = torch.arange(m, device=ids_M.device) // k * e + ids_M
    if gates_M is None:
        return y.index_select(0, row_M)
    slots = m // num_out_rows if num_out_rows else 0
    if slots == 0:
        return y.new_zeros(num_out_rows, o)
    psw = gates_M.reshape(num_out_rows, slots).to(y.dtype)
    return F.embedding_bag(row_M.view(num_out_rows, slots), y, mode="sum", per_sample_weights=psw)


def dense_backward(grad_out, x_rows, weight_EIO, ids_M, gates_M, k: int, num_out_rows: int,
                   need_x: bool, need_w: bool, need_gates: bool, layout: str):  # fmt: skip
    """Gradients of `dense_forward` (None where not needed); same contract as torch_backward."""
    e, i, o = weight_EIO.shape
    m = ids_M.numel()
    slot_M = torch.arange(m, device=ids_M.device)
    grad_x = grad_w = grad_g = None
    if m == 0:
        return (
            torch.zeros_like(x_rows) if need_x else None,
            torch.zeros_like(weight_EIO) if need_w else None,
            torch.zeros_like(gates_M) if need_gates else None,
        )
    if layout == "combine":
        w_FO = weight_EIO.reshape(e * i, o)
        da = (grad_out @ w_FO.t()).view(-1, i)  # [R*E, I]
        a, target_M = _combined_inputs(x_rows, ids_M, gates_M, k, num_out_rows, e)
        if need_w:
            grad_w = (a.view(num_out_rows, -1).t() @ grad_out).view(e, i, o)
        if need_x:
            psw = gates_M.reshape(-1, k).to(da.dtype)
            grad_x = F.embedding_bag(target_M.view(-1, k), da, mode="sum", per_sample_weights=psw)
        if need_gates:
            x_MI = x_rows.index_select(0, slot_M // k)
            grad_g = (x_MI * da.index_select(0, target_M)).sum(-1).to(gates_M.dtype)
        return grad_x, grad_w, grad_g
    row_M = slot_M // k * e + ids_M
    if gates_M is None:
        go_MO = grad_out
    else:
        slots = m // num_out_rows if num_out_rows else 1
        go_MO = grad_out.index_select(0, slot_M // slots)
    w_IF = _flat_weight(weight_EIO)
    if need_gates:
        y_MO = (x_rows @ w_IF).view(-1, o).index_select(0, row_M)
        grad_g = (y_MO * go_MO).sum(-1).to(gates_M.dtype)
    if need_x or need_w:
        scaled = go_MO if gates_M is None else go_MO * gates_M.to(go_MO.dtype)[:, None]
        dy = go_MO.new_zeros(x_rows.shape[0] * e, o).index_add_(0, row_M, scaled)
        dy = dy.view(x_rows.shape[0], e * o)
        if need_x:
            grad_x = dy @ w_IF.t()
        if need_w:
            grad_w = (x_rows.t() @ dy).view(i, e, o).permute(1, 0, 2).contiguous()
    return grad_x, grad_w, grad_g
