"""Autograd-aware collectives that take their process group explicitly.

megatron-core's `tensor_parallel.mappings` covers the tensor-parallel copies and reductions; the
two here are the ones it lacks on CPU or altogether:
- `all_to_all_v`: uneven all-to-all (megatron's allocates its output on the current CUDA device,
  which a CPU build cannot do); backward is the reverse exchange.
- `all_reduce_sum`: a sum whose backward is again a sum over the group. It is the right
  gradient when every rank's loss uses the reduced value (the σ-MoE regulariser's global
  statistics): d(sum_r L_r)/d x_r = sum_r dL_r/d sum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class CommCounter:
    """Bytes this rank sent to other ranks through `all_to_all_v` (forward and backward)."""

    bytes_sent: int = 0
    calls: int = 0

    def record(self, x_ND: torch.Tensor, splits: list[int], group) -> None:
        me = dist.get_rank(group)
        rows = sum(n for r, n in enumerate(splits) if r != me)
        self.bytes_sent += rows * math.prod(x_ND.shape[1:]) * x_ND.element_size()
        self.calls += 1


class _AllToAllV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, group, out_splits, in_splits, counter):
        ctx.group, ctx.out_splits, ctx.in_splits, ctx.counter = (
            group,
            out_splits,
            in_splits,
            counter,
        )
        if counter is not None:
            counter.record(x_ND, in_splits, group)
        out_MD = x_ND.new_empty((sum(out_splits), *x_ND.shape[1:]))
        dist.all_to_all_single(
            out_MD,
            x_ND.contiguous(),
            output_split_sizes=out_splits,
            input_split_sizes=in_splits,
            group=group,
        )
        return out_MD

    @staticmethod
    def backward(ctx, grad_MD):
        # Rows came from rank r's slice; their gradients go back the same way, reversed.
        grad_ND = _AllToAllV.apply(grad_MD, ctx.group, ctx.in_splits, ctx.out_splits, ctx.counter)
        return grad_ND, None, None, None, None


def all_to_all_v(
    x_ND: torch.Tensor,
    group: dist.ProcessGroup,
    out_splits: list[int],
    in_splits: list[int],
    counter: CommCounter | None = None,
) -> torch.Tensor:
    """Send rows `in_splits[r]` of `x` (in rank order) to rank r; receive `out_splits[r]` from r.

    Differentiable; `counter`, if given, records the bytes sent off-rank in both directions.
    """
    return _AllToAllV.apply(x_ND, group, out_splits, in_splits, counter)


def exchange_counts(send_P: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Each rank sends `send_P[r]` to rank r: returns what every rank sends to this one."""
    recv_P = torch.empty_like(send_P)
    dist.all_to_all_single(recv_P, send_P.contiguous(), group=group)
    return recv_P


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        # Every rank's loss depends on the sum, so each input's gradient is the sum of all
        # ranks' upstream gradients.
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_sum(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Differentiable sum over `group`, backward also a sum over `group`."""
    return _AllReduceSum.apply(x, group)
