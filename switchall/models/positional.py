"""Positional machinery: sinusoids and the XL relative-position bias, and RoPE (spec §3).

Legend: B batch, H heads, T queries (current chunk), M memory tokens, L = M + T keys,
Dh head width, D model width.
"""

from __future__ import annotations

import torch


def sinusoid_LD(num_pos: int, d_model: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Sinusoidal embeddings of distances 0..num_pos-1: sin on even channels, cos on odd.

    Angles are computed in float64 (positions times frequencies lose digits in fp32 at long
    distances), then cast to `dtype`.
    """
    pos_L = torch.arange(num_pos, device=device, dtype=torch.float64)
    inv_freq = 10000.0 ** (
        -torch.arange(0, d_model, 2, device=device, dtype=torch.float64) / d_model
    )
    angle_LF = pos_L[:, None] * inv_freq[None, :]
    emb_LD = torch.empty(num_pos, d_model, device=device, dtype=torch.float64)
    emb_LD[:, 0::2] = torch.sin(angle_LF)
    emb_LD[:, 1::2] = torch.cos(angle_LF)
    return emb_LD.to(dtype)


def causal_keep_TL(num_q: int, mem_len: int, device=None) -> torch.Tensor:
    """True where query i (absolute position mem_len + i) may attend key j: j <= mem_len + i.

    Memory is fully visible; the current chunk is causal (spec §3.1).
    """
    i_T = torch.arange(num_q, device=device)[:, None]
    j_L = torch.arange(num_q + mem_len, device=device)[None, :]
    return j_L <= i_T + mem_len


def xl_position_bias(pos_scores_BHTL: torch.Tensor, mem_len: int) -> torch.Tensor:
    """Turn scores against distance embeddings into a [B, H, T, L] additive attention bias.

    `pos_scores[..., i, r]` is query i's score for relative distance r. Key j sits at distance
    mem_len + i - j; future keys (negative distance) get -inf, which also applies the mask.
    """
    *lead, num_q, num_k = pos_scores_BHTL.shape
    if num_k == mem_len + num_q and num_q > 1:
        # The keys are the memory and the chunk, so row i reads distances mem_len + i down to
        # 0 and then the future. Reversed, row i is the scores shifted right by
        # num_q - 1 - i: Transformer-XL's relative shift, a pad and two views, where a gather
        # (and its scatter-add backward) cost 2-3x as much. Same values, bit for bit.
        rev = pos_scores_BHTL.flip(-1)
        width = num_k + num_q - 1
        padded = torch.nn.functional.pad(rev, (0, num_q - 1), value=float("-inf"))
        flat = padded.reshape(*lead, num_q * width)
        skewed = flat[..., num_q - 1 : num_q - 1 + num_q * (width - 1)]
        return skewed.reshape(*lead, num_q, width - 1)[..., :num_k]
    i_T = torch.arange(num_q, device=pos_scores_BHTL.device)[:, None]
    j_L = torch.arange(num_k, device=pos_scores_BHTL.device)[None, :]
    dist_TL = i_T + mem_len - j_L
    bias = pos_scores_BHTL.gather(-1, dist_TL.clamp(min=0).expand_as(pos_scores_BHTL))
    return bias.masked_fill(dist_TL < 0, float("-inf"))


class Rotary:
    """NeoX-style RoPE on the first `n_rot` channels of each head (rotate-half within them)."""

    def __init__(self, d_head: int, fraction: float, base: float):
        self.n_rot = int(d_head * fraction)
        self.base = base

    def __call__(self, x_BHSD: torch.Tensor, offset: int) -> torch.Tensor:
        if self.n_rot == 0:
            return x_BHSD
        seq = x_BHSD.shape[-2]
        half = self.n_rot // 2
        inv_freq = self.base ** (
            -torch.arange(0, half, device=x_BHSD.device, dtype=torch.float32) / half
        )
        pos_S = torch.arange(offset, offset + seq, device=x_BHSD.device, dtype=torch.float32)
        angle_SF = pos_S[:, None] * inv_freq[None, :]
        cos_SF, sin_SF = torch.cos(angle_SF).to(x_BHSD.dtype), torch.sin(angle_SF).to(x_BHSD.dtype)
        rot, keep = x_BHSD[..., : self.n_rot], x_BHSD[..., self.n_rot :]
        x1, x2 = rot[..., :half], rot[..., half:]
        rotated = torch.cat([x1 * cos_SF - x2 * sin_SF, x2 * cos_SF + x1 * sin_SF], dim=-1)
        return torch.cat([rotated, keep], dim=-1)
