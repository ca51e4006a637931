"""σ-MoE MLP (spec §4): sigmoid top-K experts, expert dropout, entropy regulariser.

Legend: B batch, T tokens, X = B*T routed tokens, D model width, E experts, G expert width,
K selected experts.

The forward runs in named phases (route -> expert compute -> regulariser) so that the
expert-parallel version in `switchall.parallel` can reuse routing and the regulariser and swap
only the expert compute for dispatch / local experts / combine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from switchall.kernels import CVMMSelection, cvmm, cvmm_prepare
from switchall.models.config import ModelConfig
from switchall.models.init import dense_std, normal_, renorm_rows_keep_std_
from switchall.models.routing import (
    NoiseContext,
    expert_dropout_mask,
    routing_logits,
    sigmoid_topk,
)

_SALT = 3

# Per layer [sum over rows of softmax(logits) (E values), number of rows], several layers side
# by side in one vector -> the same vector summed over whatever set of rows the regulariser's
# mean should cover. Absent in one process; an all-reduce over the data-parallel group when the
# mean must span the global batch.
StatsReducer = Callable[[torch.Tensor], torch.Tensor]


def entropy_from_stats(prob_sum_E: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Σ_e p̄_e log p̄_e with p̄ = prob_sum / count, i.e. minus the entropy of the mean."""
    pbar_E = prob_sum_E / count
    return (pbar_E * torch.log(pbar_E.clamp_min(torch.finfo(pbar_E.dtype).tiny))).sum()


@dataclass
class RegulariserStats:
    """A layer's regulariser before its statistics are summed over the rows it must cover.

    Returned by `SigmaMoE.forward` when `defer_regulariser` is set: the language model then
    sums every layer's statistics in one reduction (one all-reduce per forward and one per
    backward under data parallelism, instead of one per layer each way, each of which makes
    the ranks wait for each other) and calls `value`.
    """

    prob_sum_E: torch.Tensor
    count: torch.Tensor
    weight: float

    def value(self, prob_sum_E: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        return self.weight * entropy_from_stats(prob_sum_E, count)


def reduce_regularisers(
    stats: list[RegulariserStats], reducer: StatsReducer | None
) -> list[torch.Tensor]:
    """Each layer's regulariser, its statistics reduced by one `reducer` call for all layers
    (the layers' [E + 1] vectors side by side; a sum is elementwise, so each layer gets what
    its own reduction would give)."""
    if reducer is None:
        return [s.value(s.prob_sum_E, s.count) for s in stats]
    parts = [t for s in stats for t in (s.prob_sum_E, s.count.to(s.prob_sum_E.dtype)[None])]
    summed = reducer(torch.cat(parts))
    out, start = [], 0
    for s in stats:
        n = s.prob_sum_E.numel()
        out.append(s.value(summed[start : start + n], summed[start + n]))
        start += n + 1
    return out


class SigmaMoE(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        m = cfg.moe
        self.cfg, self.layer_idx = cfg, layer_idx
        self.num_experts, self.k = m.n_experts, m.k
        d, g = cfg.d_model, m.expert_size
        self.sel = nn.Parameter(torch.empty(m.n_experts, d))
        self.w1 = nn.Parameter(torch.empty(m.n_experts, d, g))
        self.w2 = nn.Parameter(torch.empty(m.n_experts, g, d))
        self.stats_reducer: StatsReducer | None = None
        self.defer_regulariser = False
        """Return `RegulariserStats` for the language model to reduce with all other layers'."""
        # Routing statistics (switchall.pretrain.run_metrics, switchall.analysis.analyze):
        # called with the selected expert ids [X, K] and the expert count, in training and in
        # evaluation (the recorder decides); None (the default) records nothing.
        self.load_recorder: Callable[[str, torch.Tensor, int], None] | None = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        s, d, m = self.cfg.resolved_init_scale, self.cfg.d_model, self.cfg.moe
        renorm_rows_keep_std_(normal_(self.sel, dense_std(s, d)))
        normal_(self.w1, dense_std(s, d))
        normal_(self.w2, dense_std(s, m.n_experts * m.expert_size))

    def route(
        self, x_XD: torch.Tensor, noise: NoiseContext | None, rows_per_batch_row: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (gates [X, K], expert ids [X, K], raw fp32 logits [X, E])."""
        logits_XE = routing_logits(x_XD, self.sel)
        drop_XE = None
        p = self.cfg.moe.expert_dropout
        if self.training and p > 0:
            drop_XE = expert_dropout_mask(
                p,
                tuple(logits_XE.shape),
                x_XD.device,
                noise,
                salt=self.layer_idx * 4 + _SALT,
                rows_per_batch_row=rows_per_batch_row,
            )
        gates_XK, idx_XK = sigmoid_topk(logits_XE, self.k, drop_XE)
        if self.load_recorder is not None:
            self.load_recorder("mlp", idx_XK, self.num_experts)
        return gates_XK, idx_XK, logits_XE

    def experts(
        self, x_XD: torch.Tensor, sel: CVMMSelection, gates_XK: torch.Tensor
    ) -> torch.Tensor:
        """Σ_k gate_k · ReLU(x W1_k) W2_k; one sort of the assignments serves both matmuls."""
        x_count = x_XD.shape[0]
        h_XKG = torch.relu(cvmm(x_XD, sel, self.w1))
        return cvmm(h_XKG, sel.reshape(x_count, self.k, 1), self.w2, gates_XK[..., None])

    def regulariser_stats(self, logits_XE: torch.Tensor) -> RegulariserStats:
        prob_sum_E = torch.softmax(logits_XE, dim=-1).sum(0)
        count = torch.tensor(float(logits_XE.shape[0]), device=logits_XE.device)
        return RegulariserStats(prob_sum_E, count, self.cfg.moe.entropy_reg)

    def regulariser(self, logits_XE: torch.Tensor) -> torch.Tensor:
        s = self.regulariser_stats(logits_XE)
        (reg,) = reduce_regularisers([s], self.stats_reducer)
        return reg

    def regulariser_output(self, logits_XE: torch.Tensor) -> torch.Tensor | RegulariserStats:
        """What forward returns next to its output: the regulariser, its deferred statistics
        (`defer_regulariser`), or zero outside training."""
        if not self.training:
            return logits_XE.new_zeros(())
        if self.defer_regulariser:
            return self.regulariser_stats(logits_XE)
        return self.regulariser(logits_XE)

    def forward(
        self, x_BTD: torch.Tensor, noise: NoiseContext | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | RegulariserStats]:
        b, t, d = x_BTD.shape
        x_XD = x_BTD.reshape(b * t, d)
        gates_XK, idx_XK, logits_XE = self.route(x_XD, noise, rows_per_batch_row=t)
        y_XD = self.experts(x_XD, cvmm_prepare(idx_XK, self.num_experts), gates_XK)
        return y_XD.view(b, t, d), self.regulariser_output(logits_XE)
