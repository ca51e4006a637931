"""CPU candidates for CVMM that `benchmarks/cvmm.py` measures against the torch backend.

Legend as in `switchall/kernels/cvmm_torch.py`: M assignments sorted by expert, E experts,
I = d_in, O = d_out, S slots per gated output row.

- `v1_loop_scatter`: the CPU backend as it was before issue 12 (its algorithm, for fp32), kept
  here as the benchmark's baseline: one matmul per expert, `index_copy` / `index_add` scatters
  back, the same hand-written backward.
- `loop_gather`, `sorted_grouped_mm`, `dense_all_experts`: today's backend with each of its
  paths forced (`gemm=` "loop": fp64 and unaligned widths; "grouped_mm": the sorted rows in
  one F.grouped_mm; "dense": every expert in one wide matmul, cvmm_torch_dense.py). The
  backend's `cvmm_torch` row is what `gemm="auto"` picks from them.
- `grouped_mm_autograd`: gather, `F.grouped_mm`, `index_add`, differentiated by autograd
  (benchmarks/cvmm.py's `grouped_mm` row, on CPU and CUDA).
- `bmm_padded`: sort once, pad every expert's rows to the largest count, one `torch.bmm`,
  differentiated by autograd (padding costs max_count * E - M extra rows).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from switchall.kernels.cvmm_torch import cvmm_torch, torch_backward, torch_forward
from switchall.kernels.selection import CVMMSelection, row_layout


def _flat(x, sel: CVMMSelection, gates):
    k, out_rows, out_lead = row_layout(tuple(x.shape), sel.shape)
    g = None if gates is None else gates.reshape(-1)
    return x.reshape(-1, x.shape[-1]), g, k, out_rows, out_lead


def _shape(out, sel, out_lead, gated, d_out):
    return out.view(*(out_lead if gated else sel.shape), d_out)


# ------------------------------------------------------------------ the pre-issue-12 backend
def _v1_mm(a_MK, w_EKN, counts):
    return torch.cat([a_e.matmul(w_EKN[e]) for e, a_e in enumerate(a_MK.split(counts))])


def _v1_forward(x_rows, w, order_M, offsets_E1, gates_M, k, num_out_rows):
    counts = (offsets_E1[1:] - offsets_E1[:-1]).tolist()
    y_MO = _v1_mm(x_rows.index_select(0, order_M // k), w, counts)
    d_out = w.shape[-1]
    if gates_M is None:
        return y_MO.new_zeros(order_M.numel(), d_out).index_copy(0, order_M, y_MO)
    slots = order_M.numel() // num_out_rows if num_out_rows else 0
    g_M = gates_M.index_select(0, order_M).to(torch.float32)
    out_NO = torch.zeros(num_out_rows, d_out, dtype=torch.float32)
    out_NO = out_NO.index_add(0, order_M // max(slots, 1), y_MO.float() * g_M[:, None])
    return out_NO.to(y_MO.dtype)


def _v1_backward(grad_out, x_rows, w, order_M, offsets_E1, gates_M, k, num_out_rows):
    counts = (offsets_E1[1:] - offsets_E1[:-1]).tolist()
    if gates_M is None:
        go_MO = grad_out.index_select(0, order_M)
    else:
        slots = order_M.numel() // num_out_rows if num_out_rows else 0
        go_MO = grad_out.index_select(0, order_M // max(slots, 1))
        g_M = gates_M.index_select(0, order_M)
    in_row_M = order_M // k
    x_MI = x_rows.index_select(0, in_row_M)
    t_MI = _v1_mm(go_MO, w.transpose(1, 2), counts)
    grad_g = None
    if gates_M is not None:
        dots_M = (t_MI * x_MI).sum(-1)
        grad_g = torch.zeros_like(dots_M).index_copy(0, order_M, dots_M)
        t_MI = t_MI * g_M[:, None]
        go_MO = go_MO * g_M[:, None]
    grad_x = torch.zeros_like(x_rows).index_add(0, in_row_M, t_MI)
    grad_w = torch.stack(
        [
            x_e.transpose(0, 1).matmul(go_e)
            for x_e, go_e in zip(x_MI.split(counts), go_MO.split(counts), strict=True)
        ]
    )
    return grad_x, grad_w, grad_g


class _HandWritten(torch.autograd.Function):
    """A forward / backward pair on the flat layout, as the custom op wires them."""

    @staticmethod
    def forward(ctx, x_rows, w, gates_M, sel, k, out_rows, fwd, bwd):
        ctx.save_for_backward(x_rows, w, gates_M)
        ctx.args = (sel, k, out_rows, bwd)
        return fwd(x_rows, w, sel.order_M, sel.offsets_E1, gates_M, k, out_rows)

    @staticmethod
    def backward(ctx, grad_out):
        x_rows, w, gates_M = ctx.saved_tensors
        sel, k, out_rows, bwd = ctx.args
        gx, gw, gg = bwd(grad_out, x_rows, w, sel.order_M, sel.offsets_E1, gates_M, k, out_rows)
        return gx, gw, gg, None, None, None, None, None


def _hand_written(x, sel, w, gates, fwd, bwd):
    x_rows, g, k, out_rows, out_lead = _flat(x, sel, gates)
    out = _HandWritten.apply(x_rows, w, g, sel, k, out_rows, fwd, bwd)
    return _shape(out, sel, out_lead, gates is not None, w.shape[-1])


def v1_loop_scatter(x, sel, w, gates):
    return _hand_written(x, sel, w, gates, _v1_forward, _v1_backward)


def backend_path(gemm: str):
    """Today's torch backend with its matmul path forced (`gemm` of cvmm_torch.py)."""

    def run(x, sel, w, gates):
        def fwd(*args):
            return torch_forward(*args, gemm=gemm, sorted_expert_M=sel.sorted_expert_M)

        def bwd(*args):
            needs = (True, True, args[5] is not None)
            return torch_backward(*args, *needs, gemm=gemm, sorted_expert_M=sel.sorted_expert_M)

        return _hand_written(x, sel, w, gates, fwd, bwd)

    return run


