"""PyTorch implementation of CVMM (the CPU backend; on CUDA tensors only the tests' oracle).

Legend: N logical rows, R input rows per logical row, k slots per input row, S = R*k slots per
logical row, M = N*R*k assignments, E experts, I = d_in, O = d_out. Sums over several slots are
taken in fp32 (fp64 for fp64 inputs, which only this backend accepts) and rounded once, as the
Triton kernels do.

Three paths, `gemm="auto"` choosing per call by what measured fastest (`benchmarks/cvmm.py`,
BENCHMARKS.md, issue 12):
- "dense" (cvmm_torch_dense.py): every expert in one wide matmul, when that costs at most
  `DENSE_MAX_FLOP_FACTOR` times the routed FLOPs (SwitchHead's V and O), fp32 / fp64;
- "grouped_mm": the rows gathered in expert order, one `torch.nn.functional.grouped_mm` for
  all experts (its CPU kernel takes fp32 / bf16 / fp16 with 16-byte aligned rows);
- "loop": the same gathered rows, one matmul per expert (fp64, unaligned widths).
Back to the caller's order the sorted paths only gather: sorted position p of slot m is
`inverse[m]`, so per-slot outputs are one `index_select(inverse)`, and every sum over slots
(the gated forward, grad x) is one `embedding_bag(inverse.view(rows, slots),
per_sample_weights=gates)`, a gather fused with the weighted sum, where the first version's
`index_add` scattered M rows one at a time.

- `torch_forward` / `torch_backward`: the CPU backend of the `switchall::cvmm_*` custom ops,
  with a hand-written backward (no autograd inside the op).
- `cvmm_torch`: the same forward called outside the op, so autograd derives every gradient
  from the recorded gather / grouped_mm / embedding_bag. Tests use it as an independent oracle
  for the hand-written backward.
- `cvmm_reference`: naive einsum over gathered expert matrices, for tests.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from switchall.kernels.cvmm_torch_dense import (
    DENSE_DTYPES,
    dense_backward,
    dense_forward,
    dense_layout,
)
from switchall.kernels.selection import CVMMSelection, row_layout

GEMMS = ("auto", "dense", "grouped_mm", "loop")
DENSE_MAX_FLOP_FACTOR = 2.0
"""`gemm="auto"` computes every expert densely (cvmm_torch_dense.py) when that costs at most
this many times the routed FLOPs (SwitchHead's V and O in every paper config), fp32 / fp64."""
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def grouped_mm_supported(*tensors: torch.Tensor) -> bool:
    """Whether F.grouped_mm's CPU kernel takes these operands: its dtypes, and every row stride
    and base address a multiple of 16 bytes (fp32 widths divisible by 4, 16-bit by 8)."""
    if tensors[0].dtype not in _GROUPED_MM_DTYPES or tensors[0].device.type != "cpu":
        return False
    for t in tensors:
        size = t.element_size()
        if t.dtype != tensors[0].dtype or t.data_ptr() % 16:
            return False
        if any(s != 1 and (s * size) % 16 for s in t.stride()):
            return False
    return True


def _dense_plan(gemm, x_rows, weight_EIO, order_M, gates_M, k, num_out_rows) -> str | None:
    """The dense layout to use ("expand" / "combine"), or None for the sorted path."""
    if gemm not in GEMMS:
        raise ValueError(f"gemm must be one of {GEMMS}, got {gemm!r}")
    if gemm not in ("auto", "dense"):
        return None
    slots = order_M.numel() // num_out_rows if gates_M is not None and num_out_rows else None
    layout, factor = dense_layout(weight_EIO.shape[0], k, slots, *weight_EIO.shape[1:])
    if gemm == "dense":
        return layout
    dense_ok = x_rows.dtype in DENSE_DTYPES and weight_EIO.dtype == x_rows.dtype
    return layout if dense_ok and factor <= DENSE_MAX_FLOP_FACTOR else None


def _ids(order_M, sorted_expert_M, offsets_E1) -> torch.Tensor:
    """Each assignment's expert id in the caller's order."""
    if sorted_expert_M is None:
        counts = offsets_E1[1:] - offsets_E1[:-1]
        experts = torch.arange(counts.numel(), device=counts.device)
        sorted_expert_M = torch.repeat_interleave(experts, counts)
    return torch.empty_like(order_M).scatter_(0, order_M, sorted_expert_M)


def _use_grouped_mm(gemm: str, *tensors: torch.Tensor) -> bool:
    if gemm in ("loop", "dense"):
        return False
    supported = grouped_mm_supported(*tensors)
    if gemm == "grouped_mm" and not supported:
        raise ValueError("grouped_mm cannot take these operands (dtype or 16-byte alignment)")
    return supported


def _counts(offsets_E1: torch.Tensor) -> list[int]:
    return (offsets_E1[1:] - offsets_E1[:-1]).tolist()


def _int32_ends(offsets_E1: torch.Tensor) -> torch.Tensor:
    return offsets_E1[1:].to(torch.int32)


def _expert_mm(a_MI, w_EIO, offsets_E1, gemm: str) -> torch.Tensor:
    """Rows of `a_MI`, sorted by expert (expert e's in offsets[e]:offsets[e+1]), times w[e]."""
    if _use_grouped_mm(gemm, a_MI, w_EIO):
        return F.grouped_mm(a_MI, w_EIO, offs=_int32_ends(offsets_E1))
    parts = [a_e.matmul(w_EIO[e]) for e, a_e in enumerate(a_MI.split(_counts(offsets_E1)))]
    return torch.cat(parts) if parts else a_MI.new_empty(0, w_EIO.shape[-1])


def _expert_wgrad(x_MI, go_MO, offsets_E1, gemm: str) -> torch.Tensor:
    """[E, I, O]: x_e^T go_e for each expert's rows (zeros for an expert with none)."""
    x_IM = x_MI.transpose(0, 1)
    if _use_grouped_mm(gemm, x_IM, go_MO):
        return F.grouped_mm(x_IM, go_MO, offs=_int32_ends(offsets_E1))
    counts = _counts(offsets_E1)
    return torch.stack(
        [
            x_e.transpose(0, 1).matmul(go_e)
            for x_e, go_e in zip(x_MI.split(counts), go_MO.split(counts), strict=True)
        ]
    )


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for 16-bit inputs, the input dtype otherwise (fp64 stays fp64)."""
    return torch.promote_types(dtype, torch.float32)


def inverse_order(order_M: torch.Tensor) -> torch.Tensor:
    """inverse[m] = the sorted position of assignment m (order[inverse[m]] == m)."""
    positions = torch.arange(order_M.numel(), device=order_M.device)
    return torch.empty_like(order_M).scatter_(0, order_M, positions)


def _slot_sum(
    rows_MF: torch.Tensor, inverse_M: torch.Tensor, rows: int, weights_M: torch.Tensor | None
) -> torch.Tensor:
    """out[r] = sum_j weights[r*S + j] * rows_MF[inverse[r*S + j]] over the S = M / rows slots
    of output row r: a gather and the (weighted) sum in one pass, in rows_MF's dtype."""
    slots = inverse_M.numel() // rows if rows else 0
    if slots == 0:
        return rows_MF.new_zeros(rows, rows_MF.shape[-1])
    psw = None if weights_M is None else weights_M.reshape(rows, slots).to(rows_MF.dtype)
    return F.embedding_bag(inverse_M.view(rows, slots), rows_MF, mode="sum", per_sample_weights=psw)


def torch_forward(
    x_rows: torch.Tensor,
    weight_EIO: torch.Tensor,
    order_M: torch.Tensor,
    offsets_E1: torch.Tensor,
    gates_M: torch.Tensor | None,
    k: int,
    num_out_rows: int,
    gemm: str = "auto",
    sorted_expert_M: torch.Tensor | None = None,
) -> torch.Tensor:
    """`[M, O]` per-slot outputs, or with flat gates `[M]` the gated sums `[num_out_rows, O]`."""
    dense = _dense_plan(gemm, x_rows, weight_EIO, order_M, gates_M, k, num_out_rows)
    if dense:
        ids_M = _ids(order_M, sorted_expert_M, offsets_E1)
        return dense_forward(x_rows, weight_EIO, ids_M, gates_M, k, num_out_rows, dense)
    y_MO = _expert_mm(x_rows.index_select(0, order_M // k), weight_EIO, offsets_E1, gemm)
    inverse_M = inverse_order(order_M)
    if gates_M is None:
        return y_MO.index_select(0, inverse_M)
    acc = _accumulation_dtype(y_MO.dtype)
    return _slot_sum(y_MO.to(acc), inverse_M, num_out_rows, gates_M).to(y_MO.dtype)


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
    gemm: str = "auto",
    sorted_expert_M: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of `torch_forward` in x rows, weight and flat gates (None where not needed).

    grad_out is `[M, O]` without gates, `[num_out_rows, O]` with them. For the slot of sorted
    position p (input row i, gradient row r, gate g):
      grad_W[e] += x[i]^T (g * grad_out[r]);  t = grad_out[r] @ W_e^T;
      grad_x[i] += g * t;  grad_g[slot] = x[i] . t.
    """
    dense = _dense_plan(gemm, x_rows, weight_EIO, order_M, gates_M, k, num_out_rows)
    if dense:
        ids_M = _ids(order_M, sorted_expert_M, offsets_E1)
        return dense_backward(grad_out, x_rows, weight_EIO, ids_M, gates_M, k, num_out_rows,
                              need_x, need_w, need_gates, dense)  # fmt: skip
    acc = _accumulation_dtype(x_rows.dtype)
    num_assignments = order_M.numel()
    if gates_M is None:
        go_MO = grad_out.index_select(0, order_M)
    else:
        slots = num_assignments // num_out_rows if num_out_rows else 1
        go_MO = grad_out.index_select(0, order_M // slots)
    inverse_M = inverse_order(order_M)
    grad_x = grad_w = grad_g = None
    # One gather of the input rows in expert order serves the gate and the weight gradients.
    x_MI = x_rows.index_select(0, order_M // k) if need_gates or need_w else None
    if need_x or need_gates:
        t_MI = _expert_mm(go_MO, weight_EIO.transpose(1, 2), offsets_E1, gemm).to(acc)
        if need_gates:
            dots_M = (t_MI * x_MI.to(acc)).sum(-1)
            grad_g = dots_M.index_select(0, inverse_M).to(gates_M.dtype)
        if need_x:
            grad_x = _slot_sum(t_MI, inverse_M, x_rows.shape[0], gates_M).to(x_rows.dtype)
    if need_w:
        if gates_M is not None:
            g_M1 = gates_M.index_select(0, order_M).to(acc)[:, None]
            # Rounded to the input dtype before the matmul, like the kernel's tensor-core input.
            go_MO = (go_MO.to(acc) * g_M1).to(go_MO.dtype)
        grad_w = _expert_wgrad(x_MI, go_MO, offsets_E1, gemm).to(weight_EIO.dtype)
    return grad_x, grad_w, grad_g


def cvmm_torch(
    x: torch.Tensor,
    sel: CVMMSelection,
    weight_EIO: torch.Tensor,
    gates: torch.Tensor | None = None,
    gemm: str = "auto",
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
        gemm,
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
