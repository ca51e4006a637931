"""The paper configs and the compute accounting, checked against the paper's published figures.

Where each expected value comes from (SPEC = ../shared/docs/switchhead_spec.md, the shared
docs folder, not part of this repository):
- the parameter counts: the configs' file names, i.e. the paper's tables (SPEC §1.5, §6);
- the 262M C4 headline "44% of the compute and 27% of the memory" (paper abstract; SPEC §6,
  "Headline claims"), and "about 52%" by the paper's own Eq 13 (SPEC §7); the MAC and memory
  counts themselves are recomputed in the tests by hand from the formulas of SPEC §7;
- the big RoPE SwitchHead's 3.37G MACs / 10.0M floats without a cache (SPEC §3.2);
- the small configs: the equations of SPEC §7 evaluated by hand in comments;
- the per-token forward count: the matmuls the real model runs, counted by
  `torch.utils.flop_counter`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from switchall.analysis import count_cli
from switchall.analysis.accounting import (
    attn_macs,
    attn_macs_eq,
    attn_mem,
    attn_mem_eq,
    forward_macs_breakdown,
    inactive_expert_params,
)
from switchall.config import load_run_config
from switchall.models import build_model
from switchall.models.config import AttentionConfig, MLPConfig, ModelConfig, MoEConfig

PAPER = Path(__file__).resolve().parents[1] / "configs" / "paper"
NAMES = [
    f"{ds}_{model}_{size}"
    for ds in ("wt103", "c4", "pes2o")
    for model, size in (
        ("transformer", "47m"),
        ("switchhead", "47m"),
        ("switchall", "47m"),
        ("transformer", "262m"),
        ("switchhead", "262m"),
        ("switchall", "259m"),
    )
] + [
    "enwik8_transformer_41m",
    "enwik8_switchhead_41m",
    "wt103rope_transformer_45m",
    "wt103rope_switchhead_45m",
    "wt103rope_transformer_244m",
    "wt103rope_switchhead_243m",
]
NAME_RE = re.compile(r"(?P<ds>[a-z0-9]+?)(?P<rope>rope)?_(?P<variant>[a-z]+)_(?P<size>\d+)m")


def paper(name: str, *overrides: str):
    return load_run_config(PAPER / f"{name}.yaml", overrides)


def test_paper_configs_are_the_24_models_of_the_tables():
    assert sorted(p.stem for p in PAPER.glob("*.yaml")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_paper_config_loads_and_matches_its_name(name):
    cfg = paper(name)
    m = NAME_RE.fullmatch(name)
    ds, big = m["ds"], int(m["size"]) > 200
    assert cfg.model.variant == m["variant"]
    assert cfg.model.pos_encoding == ("rope" if m["rope"] else "xl")
    assert cfg.data.path == f"data/{ds}"
    assert cfg.model.vocab_size == (256 if ds == "enwik8" else 8000)
    assert (cfg.train.steps, cfg.optim.cosine_steps, cfg.optim.lr) == (100_000, 100_000, 2.5e-4)
    assert cfg.optim.warmup_steps == (4000 if big else 0)
    assert cfg.train.batch_size == (32 if ds == "enwik8" else 64)  # what the sweeps set
    assert cfg.model.dropout == (0.2 if big else 0.1)


@pytest.mark.parametrize("name", NAMES)
def test_paper_config_has_the_papers_parameter_count(name):
    cfg = paper(name).model
    with torch.device("meta"):
        params = sum(p.numel() for p in build_model(cfg).parameters())
    figure = int(NAME_RE.fullmatch(name)["size"])
    assert abs(params / 1e6 - figure) < 0.5, f"{params:,} parameters"


def test_headline_c4_262m_ratios_use_the_tables_convention():
    switchhead, dense = paper("c4_switchhead_262m").model, paper("c4_transformer_262m").model
    # SPEC §1.5: SwitchHead H=4, dh=112, E=4, k=2 (V and O MoE); dense H=16, dh=64; both
    # d=1024, T=512 and one memory chunk (C=2).
    a, d, t, c = switchhead.attention, 1024, 512, 2
    assert (a.n_heads, a.d_head, a.n_experts, a.k, a.moe_projections) == (4, 112, 4, 2, "vo")
    assert (dense.attention.n_heads, dense.attention.d_head) == (16, 64)
    assert (switchhead.d_model, switchhead.seq_len, switchhead.mem_chunks) == (d, t, c - 1)
    # paper/common.py by hand (SPEC §7): attention + (n_exp·k + 4 − n_exp)·d·H·h·T projections
    # + n_exp·H·k·T·h gating + n_sel·E·d·T·C routing + 2·H·d·T·h positional; dense: Eq 11.
    sh_macs = (
        4 * 112 * t * t * c * 2
        + (2 * 2 + 4 - 2) * d * 4 * 112 * t
        + 2 * 4 * 2 * t * 112
        + 2 * 4 * d * t * c
        + 2 * 4 * d * t * 112
    )
    dense_macs = 16 * (4 * t * 64 * d + 2 * c * t * t * 64 + 2 * c * t * 64 * d)
    # Memory: H·T²·C·2 + 4·H·h·T + n_sel·E·T·C + 2·H·T·h; dense: Eq 12.
    sh_mem = 4 * t * t * c * 2 + 4 * 4 * 112 * t + 2 * 4 * t * c + 2 * 4 * t * 112
    dense_mem = 16 * (4 * t * 64 + 2 * c * t * t + 2 * c * t * 64)
    assert (attn_macs(switchhead), attn_macs(dense)) == (sh_macs, dense_macs)
    assert (attn_mem(switchhead), attn_mem(dense)) == (sh_mem, dense_mem)
    # The paper's headline (abstract, SPEC §6): 44% of the compute, 27% of the memory.
    assert (f"{sh_macs / dense_macs:.0%}", f"{sh_mem / dense_mem:.0%}") == ("44%", "27%")
    # The paper's own Eq 13 charges the positional projection C times and has no routing
    # term: "about 52%" (SPEC §7). Eq 13 by hand: H·(2·T·h·d + 2·T·k·h·(d+1) + 2·C·T²·h
    # + 2·C·T·h·d).
    eq13 = 4 * (
        2 * t * 112 * d + 2 * t * 2 * 112 * (d + 1) + 2 * c * t * t * 112 + 2 * c * t * 112 * d
    )
    assert (attn_macs_eq(switchhead), attn_macs_eq(dense)) == (eq13, dense_macs)
    assert 0.52 < eq13 / dense_macs < 0.53


@pytest.mark.parametrize("name", [n for n in NAMES if "transformer" in n and "rope" not in n])
def test_dense_xl_tables_convention_is_eq_11_and_12(name):
    cfg = paper(name).model
    assert attn_macs(cfg) == attn_macs_eq(cfg) and attn_mem(cfg) == attn_mem_eq(cfg)


def test_big_rope_switchhead_cache_quirk():
    """SPEC §3.2: the big RoPE SwitchHead trained with a one-chunk cache; its tables' figures
    without the cache would be 3.37G MACs / 10.0M floats."""
    without = paper("wt103rope_switchhead_243m", "model.mem_chunks=0").model
    assert (f"{attn_macs(without) / 1e9:.2f}", f"{attn_mem(without) / 1e6:.1f}") == ("3.37", "10.0")
    as_trained = paper("wt103rope_switchhead_243m").model
    assert as_trained.mem_chunks == 1
    assert attn_macs(as_trained) > 1.2 * attn_macs(without)
    assert attn_mem(as_trained) > 1.5 * attn_mem(without)


def tiny(variant="transformer", pos="xl", mem=1, **attention) -> ModelConfig:
    """H=2, T=4, dh=3, d=6: small enough to compute the equations by hand."""
    att = {"n_heads": 2, "d_head": 3, **attention}
    return ModelConfig(
        variant=variant,
        vocab_size=10,
        d_model=6,
        n_layers=1,
        seq_len=4,
        pos_encoding=pos,
        mem_chunks=mem,
        attention=AttentionConfig(**att),
        mlp=MLPConfig(d_ff=8),
    )


def test_eq_11_and_12_by_hand():
    # C=2. Eq 11: 2·(4·4·3·6 + 2·2·16·3 + 2·2·4·3·6) = 2·(288 + 192 + 288).
    # Eq 12: 2·(4·4·3 + 2·2·16 + 2·2·4·3) = 2·(48 + 64 + 48).
    assert (attn_macs_eq(tiny()), attn_mem_eq(tiny())) == (1536, 320)
    # RoPE without memory (C=1) drops the positional terms: 2·(288 + 96), 2·(48 + 32).
    rope = tiny(pos="rope", mem=0)
    assert (attn_macs_eq(rope), attn_mem_eq(rope)) == (768, 160)


def test_eq_13_by_hand():
    # k=2: 2·(2·4·3·6 + 2·4·2·3·7 + 192 + 288) = 2·(144 + 336 + 480); memory is still Eq 12.
    vo = tiny("switchhead", n_experts=5, k=2)
    assert (attn_macs_eq(vo), attn_mem_eq(vo)) == (1920, 320)
    # All four projections MoE: 2·(0 + 4·2·4·3·7 + 480).
    assert attn_macs_eq(tiny("switchhead", n_experts=5, k=2, moe_projections="vkqo")) == 2304


def test_tables_convention_switchhead_by_hand():
    # paper/common.py, E=5 k=2 C=2: 2·3·16·2·2 (attention) + 6·6·2·3·4 (projections)
    # + 2·2·2·4·3 (gating) + 2·5·6·4·2 (routing) + 2·2·6·4·3 (positional, no C).
    cfg = tiny("switchhead", n_experts=5, k=2)
    assert attn_macs(cfg) == 384 + 864 + 96 + 480 + 288
    # 2·16·2·2 + 4·2·3·4 + 2·5·4·2 + 2·2·4·3.
    assert attn_mem(cfg) == 128 + 96 + 80 + 48


def _cvmm_flops(x, weight, sorted_expert, order, *args, out_shape=None, **kwargs):
    """One multiply-add per (assignment, input, output) of the expert matmul: 2 FLOPs."""
    return 2 * order[0] * weight[1] * weight[2]


@pytest.mark.parametrize(
    "variant, pos, mem, experts, projections",
    [
        ("transformer", "xl", 1, 1, "vo"),
        ("transformer", "rope", 0, 1, "vo"),
        ("switchhead", "xl", 2, 3, "vkqo"),
        ("switchhead", "rope", 1, 3, "vo"),
        ("switchhead", "xl", 1, 1, "vo"),
        ("switchall", "xl", 1, 3, "k"),
        ("sigma_moe", "rope", 0, 1, "vo"),
    ],
)
def test_forward_macs_match_the_models_matmuls(variant, pos, mem, experts, projections):
    cfg = ModelConfig(
        variant=variant,
        vocab_size=50,
        d_model=16,
        n_layers=2,
        seq_len=8,
        pos_encoding=pos,
        mem_chunks=mem,
        dropout=0.0,
        attention=AttentionConfig(
            n_heads=2, d_head=4, n_experts=experts, k=min(2, experts), moe_projections=projections
        ),
        mlp=MLPConfig(d_ff=24),
        moe=MoEConfig(n_experts=4, expert_size=8, k=2),
    )
    batch, model = 3, build_model(cfg).eval()
    tokens = torch.randint(0, 50, (batch, cfg.seq_len))
    counter = FlopCounterMode(
        display=False, custom_mapping={torch.ops.switchall.cvmm_fwd: _cvmm_flops}
    )
    # The math backend runs attention as countable matmuls; memory is filled first (steady state).
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        memory = None
        for _ in range(mem):
            memory = model(tokens, memory).memory
        with counter:
            model(tokens, memory)
    breakdown = forward_macs_breakdown(cfg, sequences_per_forward=batch)
    # Gate-weighted sums are elementwise products, which the flop counter does not count.
    matmuls = sum(v for k, v in breakdown.items() if not k.endswith("gating"))
    assert matmuls * batch * cfg.seq_len == pytest.approx(counter.get_total_flops() / 2)


def test_forward_gating_and_active_params_by_hand():
    cfg = tiny("switchall", n_experts=5, k=2)
    cfg = dataclasses.replace(cfg, moe=MoEConfig(n_experts=4, expert_size=2, k=3))
    bd = forward_macs_breakdown(cfg)
    # Per token: V over L=8 keys weights k=2 outputs of dh=3 per head, O weights 2 of d=6 per
    # head on T=4 tokens: (8·2·2·3 + 4·2·2·6) / 4. σ-MoE: K·d = 3·6.
    assert (bd["attn_gating"], bd["mlp_gating"]) == ((96 + 96) / 4, 18)
    # (E − k)·d·dh per head for V and O, (N_E − K)·2·d·G for the σ-MoE: 2·2·3·6·3 + 1·2·6·2.
    assert inactive_expert_params(cfg) == 216 + 24
    assert inactive_expert_params(paper("c4_transformer_262m").model) == 0


def test_count_verb_json(capsys):
    parser = argparse.ArgumentParser()
    count_cli.register(parser.add_subparsers(dest="verb", required=True))
    path = str(PAPER / "c4_switchall_259m.yaml")
    args = parser.parse_args(["count", path, "model.attention.k=3", "--json"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    cfg = paper("c4_switchall_259m", "model.attention.k=3").model
    assert out["attn_macs"] == attn_macs(cfg) and out["attn_mem_eq"] == attn_mem_eq(cfg)
    assert out["params"] - out["active_params"] == inactive_expert_params(cfg)
    assert out["train_flops_per_token"] == pytest.approx(6 * out["forward_macs_per_token"])
    assert out["sequences_per_forward"] == 64 and round(out["params"] / 1e6) == 259
