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
    """Sort the assignments `expert_idx [..., k]` by expert (done once per routing decision)."""
    if expert_idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"expert_idx must be int64 or int32, got {expert_idx.dtype}")
    if expert_idx.dim() < 1:
        raise ValueError("expert_idx must have at least one dimension (the k slots)")
    flat_M = expert_idx.reshape(-1).long()
    # A stable sort keeps assignments of one expert in row order, so results do not depend on
    # the sort implementation and rows read by a tile stay close together in memory.
    sorted_expert_M, order_M = torch.sort(flat_M, stable=True)
    # bincount rejects negative ids itself; its output length reveals ids >= num_experts.
    counts_E = torch.bincount(flat_M, minlength=num_experts)
    if counts_E.numel() > num_experts:
        raise ValueError(f"expert id {counts_E.numel() - 1} out of range for {num_experts} experts")
    offsets_E1 = torch.zeros(num_experts + 1, dtype=torch.int64, device=expert_idx.device)
    offsets_E1[1:] = torch.cumsum(counts_E, 0)
    return CVMMSelection(tuple(expert_idx.shape), num_experts, sorted_expert_M, order_M, offsets_E1)
