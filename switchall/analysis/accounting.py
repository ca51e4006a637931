"""Compute and memory accounting of a `ModelConfig`, without building the model.

Notation: T = seq_len (the chunk), C = 1 + mem_chunks (chunks in the attention context),
L = C·T keys, H heads, dh head width, d = d_model, E experts per head, k experts selected per
head, n_exp = number of mixture-of-experts projections among v, k, q, o.

Three conventions, each from its own source:

- `attn_macs_eq`, `attn_mem_eq`: the paper's appendix equations (spec §7, paper A.2),
  per attention layer and per sequence. Eq 11 (MACs) and Eq 12 (floats) for dense attention;
  Eq 13 for SwitchHead, generalised to any set of MoE projections.
- `attn_macs`, `attn_mem`: what the paper's tables were computed with (`paper/common.py` in
  the official training repository, spec §7). These differ from the equations for SwitchHead:
  no factor C on the positional projection, and a routing term.
- `forward_macs_breakdown`, `train_flops_per_token`: what `switchall.models` computes per token,
  over all layers, counting active experts only.

All results are floats: the big configs exceed 2**31 and the formulas mix in ratios.
"""

from __future__ import annotations

from collections.abc import Callable

from switchall.models.config import ModelConfig


def context_chunks(cfg: ModelConfig) -> int:
    """C: the current chunk plus the XL memory chunks each layer attends to."""
    return 1 + cfg.mem_chunks


def moe_projections(cfg: ModelConfig) -> frozenset[str]:
    """The projections computed as expert mixtures, as `SwitchHeadAttention` builds them.

    Dense attention has none, and so has SwitchHead with one expert per head (the gated dense
    special case, spec §1.4).
    """
    a = cfg.attention
    if not cfg.uses_switchhead or a.n_experts == 1:
        return frozenset()
    return frozenset(a.moe_projections)


def routing_sides(cfg: ModelConfig) -> tuple[bool, bool]:
    """(source side routed, destination side routed): V/K mix on keys' inputs, Q/O on queries'.

    SwitchHead with one expert per head still has a destination-side sigmoid gate.
    """
    moe = moe_projections(cfg)
    gated_dense = cfg.uses_switchhead and cfg.attention.n_experts == 1
    return bool(moe & {"v", "k"}), bool(moe & {"q", "o"}) or gated_dense


def attn_macs_eq(cfg: ModelConfig) -> float:
    """Attention MACs per layer and sequence by the paper's equations (spec §7).

    Eq 11 (dense): H·(4·T·dh·d + 2·C·T²·dh + 2·C·T·dh·d).
    Eq 13 (SwitchHead, V and O MoE) generalised to n_exp MoE projections:
    H·((4 − n_exp)·T·dh·d + n_exp·k·T·dh·(d + 1) + 2·C·T²·dh + 2·C·T·dh·d);
    with n_exp = 2 this is Eq 13 exactly, with n_exp = 0 it is Eq 11.
    The last term, 2·C·T·dh·d, is the XL positional projection; RoPE models have none, so it
    is dropped for them (as `paper/common.py` does for its RoPE baseline).
    """
    a = cfg.attention
    t, c, dh, d, k = cfg.seq_len, context_chunks(cfg), a.d_head, cfg.d_model, a.k
    n_exp = len(moe_projections(cfg))
    per_head = (4 - n_exp) * t * dh * d + n_exp * k * t * dh * (d + 1) + 2 * c * t * t * dh
    if cfg.pos_encoding == "xl":
        per_head += 2 * c * t * dh * d
    return float(a.n_heads * per_head)


def attn_mem_eq(cfg: ModelConfig) -> float:
    """Attention memory (floats) per layer and sequence by Eq 12 (spec §7).

    H·(4·T·dh + 2·C·T² + 2·C·T·dh), attention matrices counted before and after the softmax.
    The paper uses it unchanged for SwitchHead (memory assumed independent of k). RoPE models
    drop the positional term 2·C·T·dh.
    """
    a = cfg.attention
    t, c, dh = cfg.seq_len, context_chunks(cfg), a.d_head
    per_head = 4 * t * dh + 2 * c * t * t
    if cfg.pos_encoding == "xl":
        per_head += 2 * c * t * dh
    return float(a.n_heads * per_head)


