"""σ-MoE with experts sharded over expert-parallel ranks and cut along their width over
tensor-parallel ranks, with the regulariser's statistics taken over the global batch.

Legend: B batch, T tokens, X = B*T tokens on this rank, D model width, E experts, El = E / EP
local experts, G expert width (G / TP on this rank), K selected experts, S = X*K routed slots,
N slots received from the expert-parallel group, P expert-parallel size.

Forward, on every rank for its own tokens (phases of `SigmaMoE`):
1. route: the model's `SigmaMoE.route` on the token's home rank, with global token rows and
   global expert ids, so expert dropout draws what the single-process run draws.
2. dispatch: slots sorted by expert id (hence by owning rank) and exchanged with an uneven
   all-to-all over the EP group: dropless, one row per (token, selected expert).
3. local experts: `cvmm` over the received rows with this rank's expert shard, one sort shared
   by both matmuls.
4. combine: the reverse all-to-all, un-sort, gate and sum over the K slots on the home rank.
5. regulariser: the model's `SigmaMoE.regulariser`, whose (softmax sum, count) pair is summed
   over the data-parallel group, so p̄ is the mean over the whole global batch.

Gradients: the all-to-alls' backward is the reverse exchange (`all_to_all_v`). Steps 2-4 are a
tensor-parallel region when TP > 1 (each rank holds G/T of every expert): the tokens and the
gates enter through megatron's `copy_to_tensor_model_parallel_region` (backward: all-reduce of
their partial gradients) and the output leaves through `reduce_from_tensor_model_parallel_region`
(forward: all-reduce of the partial sums). Routing and the regulariser run replicated on the TP
ranks, outside the region. The statistics' all-reduce also sums in backward (every replica's
loss uses the global mean). Expert gradients are then reduced over the expert-data-parallel
group only, by the engine (`param.allreduce = False`, `param.group_name`, read by DeepSpeed).
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)
from torch import nn

from switchall.kernels import cvmm, cvmm_prepare
from switchall.models.routing import NoiseContext
from switchall.models.sigma_moe import SigmaMoE
from switchall.parallel.collectives import (
    CommCounter,
    all_reduce_sum,
    all_to_all_v,
    exchange_counts,
)
from switchall.parallel.layout import ParallelLayout
from switchall.parallel.sharded_state import mark_shard


class GlobalBatchStats:
    """The σ-MoE regulariser's `StatsReducer`: its statistics (every layer's softmax sums and
    row counts in one vector) summed over the data-parallel group."""

    def __init__(self, group):
        self.group = group

    def __call__(self, stats: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(stats, self.group)


class ParallelSigmaMoE(SigmaMoE):
    """A `SigmaMoE` holding experts [expert_offset, expert_offset + El), width slice G / TP.

    Made in place from a single-device `SigmaMoE` by `parallelize_sigma_moe` (its class is
    swapped, as FSDP2's `fully_shard` does), so parameter names and the routing / regulariser
    code are the model's own; only the forward's expert phase differs.
    """

    layout: ParallelLayout
    num_local_experts: int
    expert_offset: int
    comm: CommCounter

    def forward(
        self, x_BTD: torch.Tensor, noise: NoiseContext | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, d = x_BTD.shape
        x_XD = x_BTD.reshape(b * t, d)
        gates_XK, idx_XK, logits_XE = self.route(x_XD, noise, rows_per_batch_row=t)
        tp = self.layout.tp_group
        x_in_XD = copy_to_tensor_model_parallel_region(x_XD, group=tp)
        gates_in_XK = copy_to_tensor_model_parallel_region(gates_XK, group=tp)
        if self.layout.ep_size == 1:
            y_XD = self.experts(x_in_XD, cvmm_prepare(idx_XK, self.num_experts), gates_in_XK)
        else:
            y_XD = self.dispatched_experts(x_in_XD, idx_XK, gates_in_XK)
        y_XD = reduce_from_tensor_model_parallel_region(y_XD.contiguous(), group=tp)
        return y_XD.view(b, t, d), self.regulariser_output(logits_XE)

    def dispatched_experts(
        self, x_XD: torch.Tensor, idx_XK: torch.Tensor, gates_XK: torch.Tensor
    ) -> torch.Tensor:
        """Σ_k gate_k · expert_k(x), with the experts living on the EP group's ranks."""
        group, per_rank = self.layout.ep_group, self.num_local_experts
        x_count, k = idx_XK.shape
        # Sorting the slots by expert id groups them by owning rank (ids are contiguous per
        # rank) and, within a rank, by expert: the order cvmm wants on the receiving side.
        flat_S = idx_XK.reshape(-1)
        order_S = torch.argsort(flat_S, stable=True)
        expert_S = flat_S[order_S]
        send_P = torch.bincount(expert_S // per_rank, minlength=self.layout.ep_size)
        recv_P = exchange_counts(send_P, group)
        # Dropless splits depend on the routing: one host sync per layer to size the buffers.
        send, recv = send_P.tolist(), recv_P.tolist()
        x_SD = x_XD[order_S // k]
        if torch.is_autocast_enabled(x_SD.device.type):
            # The experts compute in the autocast dtype anyway: send half the bytes.
            x_SD = x_SD.to(torch.get_autocast_dtype(x_SD.device.type))
        x_ND = all_to_all_v(x_SD, group, recv, send, self.comm)
        with torch.no_grad():
            local_N = all_to_all_v(expert_S % per_rank, group, recv, send)
        sel = cvmm_prepare(local_N[:, None], per_rank)
        h_NG = torch.relu(cvmm(x_ND, sel, self.w1)).flatten(1)
        y_ND = cvmm(h_NG, sel, self.w2).flatten(1)
        y_SD = all_to_all_v(y_ND, group, send, recv, self.comm)
        # Un-sort: slot order_S[i] received row i.
        inverse_S = torch.empty_like(order_S)
        inverse_S[order_S] = torch.arange(order_S.numel(), device=order_S.device)
        y_XKD = y_SD[inverse_S].view(x_count, k, -1)
        y_XD = (y_XKD.float() * gates_XK[..., None].float()).sum(1)
        return y_XD.to(y_ND.dtype)


def shard_sigma_moe_width(moe: SigmaMoE, layout: ParallelLayout) -> None:
    """Tensor-parallel step: keep this rank's slice G / TP of every expert's width."""
    width = moe.w1.shape[-1] // layout.tp_size
    g0 = layout.tp_rank * width
    w1 = nn.Parameter(
        moe.w1.detach()[:, :, g0 : g0 + width].clone(memory_format=torch.contiguous_format)
    )
    w2 = nn.Parameter(
        moe.w2.detach()[:, g0 : g0 + width, :].clone(memory_format=torch.contiguous_format)
    )
    set_tensor_model_parallel_attributes(w1, True, 2, 1)
    set_tensor_model_parallel_attributes(w2, True, 1, 1)
    mark_shard(w1, 2, g0, moe.w1.shape[2])
    mark_shard(w2, 1, g0, moe.w2.shape[1])
    moe.w1, moe.w2 = w1, w2


def parallelize_sigma_moe(moe: SigmaMoE, layout: ParallelLayout) -> ParallelSigmaMoE:
    """Expert-parallel step: keep this rank's experts and make `moe` a `ParallelSigmaMoE`."""
    per_rank = moe.num_experts // layout.ep_size
    e0 = layout.ep_rank * per_rank
    if layout.ep_size > 1:
        for name in ("w1", "w2"):
            full = getattr(moe, name)
            local = nn.Parameter(full.detach()[e0 : e0 + per_rank].clone())
            local.__dict__.update(full.__dict__)  # the tensor-parallel step's marks, if any
            mark_shard(local, 0, e0, moe.num_experts)
            # DeepSpeed's marks of an expert parameter: reduce it over its expert-data-parallel
            # group (found by this name), not over the data-parallel group.
            local.allreduce = False
            local.group_name = layout.expert_group_name
            setattr(moe, name, local)
    moe.__class__ = ParallelSigmaMoE
    moe.layout, moe.num_local_experts, moe.expert_offset = layout, per_rank, e0
    moe.comm = CommCounter()
    return moe