# ------------------------------------------------------------------ autograd compositions
def _scatter_back(y_MO, sel, gates_M, out_rows):
    if gates_M is None:
        return y_MO.new_zeros(y_MO.shape).index_copy(0, sel.order_M, y_MO)
    g_M = gates_M.index_select(0, sel.order_M).to(y_MO.dtype)
    rows = sel.order_M // (sel.num_assignments // out_rows)
    return y_MO.new_zeros(out_rows, y_MO.shape[1]).index_add(0, rows, y_MO * g_M[:, None])


def grouped_mm_autograd(x, sel, w, gates):
    """Gather rows in expert order, F.grouped_mm, scatter back (gated sum with index_add)."""
    x_rows, g, k, out_rows, out_lead = _flat(x, sel, gates)
    x_MI = x_rows.index_select(0, sel.order_M // k)
    y_MO = F.grouped_mm(x_MI, w, offs=sel.offsets_E1[1:].to(torch.int32))
    out = _scatter_back(y_MO, sel, g, out_rows)
    return _shape(out, sel, out_lead, gates is not None, w.shape[-1])


def bmm_padded(x, sel, w, gates):
    """Sorted rows padded to [E, max_count, I], one bmm, the padding dropped again."""
    x_rows, g, k, out_rows, out_lead = _flat(x, sel, gates)
    counts = sel.counts()
    e, cap = w.shape[0], int(counts.max()) if sel.num_assignments else 0
    starts = sel.offsets_E1[:-1]
    slot_M = torch.arange(sel.num_assignments) - starts.repeat_interleave(counts)
    dest_M = sel.sorted_expert_M * cap + slot_M  # row of each sorted assignment in the padding
    x_MI = x_rows.index_select(0, sel.order_M // k)
    padded = x_MI.new_zeros(e * cap, x_MI.shape[1]).index_copy(0, dest_M, x_MI)
    y_MO = torch.bmm(padded.view(e, cap, -1), w).view(e * cap, -1).index_select(0, dest_M)
    out = _scatter_back(y_MO, sel, g, out_rows)
    return _shape(out, sel, out_lead, gates is not None, w.shape[-1])


def autograd_auto(x, sel, w, gates):
    """The torch backend's forward with its per-call path choice (gemm="auto"), outside the
    custom op, differentiated by autograd (it saves the gathered rows instead of re-gathering)."""
    return cvmm_torch(x, sel, w, gates, gemm="auto")


CPU_CANDIDATES = {
    "v1_loop_scatter": v1_loop_scatter,
    "loop_gather": backend_path("loop"),
    "sorted_grouped_mm": backend_path("grouped_mm"),
    "dense_all_experts": backend_path("dense"),
    "hand_written_auto": backend_path("auto"),  # the op's own backward, without its dispatch
    "bmm_padded": bmm_padded,
    "autograd_auto": autograd_auto,
}