def attn_macs(cfg: ModelConfig) -> float:
    """Attention MACs per layer and sequence as the paper's tables computed them.

    Source: `paper/common.py::get_attention_flops` (spec §7). Dense XL is Eq 11 and dense RoPE
    H·dh·T²·C·2 + 4·d·H·dh·T. SwitchHead is
    H·dh·T²·C·2 + (n_exp·k + 4 − n_exp)·d·H·dh·T + n_exp·H·k·T·dh + n_sel·E·d·T·C
    + [XL] 2·H·d·T·dh, with n_sel the number of routed sides and E the experts *per head*
    (that code's routing term leaves out the factor H, and its positional term the factor C).
    One expert per head (not in the paper) counts as no MoE projection and one routed side.
    """
    a = cfg.attention
    t, c, dh, d, h = cfg.seq_len, context_chunks(cfg), a.d_head, cfg.d_model, a.n_heads
    xl = cfg.pos_encoding == "xl"
    attention = h * dh * t * t * c * 2
    if not cfg.uses_switchhead:
        return float(attention + 4 * d * h * dh * t + (2 * h * d * t * dh * c if xl else 0))
    n_exp = len(moe_projections(cfg))
    n_sel = sum(routing_sides(cfg))
    projections = (n_exp * a.k + 4 - n_exp) * d * h * dh * t
    gating = n_exp * h * a.k * t * dh
    routing = n_sel * a.n_experts * d * t * c
    positional = 2 * h * d * t * dh if xl else 0
    return float(attention + projections + gating + routing + positional)


def attn_mem(cfg: ModelConfig) -> float:
    """Attention memory (floats) per layer and sequence as the paper's tables computed it.

    Source: `paper/common.py::get_attention_mem` (spec §7). Dense XL is Eq 12, dense RoPE
    H·T²·C·2 + 4·H·dh·T; SwitchHead H·T²·C·2 + 4·H·dh·T + n_sel·E·T·C + [XL] 2·H·T·dh.
    """
    a = cfg.attention
    t, c, dh, h = cfg.seq_len, context_chunks(cfg), a.d_head, a.n_heads
    xl = cfg.pos_encoding == "xl"
    base = h * t * t * c * 2 + 4 * h * dh * t
    if not cfg.uses_switchhead:
        return float(base + (2 * h * t * dh * c if xl else 0))
    routing = sum(routing_sides(cfg)) * a.n_experts * t * c
    return float(base + routing + (2 * h * t * dh if xl else 0))


