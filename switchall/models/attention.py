"""Dense multi-head attention, the baselines' attention (spec §2.1, §2.3, §3).

Legend: B batch, T queries (current chunk), M memory tokens, L = M + T keys, H heads,
Dh head width, D model width.

The XL baseline keeps Transformer-XL's content and position bias vectors (u, v) and a learnable
softmax scale initialised to 1/sqrt(Dh), as the paper's baselines did; SwitchHead has neither.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from switchall.models.config import ModelConfig
from switchall.models.init import dense_std, trunc_normal_
from switchall.models.positional import Rotary, causal_keep_TL, sinusoid_LD, xl_position_bias
from switchall.models.routing import NoiseContext


def attend(
    q_BHTD: torch.Tensor,
    k_BHLD: torch.Tensor,
    v_BHLD: torch.Tensor,
    mem_len: int,
    bias_BHTL: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Softmax attention, causal over the current chunk and fully visible over memory.

    Goes through `scaled_dot_product_attention` so fused kernels are used where the mask allows;
    `bias_BHTL`, when given, already carries -inf at masked positions.
    """
    if bias_BHTL is not None:
        return F.scaled_dot_product_attention(
            q_BHTD, k_BHLD, v_BHLD, attn_mask=bias_BHTL.to(q_BHTD.dtype), scale=scale
        )
    if mem_len == 0:
        return F.scaled_dot_product_attention(q_BHTD, k_BHLD, v_BHLD, is_causal=True, scale=scale)
    keep_TL = causal_keep_TL(q_BHTD.shape[-2], mem_len, device=q_BHTD.device)
    return F.scaled_dot_product_attention(q_BHTD, k_BHLD, v_BHLD, attn_mask=keep_TL, scale=scale)


def heads_first(x_BSF: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, S, H*Dh] -> [B, H, S, Dh]."""
    b, s, _ = x_BSF.shape
    return x_BSF.view(b, s, num_heads, -1).transpose(1, 2)


class DenseAttention(nn.Module):
    """Multi-head attention with XL relative positions or RoPE (the `transformer` baseline)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        a = cfg.attention
        self.cfg = cfg
        self.num_heads, self.d_head = a.n_heads, a.d_head
        d, hd = cfg.d_model, a.n_heads * a.d_head
        self.q = nn.Linear(d, hd, bias=False)
        self.k = nn.Linear(d, hd, bias=False)
        self.v = nn.Linear(d, hd, bias=False)
        self.o = nn.Linear(hd, d, bias=False)
        self.xl = cfg.pos_encoding == "xl"
        if self.xl:
            self.pos = nn.Linear(d, hd, bias=False)
            self.u_HD = nn.Parameter(torch.zeros(a.n_heads, a.d_head))
            self.v_HD = nn.Parameter(torch.zeros(a.n_heads, a.d_head))
            self.scale = nn.Parameter(torch.full((1,), 1.0 / math.sqrt(a.d_head)))
        else:
            self.rotary = Rotary(a.d_head, a.rope_fraction, a.rope_base)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        s = self.cfg.resolved_init_scale
        for lin in (self.q, self.k, self.v, self.o) + ((self.pos,) if self.xl else ()):
            trunc_normal_(lin.weight, dense_std(s, lin.in_features))
        if self.xl:
            self.u_HD.zero_()
            self.v_HD.zero_()
            self.scale.fill_(1.0 / math.sqrt(self.d_head))

    def forward(
        self,
        q_src_BTD: torch.Tensor,
        kv_src_BLD: torch.Tensor,
        mem_len: int,
        noise: NoiseContext | None = None,
    ) -> torch.Tensor:
        h = self.num_heads
        q_BHTD = heads_first(self.q(q_src_BTD), h)
        k_BHLD = heads_first(self.k(kv_src_BLD), h)
        v_BHLD = heads_first(self.v(kv_src_BLD), h)
        if self.xl:
            num_k = kv_src_BLD.shape[1]
            pe_LD = sinusoid_LD(
                num_k,
                q_src_BTD.shape[-1],
                q_src_BTD.device,
                torch.promote_types(q_src_BTD.dtype, torch.float32),
            )
            kpos_HLD = self.pos(pe_LD.to(q_src_BTD.dtype)).view(num_k, h, -1).transpose(0, 1)
            pos_BHTL = (q_BHTD + self.v_HD[:, None].to(q_BHTD.dtype)) @ kpos_HLD.transpose(-1, -2)
            scale = self.scale.to(q_BHTD.dtype)
            # Scale before masking: a learned scale may turn negative, and -inf must stay -inf.
            bias_BHTL = xl_position_bias(pos_BHTL * scale, mem_len)
            q_c = (q_BHTD + self.u_HD[:, None].to(q_BHTD.dtype)) * scale
            out_BHTD = attend(q_c, k_BHLD, v_BHLD, mem_len, bias_BHTL, scale=1.0)
        else:
            q_BHTD = self.rotary(q_BHTD, offset=mem_len)
            k_BHLD = self.rotary(k_BHLD, offset=0)
            out_BHTD = attend(q_BHTD, k_BHLD, v_BHLD, mem_len)
        b, _, t, _ = out_BHTD.shape
        return self.o(out_BHTD.transpose(1, 2).reshape(b, t, -1))
