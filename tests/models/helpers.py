"""Tiny model configs shared by the model tests."""

from __future__ import annotations

from switchall.configtools import from_dict
from switchall.models import ModelConfig


def tiny_config(variant: str = "switchall", pos: str = "xl", **overrides) -> ModelConfig:
    moe_att = variant in ("switchhead", "switchall")
    tree = dict(
        variant=variant,
        vocab_size=50,
        d_model=32,
        n_layers=2,
        seq_len=8,
        pos_encoding=pos,
        mem_chunks=1,
        dropout=0.0,
        attention=dict(n_heads=2, d_head=8, n_experts=3 if moe_att else 1, k=2 if moe_att else 1),
        mlp=dict(d_ff=48),
        moe=dict(n_experts=4, expert_size=8, k=2, entropy_reg=1e-3),
    )
    for key, value in overrides.items():
        node = tree
        *parents, leaf = key.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    cfg = from_dict(ModelConfig, tree)
    cfg.validate()
    return cfg
