"""`switchall count CONFIG [overrides] [--json]`: parameters, attention MACs and memory, FLOPs.

Parameters are counted on the real model built on the meta device (no memory is allocated);
everything else comes from `switchall.analysis.accounting`, whose docstrings give each
formula's source.
"""

from __future__ import annotations

import argparse
import json

from switchall.analysis.accounting import account, context_chunks
from switchall.config import load_run_config
from switchall.models.config import ModelConfig


def count_params(model_cfg: ModelConfig) -> tuple[int, int]:
    """(total, excluding the input embedding and the output layer) parameters of the model."""
    import torch

    from switchall.models import build_model

    with torch.device("meta"):
        model = build_model(model_cfg)
    total = sum(p.numel() for p in model.parameters())
    ends = model.embedding.weight.numel() + sum(p.numel() for p in model.output.parameters())
    return total, total - ends


def _si(x: float) -> str:
    """The paper's style (`paper/common.py::format_flops`), with one more digit."""
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def _describe(cfg: ModelConfig) -> str:
    a = cfg.attention
    heads = f"{a.n_heads} heads x {a.d_head}"
    if cfg.uses_switchhead:
        heads += f", E={a.n_experts} k={a.k} ({a.moe_projections})"
    mlp = (
        f"σ-MoE {cfg.moe.n_experts}x{cfg.moe.expert_size} K={cfg.moe.k}"
        if cfg.uses_sigma_moe
        else f"d_ff {cfg.mlp.d_ff}"
    )
    return (
        f"{cfg.variant}, {cfg.pos_encoding}, {cfg.n_layers} layers, d_model {cfg.d_model}, "
        f"{heads}, {mlp}, T={cfg.seq_len}, C={context_chunks(cfg)}"
    )


def run_count(args: argparse.Namespace) -> int:
    cfg = load_run_config(args.config, args.overrides)
    total, body = count_params(cfg.model)
    # The XL positional projection is shared by the sequences of one forward: a micro-batch.
    micro_batch = max(cfg.train.batch_size // cfg.train.grad_accum, 1)
    out = {
        **account(cfg.model, total, sequences_per_forward=micro_batch),
        "non_embedding_params": body,
        "sequences_per_forward": micro_batch,
    }
    if args.json:
        print(json.dumps(out))
        return 0
    rows = [
        ("parameters", f"{total:,}", _si(total)),
        ("  without embedding and output layer", f"{body:,}", _si(body)),
        ("  active per token", f"{out['active_params']:,}", _si(out["active_params"])),
        ("attention MACs / layer / sequence, tables", f"{out['attn_macs']:,.0f}", ""),
        ("attention memory (floats), tables", f"{out['attn_mem']:,.0f}", ""),
        ("attention MACs, paper Eqs 11 and 13", f"{out['attn_macs_eq']:,.0f}", ""),
        ("attention memory (floats), paper Eq 12", f"{out['attn_mem_eq']:,.0f}", ""),
        ("forward MACs / token", f"{out['forward_macs_per_token']:,.0f}", ""),
        ("training FLOPs / token (6 x MACs)", f"{out['train_flops_per_token']:,.0f}", ""),
    ]
    for i in range(3, len(rows)):
        label, value, _ = rows[i]
        rows[i] = (label, value, _si(float(value.replace(",", ""))))
    width = max(len(r[0]) for r in rows)
    print(f"{args.config}: {_describe(cfg.model)}")
    for label, value, short in rows:
        print(f"  {label:<{width}}  {value:>16}  {short:>8}")
    print(
        "  (tables: paper/common.py's convention; FLOPs count active experts, with the XL "
        f"positional projection shared by a micro-batch of {micro_batch})"
    )
    return 0


def register(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser(
        "count",
        help="parameters, attention MACs and memory, training FLOPs per token",
        description="Count a config's parameters (meta-device model) and its compute.",
    )
    p.add_argument("config", help="YAML run config, e.g. configs/paper/c4_switchhead_262m.yaml")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_count)
