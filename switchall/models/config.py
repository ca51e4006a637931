"""Typed configuration of the language models (spec §1.5, §2, §4)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from switchall.configtools import check, join

Variant = Literal["transformer", "switchhead", "switchall", "sigma_moe"]


@dataclass(kw_only=True)
class AttentionConfig:
    """Attention sub-layer. For `transformer`/`sigma_moe` only n_heads and d_head are used."""

    n_heads: int
    """Number of attention matrices per layer."""
    d_head: int
    n_experts: int = 1
    """Experts per head (SwitchHead). 1 is the gated dense special case (spec §1.4)."""
    k: int = 1
    """Experts selected per token and head; gates are raw sigmoids, not renormalised."""
    moe_projections: str = "vo"
    """Which of the projections v, k, q, o are mixtures of experts (the Table 6 ablation)."""
    expert_dropout: float = 0.0
    """Probability of removing an expert from each (token, head) top-k choice while training."""
    rope_fraction: float = 0.5
    """Fraction of each head's channels that RoPE rotates (spec §3.2)."""
    rope_base: float = 10000.0

    def validate(self, prefix: str = "") -> None:
        check(self.n_heads >= 1, join(prefix, "n_heads"), "must be >= 1")
        check(self.d_head >= 1, join(prefix, "d_head"), "must be >= 1")
        check(self.n_experts >= 1, join(prefix, "n_experts"), "must be >= 1")
        check(
            1 <= self.k <= self.n_experts,
            join(prefix, "k"),
            f"must be between 1 and n_experts={self.n_experts}, got {self.k}",
        )
        check(
            set(self.moe_projections) <= set("vkqo")
            and len(set(self.moe_projections)) == len(self.moe_projections),
            join(prefix, "moe_projections"),
            f"must be distinct letters from 'vkqo', got {self.moe_projections!r}",
        )
        check(0.0 <= self.expert_dropout < 1.0, join(prefix, "expert_dropout"), "must be in [0, 1)")
        check(0.0 <= self.rope_fraction <= 1.0, join(prefix, "rope_fraction"), "must be in [0, 1]")
        n_rot = int(self.d_head * self.rope_fraction)
        check(
            n_rot % 2 == 0,
            join(prefix, "rope_fraction"),
            f"rotates {n_rot} channels of d_head={self.d_head}; the count must be even",
        )


@dataclass(kw_only=True)
class MLPConfig:
    """Dense MLP: Linear(d, d_ff) -> ReLU -> Dropout -> Linear(d_ff, d)."""

    d_ff: int = 0

    def validate(self, prefix: str = "") -> None:
        check(self.d_ff >= 0, join(prefix, "d_ff"), "must be >= 0")


@dataclass(kw_only=True)
class MoEConfig:
    """σ-MoE MLP (spec §4): sigmoid top-k over n_experts experts of width expert_size."""

    n_experts: int = 16
    expert_size: int = 128
    k: int = 4
    entropy_reg: float = 1e-4
    """γ of the entropy regulariser on the batch-mean softmax of the selection logits."""
    expert_dropout: float = 0.0

    def validate(self, prefix: str = "") -> None:
        check(self.n_experts >= 1, join(prefix, "n_experts"), "must be >= 1")
        check(self.expert_size >= 1, join(prefix, "expert_size"), "must be >= 1")
        check(
            1 <= self.k <= self.n_experts,
            join(prefix, "k"),
            f"must be between 1 and n_experts={self.n_experts}, got {self.k}",
        )
        check(self.entropy_reg >= 0.0, join(prefix, "entropy_reg"), "must be >= 0")
        check(0.0 <= self.expert_dropout < 1.0, join(prefix, "expert_dropout"), "must be in [0, 1)")


@dataclass(kw_only=True)
class ModelConfig:
    """A pre-LN language model; `variant` picks the attention and MLP kinds."""

    variant: Variant
    vocab_size: int = 8000
    d_model: int
    n_layers: int
    seq_len: int
    """Tokens per training chunk (T, the 'unroll' of the paper)."""
    pos_encoding: Literal["xl", "rope"] = "xl"
    mem_chunks: int = 1
    """Chunks of XL memory each layer attends to beyond the current one (C - 1 in spec §7)."""
    dropout: float = 0.1
    init_scale: float | None = None
    """Scale of all attention and σ-MoE inits; None means sqrt(2 / n_layers) (spec §2.2)."""
    routing_init: Literal["equal_norm", "row_std"] = "equal_norm"
    """SwitchHead routing rows after their normal init. row_std: the authors' renorm (each row
    rescaled by its own std, so rows keep their random norms up to one global factor; the paper
    configs). equal_norm: every row the same L2 norm, global std kept (as σ-MoE's selection)."""
    output_init: Literal["normal", "torch_default"] = "normal"
    """The vocabulary projection. torch_default: nn.Linear's own init, weight and bias (the
    authors'; the paper configs). normal: weight N(0, 1/d_model), bias zero."""
    attention: AttentionConfig
    mlp: MLPConfig = field(default_factory=MLPConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    init_from: str | None = None
    """An export directory (`switchall export`) whose weights start a new run, under any
    layout, with a fresh optimiser; its model config must be this one. Not used on --resume."""

    @property
    def mem_len(self) -> int:
        return self.mem_chunks * self.seq_len

    @property
    def uses_switchhead(self) -> bool:
        return self.variant in ("switchhead", "switchall")

    @property
    def uses_sigma_moe(self) -> bool:
        return self.variant in ("switchall", "sigma_moe")

    @property
    def resolved_init_scale(self) -> float:
        return self.init_scale if self.init_scale is not None else math.sqrt(2.0 / self.n_layers)

    def validate(self, prefix: str = "") -> None:
        check(self.vocab_size >= 2, join(prefix, "vocab_size"), "must be >= 2")
        check(self.d_model >= 1, join(prefix, "d_model"), "must be >= 1")
        check(self.n_layers >= 1, join(prefix, "n_layers"), "must be >= 1")
        check(self.seq_len >= 1, join(prefix, "seq_len"), "must be >= 1")
        check(self.mem_chunks >= 0, join(prefix, "mem_chunks"), "must be >= 0")
        check(self.init_from != "", join(prefix, "init_from"), "must be a directory or null")
        check(0.0 <= self.dropout < 1.0, join(prefix, "dropout"), "must be in [0, 1)")
        check(
            self.init_scale is None or self.init_scale > 0,
            join(prefix, "init_scale"),
            "must be > 0",
        )
        check(
            self.d_model % 2 == 0 or self.pos_encoding != "xl",
            join(prefix, "d_model"),
            f"must be even for sinusoidal XL positions, got {self.d_model}",
        )
        if not self.uses_switchhead:
            att = join(prefix, "attention")
            check(
                self.attention.n_experts == 1,
                f"{att}.n_experts",
                f"variant {self.variant!r} has dense attention; n_experts must be 1",
            )
        if not self.uses_sigma_moe:
            check(
                self.mlp.d_ff >= 1,
                join(prefix, "mlp.d_ff"),
                f"variant {self.variant!r} has a dense MLP; set mlp.d_ff",
            )
