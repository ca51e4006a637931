"""PyTorch implementation of CVMM: gather rows in expert order, one matmul per expert, scatter.

Legend: N logical rows, R input rows per logical row, k slots per input row, M = N*R*k
assignments, E experts, I = d_in, O = d_out. The loop is over experts (tens), never over tokens;
autograd derives every gradient (x, weight, gates) from the gather / mm / scatter it records.
"""

from __future__ import annotations

import torch

from switchall.kernels.selection import CVMMSelection


def cvmm_torch(
    x: torch.Tensor,
    sel: CVMMSelection,
    weight_EIO: torch.Tensor,
    gates: torch.Tensor | None = None,
) -> torch.Tensor:
    k = sel.slots_per_input_row
    rows_in = x.reshape(-1, x.shape[-1])
    in_row_M = sel.order_M // k
    x_MI = rows_in.index_select(0, in_row_M)
    counts = sel.counts().tolist()
    y_MO = torch.cat([x_e.matmul(weight_EIO[e]) for e, x_e in enumerate(x_MI.split(counts))])
    d_out = weight_EIO.shape[-1]
    if gates is None:
        out_MO = y_MO.new_zeros(sel.num_assignments, d_out).index_copy(0, sel.order_M, y_MO)
        return out_MO.view(*sel.shape, d_out)
    # Gates are cast to the activation dtype (bf16 under autocast), as the kernels do.
    g_M = gates.reshape(-1).index_select(0, sel.order_M).to(y_MO.dtype)
    slots_per_out_row = sel.num_assignments // sel.shape[0] if sel.shape[0] else 1
    out_row_M = sel.order_M // max(slots_per_out_row, 1)
    out_NO = y_MO.new_zeros(sel.shape[0], d_out)
    return out_NO.index_add(0, out_row_M, y_MO * g_M[:, None])


def cvmm_reference(
    x: torch.Tensor,
    expert_idx: torch.Tensor,
    weight_EIO: torch.Tensor,
    gates: torch.Tensor | None = None,
) -> torch.Tensor:
    """Naive reference for tests: gather each slot's expert matrix and contract with einsum.

    Memory is O(M * I * O); use only on small shapes.
    """
    k = expert_idx.shape[-1]
    x_rows = x.reshape(*expert_idx.shape[:-1], 1, x.shape[-1]).expand(*expert_idx.shape, -1)
    w = weight_EIO[expert_idx]  # [..., k, I, O]
    y = torch.einsum("...i,...io->...o", x_rows, w)
    if gates is None:
        return y
    y = y * gates.to(y.dtype)[..., None]
    return y.reshape(expert_idx.shape[0], -1, weight_EIO.shape[-1]).sum(1) if k else y
