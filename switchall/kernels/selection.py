"""Sorted expert assignments, prepared once per routing decision and shared by several matmuls.

Legend: N logical rows (tokens, or (token, head) pairs), R input rows per logical row,
k experts per input row, M = N*R*k assignments, E experts.

`cvmm` accepts either a raw `expert_idx` tensor or a `CVMMSelection`. The selection sorts the
flattened assignments by expert once; the two matmuls of a σ-MoE layer and the V/O projections
that share a routing decision reuse it instead of sorting again. `reshape` reinterprets the same
sorted assignments with a different grouping of slots into rows (e.g. `[N, k]` for the first
σ-MoE matmul and `[N, k, 1]` for the second, where each slot has its own input row) without
sorting again: the flat order of the assignments, and so the sort, does not change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CVMMSelection:
    """Expert assignments `[..., k]` sorted by expert id.

    Attributes:
        shape: shape of the expert index tensor; the last dim is the slots per input row.
        num_experts: E, the size of the expert bank the ids index.
        sorted_expert_M: expert id of each assignment, ascending.
        order_M: position of each sorted assignment in the flattened `[..., k]` layout.
        offsets_E1: `offsets[e]:offsets[e+1]` is expert e's range in the sorted list.
    """

    shape: tuple[int, ...]
    num_experts: int
    sorted_expert_M: torch.Tensor
    order_M: torch.Tensor
    offsets_E1: torch.Tensor

    @property
    def num_assignments(self) -> int:
        return self.sorted_expert_M.numel()

    @property
    def slots_per_input_row(self) -> int:
        return self.shape[-1]

    def reshape(self, *shape: int) -> CVMMSelection:
        """The same sorted assignments viewed with another `[..., k]` grouping."""
        numel = 1
        for s in shape:
            numel *= s
        if numel != self.num_assignments:
            raise ValueError(f"cannot view {self.shape} assignments as {shape}")
        return CVMMSelection(
            tuple(shape), self.num_experts, self.sorted_expert_M, self.order_M, self.offsets_E1
        )

    def counts(self) -> torch.Tensor:
        return self.offsets_E1[1:] - self.offsets_E1[:-1]


def cvmm_prepare(expert_idx: torch.Tensor, num_experts: int) -> CVMMSelection:
    """Sort the assignments `expert_idx [..., k]` by expert (done once per routing decision).

    Shapes only depend on `expert_idx.shape` and `num_experts`, and nothing waits for the
    device: the offsets come from a binary search over the sorted ids (bincount's output size
    would depend on the data), so this traces under `torch.compile(fullgraph=True)` and never
    stalls the CPU on a GPU sync. Ids out of range are checked on the device (asynchronously
    on CUDA); on CPU the check is immediate and raises ValueError.
    """
    if expert_idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"expert_idx must be int64 or int32, got {expert_idx.dtype}")
    if expert_idx.dim() < 1:
        raise ValueError("expert_idx must have at least one dimension (the k slots)")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    flat_M = expert_idx.reshape(-1).long()
    # A stable sort keeps assignments of one expert in row order, so results do not depend on
    # the sort implementation, rows read by a tile stay close together in memory, and the
    # kernels' round-robin tile order keeps concurrent tiles on nearby output rows.
    sorted_expert_M, order_M = torch.sort(flat_M, stable=True)
    if flat_M.numel():
        in_range = (sorted_expert_M[0] >= 0) & (sorted_expert_M[-1] < num_experts)
        if expert_idx.device.type == "cpu" and not torch.compiler.is_compiling():
            if not bool(in_range):
                raise ValueError(
                    f"expert ids must be in [0, {num_experts}), got "
                    f"[{int(sorted_expert_M[0])}, {int(sorted_expert_M[-1])}]"
                )
        else:
            torch._assert_async(in_range, f"expert ids must be in [0, {num_experts})")
    bounds_E1 = torch.arange(num_experts + 1, device=expert_idx.device)
    offsets_E1 = torch.searchsorted(sorted_expert_M, bounds_E1)
    return CVMMSelection(tuple(expert_idx.shape), num_experts, sorted_expert_M, order_M, offsets_E1)


def row_layout(x_shape: tuple[int, ...], sel_shape: tuple[int, ...]) -> tuple[int, int, tuple]:
    """How the rows of x meet the slots of a selection, for the three forms `cvmm` accepts.

    Returns (slots per row of x, gated output rows, leading shape of the gated output):
    - x `[N, I]`, ids `[N, k]`: k slots per row; gated output `[N, O]`.
    - x `[N, R, I]`, ids `[N, R, k]`: R input rows share one gated output row, `[N, O]`
      (SwitchHead's output projection sums over heads and experts at once).
    - x `[N, I]`, ids `[N, G, k]`: one input row feeds G groups of k slots; gated output
      `[N, G, O]`, a sum within each group (SwitchHead's value projection: G = heads). The row
      is read, never copied G times.
    """
    x_lead, idx_lead = tuple(x_shape[:-1]), tuple(sel_shape[:-1])
    slots = sel_shape[-1]
    if x_lead == idx_lead:
        return slots, (idx_lead[0] if idx_lead else 1), idx_lead[:1]
    if len(x_lead) == 1 and len(idx_lead) == 2 and x_lead[0] == idx_lead[0]:
        return idx_lead[1] * slots, idx_lead[0] * idx_lead[1], idx_lead
    raise ValueError(
        f"x {tuple(x_shape)} does not match expert_idx {tuple(sel_shape)}: expected x "
        f"[*lead, d_in] with ids [*lead, k], or x [N, d_in] with ids [N, G, k]"
    )
