"""How a run is laid out over processes: tensor, expert and data parallel sizes, ZeRO stage."""

from __future__ import annotations

from dataclasses import dataclass

from switchall.configtools import check, join


@dataclass(kw_only=True)
class ParallelConfig:
    tensor: int = 1
    """Tensor-parallel size: attention heads, dense MLP columns and σ-MoE expert widths are
    split over this many ranks (it must divide the heads: 2 for the paper's 2-head models)."""
    expert: int = 1
    """Expert-parallel size: σ-MoE experts split over this many data-parallel ranks."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage: 0 replicates, 1 partitions optimiser state, 2 also gradients,
    3 also parameters (not with σ-MoE: DeepSpeed does not support MoE at stage 3)."""
    timeout_s: float = 600.0
    """Seconds a rendezvous or collective may wait for the other ranks before failing (a hung
    or dead rank then ends the job instead of blocking it). It also bounds the slowest
    checkpoint save, whose barriers wait for the slowest writer."""

    def validate(self, prefix: str = "") -> None:
        check(self.tensor >= 1, join(prefix, "tensor"), "must be >= 1")
        check(self.expert >= 1, join(prefix, "expert"), "must be >= 1")
        check(self.zero_stage in (0, 1, 2, 3), join(prefix, "zero_stage"), "must be 0, 1, 2 or 3")
        check(self.timeout_s > 0, join(prefix, "timeout_s"), "must be > 0")
