"""SwitchHead attention: mixture-of-experts value and output projections (spec §1.3-1.4, §2.2).

Legend: B batch, T queries (current chunk), M memory tokens, L = M + T keys (the source side),
H heads, E experts per head, K experts selected per head, Dh head width, D model width.

Each head owns E experts; expert (h, e) is row h*E + e of the expert banks and routing matrices,
so slicing whole heads out (tensor parallelism) slices contiguous rows. Source-side routing
(from the keys' inputs) mixes V (and K, in the ablation); destination-side routing (from the
queries' inputs) mixes O (and Q). Gates are raw sigmoids, not renormalised. Because V is mixed
before attention and O after it, each head computes one attention matrix whatever E and K are.
With E = 1 the layer is dense attention with a learned sigmoid output gate per head.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from switchall.kernels import CVMMSelection, cvmm, cvmm_prepare
from switchall.models.attention import attend, heads_first
from switchall.models.config import ModelConfig
from switchall.models.init import (
    dense_std,
    normal_,
    renorm_rows_by_row_std_,
    renorm_rows_keep_std_,
)
from switchall.models.positional import Rotary, sinusoid_LD, xl_position_bias
from switchall.models.routing import (
    NoiseContext,
    expert_dropout_mask,
    routing_logits,
    sigmoid_topk,
)

_SRC, _DST = 1, 2  # routing sides, also salts of their expert-dropout draws


class Route:
    """One side's routing decision: gates and global expert ids [B*S, H, K], sorted once."""

    def __init__(self, gates_XHK: torch.Tensor, expert_XHK: torch.Tensor, num_experts: int):
        self.gates_XHK = gates_XHK
        self.sel: CVMMSelection = cvmm_prepare(expert_XHK, num_experts)


class SwitchHeadAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        a = cfg.attention
        self.cfg, self.layer_idx = cfg, layer_idx
        self.num_heads, self.num_experts, self.top_k, self.d_head = (
            a.n_heads,
            a.n_experts,
            a.k,
            a.d_head,
        )
        # Global naming of heads, for expert-dropout draws that do not depend on the layout:
        # a tensor-parallel rank holding heads [head_offset, head_offset + num_heads) sets these.
        self.head_offset, self.total_heads = 0, a.n_heads
        self.gated_dense = a.n_experts == 1
        self.moe = frozenset() if self.gated_dense else frozenset(a.moe_projections)
        d, h, e, dh = cfg.d_model, a.n_heads, a.n_experts, a.d_head
        for name in "qkv":
            if name in self.moe:
                self.register_parameter(f"{name}_experts", nn.Parameter(torch.empty(h * e, d, dh)))
            else:
                self.add_module(name, nn.Linear(d, h * dh, bias=False))
        if "o" in self.moe:
            self.o_experts = nn.Parameter(torch.empty(h * e, dh, d))
        else:
            self.o = nn.Linear(h * dh, d, bias=False)
        self.routes_src = bool(self.moe & {"v", "k"})
        self.routes_dst = bool(self.moe & {"q", "o"}) or self.gated_dense
        if self.routes_src:
            self.sel_src = nn.Parameter(torch.empty(h * e, d))
        if self.routes_dst:
            self.sel_dst = nn.Parameter(torch.empty(h * e, d))
        self.xl = cfg.pos_encoding == "xl"
        if self.xl:
            self.pos = nn.Linear(d, h * dh, bias=False)
        else:
            self.rotary = Rotary(dh, a.rope_fraction, a.rope_base)
        # q and k each carry Dh^-1/4 so that q.k carries the full 1/sqrt(Dh).
        self.qk_scale = dh**-0.25
        # Routing statistics (switchall.pretrain.run_metrics, switchall.analysis.analyze):
        # called per routing side ("v" source, "o" destination) with global expert ids
        # head * E + e [rows = (token, head), K] and their count (all heads of the layer), in
        # training and in evaluation (the recorder decides); None records nothing.
        self.load_recorder: Callable[[str, torch.Tensor, int], None] | None = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        s, d = self.cfg.resolved_init_scale, self.cfg.d_model
        std_in = dense_std(s, d)
        for name in "qkv":
            w = getattr(self, f"{name}_experts") if name in self.moe else getattr(self, name).weight
            normal_(w, std_in)
        # O's fan-in counts all heads (H*Dh) even though each expert is Dh x D (spec §2.2).
        o = self.o_experts if "o" in self.moe else self.o.weight
        normal_(o, dense_std(s, self.total_heads * self.d_head))
        if self.xl:
            normal_(self.pos.weight, std_in)
        renorm = (
            renorm_rows_by_row_std_ if self.cfg.routing_init == "row_std" else renorm_rows_keep_std_
        )
        for name in ("sel_src", "sel_dst"):
            if hasattr(self, name):
                renorm(normal_(getattr(self, name), std_in))

    def _route(self, x_BSD: torch.Tensor, w_FD: torch.Tensor, side: int, noise) -> Route:
        b, s, _ = x_BSD.shape
        h, e = self.num_heads, self.num_experts
        logits_XE = routing_logits(x_BSD, w_FD).view(b * s * h, e)
        drop_XE = None
        p = self.cfg.attention.expert_dropout
        if self.training and p > 0:
            drop_XE = expert_dropout_mask(
                p,
                (b * s, h * e),
                x_BSD.device,
                noise,
                salt=self.layer_idx * 4 + side,
                rows_per_batch_row=s,
                expert_offset=self.head_offset * e,
                total_experts=self.total_heads * e,
            ).view(b * s * h, e)
        gates_XK, idx_XK = sigmoid_topk(logits_XE, self.top_k, drop_XE)
        head_X1 = torch.arange(h, device=x_BSD.device).repeat(b * s)[:, None]
        expert_XK = idx_XK + head_X1 * e
        if self.load_recorder is not None:
            self.load_recorder(
                "v" if side == _SRC else "o",
                expert_XK + self.head_offset * e,
                self.total_heads * e,
            )
        return Route(
            gates_XK.view(b * s, h, self.top_k), expert_XK.view(b * s, h, self.top_k), h * e
        )

    def _project(self, x_BSD: torch.Tensor, name: str, route: Route | None) -> torch.Tensor:
        """Q, K or V for all heads as [B, H, S, Dh]; an expert mixture if `name` is MoE."""
        if name not in self.moe:
            return heads_first(getattr(self, name)(x_BSD), self.num_heads)
        b, s, d = x_BSD.shape
        # Each token row feeds all heads' selections; the gated sum over each head's k experts
        # is fused, so neither per-head copies of x nor per-expert outputs are kept for backward.
        y_XHD = cvmm(
            x_BSD.reshape(b * s, d), route.sel, getattr(self, f"{name}_experts"), route.gates_XHK
        )
        return y_XHD.view(b, s, self.num_heads, self.d_head).transpose(1, 2)

    def forward(
        self,
        q_src_BTD: torch.Tensor,
        kv_src_BLD: torch.Tensor,
        mem_len: int,
        noise: NoiseContext | None = None,
    ) -> torch.Tensor:
        b, t, d = q_src_BTD.shape
        h = self.num_heads
        src = self._route(kv_src_BLD, self.sel_src, _SRC, noise) if self.routes_src else None
        dst = None
        if self.routes_dst and not self.gated_dense:
            dst = self._route(q_src_BTD, self.sel_dst, _DST, noise)
        q_BHTD = self._project(q_src_BTD, "q", dst) * self.qk_scale
        k_BHLD = self._project(kv_src_BLD, "k", src) * self.qk_scale
        v_BHLD = self._project(kv_src_BLD, "v", src)
        if self.xl:
            num_k = kv_src_BLD.shape[1]
            pe_LD = (
                sinusoid_LD(
                    num_k, d, q_src_BTD.device, torch.promote_types(q_src_BTD.dtype, torch.float32)
                )
                * self.qk_scale
            )
            kpos_HLD = self.pos(pe_LD.to(q_src_BTD.dtype)).view(num_k, h, -1).transpose(0, 1)
            bias_BHTL = xl_position_bias(q_BHTD @ kpos_HLD.transpose(-1, -2), mem_len)
            out_BHTD = attend(q_BHTD, k_BHLD, v_BHLD, mem_len, bias_BHTL, scale=1.0)
        else:
            q_BHTD = self.rotary(q_BHTD, offset=mem_len)
            k_BHLD = self.rotary(k_BHLD, offset=0)
            out_BHTD = attend(q_BHTD, k_BHLD, v_BHLD, mem_len, scale=1.0)
        out_BTHD = out_BHTD.transpose(1, 2)
        if self.gated_dense:
            gate_BTH = torch.sigmoid(routing_logits(q_src_BTD, self.sel_dst))
            out_BTHD = out_BTHD * gate_BTH[..., None].to(out_BTHD.dtype)
        if "o" not in self.moe:
            return self.o(out_BTHD.reshape(b, t, h * self.d_head))
        # One gated reduction sums over heads and their selected experts together.
        y_XD = cvmm(out_BTHD.reshape(b * t, h, self.d_head), dst.sel, self.o_experts, dst.gates_XHK)
        return y_XD.view(b, t, d)