def forward_macs_breakdown(cfg: ModelConfig, sequences_per_forward: int = 1) -> dict[str, float]:
    """Forward MACs per token, summed over layers, of what `switchall.models` computes.

    Steady state of XL training: every step recomputes K, V and the source-side routing for all
    L = C·T context tokens from the cached layer inputs (spec §2.3); Q, the destination-side
    routing and O run on the T current tokens. Attention products count the full T×L score
    and A·V matmuls (fused causal kernels may skip masked blocks). Only active experts count:
    k per (token, head) in SwitchHead, K per token in the σ-MoE. Softmax, LayerNorm, RoPE
    rotations and the embedding lookup are free.

    The XL positional projection (L sinusoids times W_pos) has no batch dimension: it runs once
    per forward and is shared by its `sequences_per_forward` sequences (the micro-batch).

    Keys: attn_projections (Q, K, V, O incl. expert matmuls), attn_routing, attn_gating
    (gate-weighted sums of the k expert outputs), attn_positional (projection and q·k_pos
    scores), attn_scores (Q·Kᵀ and A·V), mlp (dense, or active σ-MoE experts), mlp_routing,
    mlp_gating, output (the d×V output layer).
    """
    a, m = cfg.attention, cfg.moe
    t, d, h, dh = cfg.seq_len, cfg.d_model, a.n_heads, a.d_head
    keys = context_chunks(cfg) * t
    moe = moe_projections(cfg)
    src, dst = routing_sides(cfg)
    experts = a.n_experts if moe else 1
    rows = {"q": t, "k": keys, "v": keys, "o": t}  # tokens each projection runs on, per sequence

    projections = sum(rows[p] * d * h * dh * (a.k if p in moe else 1) for p in "qkvo")
    # V/K/Q mixtures weight k head-width outputs; O weights k model-width outputs per head.
    gating = sum(rows[p] * h * a.k * (d if p == "o" else dh) for p in moe)
    if cfg.uses_switchhead and not moe:
        gating += t * h * dh  # the gated-dense output gate multiplies each head's output
    routing = (keys if src else 0) * d * h * experts + (t if dst else 0) * d * h * experts
    positional = 0.0
    if cfg.pos_encoding == "xl":
        positional = keys * d * h * dh / sequences_per_forward + h * t * keys * dh
    scores = 2 * h * t * keys * dh

    if cfg.uses_sigma_moe:
        mlp, mlp_routing, mlp_gating = m.k * 2 * d * m.expert_size, m.n_experts * d, m.k * d
    else:
        mlp, mlp_routing, mlp_gating = 2 * d * cfg.mlp.d_ff, 0, 0

    per_layer = {
        "attn_projections": projections / t,
        "attn_routing": routing / t,
        "attn_gating": gating / t,
        "attn_positional": positional / t,
        "attn_scores": scores / t,
        "mlp": float(mlp),
        "mlp_routing": float(mlp_routing),
        "mlp_gating": float(mlp_gating),
    }
    out = {name: cfg.n_layers * v for name, v in per_layer.items()}
    out["output"] = float(d * cfg.vocab_size)
    return out


def forward_macs_per_token(cfg: ModelConfig, sequences_per_forward: int = 1) -> float:
    return sum(forward_macs_breakdown(cfg, sequences_per_forward).values())


def train_flops_per_token(cfg: ModelConfig, sequences_per_forward: int = 1) -> float:
    """3 × 2 × forward MACs per token: 2 FLOPs per MAC; backward costs twice the forward."""
    return 6.0 * forward_macs_per_token(cfg, sequences_per_forward)


def inactive_expert_params(cfg: ModelConfig) -> int:
    """Expert weights a token does not use: (E − k) of each head's experts per MoE projection,
    and (N_E − K) σ-MoE experts, in every layer."""
    a, m = cfg.attention, cfg.moe
    per_layer = len(moe_projections(cfg)) * a.n_heads * (a.n_experts - a.k) * cfg.d_model * a.d_head
    if cfg.uses_sigma_moe:
        per_layer += (m.n_experts - m.k) * 2 * cfg.d_model * m.expert_size
    return cfg.n_layers * per_layer


def account(
    cfg: ModelConfig,
    params: int | Callable[[ModelConfig], int],
    sequences_per_forward: int = 1,
) -> dict[str, float | int]:
    """Every figure of this module for `cfg`, keyed as `switchall count --json` prints them.

    `params` is the parameter count of the real model (or a callable computing it from `cfg`,
    e.g. summing `numel` over `build_model(cfg)` built on the meta device): the model owns
    its parameter layout, so it is counted, not re-derived here.
    """
    n_params = params(cfg) if callable(params) else params
    return {
        "params": n_params,
        "active_params": n_params - inactive_expert_params(cfg),
        "attn_macs_eq": attn_macs_eq(cfg),
        "attn_mem_eq": attn_mem_eq(cfg),
        "attn_macs": attn_macs(cfg),
        "attn_mem": attn_mem(cfg),
        "forward_macs_per_token": forward_macs_per_token(cfg, sequences_per_forward),
        "train_flops_per_token": train_flops_per_token(cfg, sequences_per_forward),
    }
