"""Scaling-run metrics in metrics.jsonl: tokens, FLOPs, MFU, expert load on a forced router.

The console line, tokens and FLOPs of natural runs are checked by the sweep test's points.
"""

from __future__ import annotations

import math

import pytest
import torch

from switchall.analysis.accounting import train_flops_per_token
from switchall.config import load_run_config
from switchall.pretrain.metrics import read_metrics
from switchall.pretrain.run_metrics import load_stats
from switchall.pretrain.runtime import LocalRuntime
from switchall.pretrain.trainer import Trainer

from .conftest import TINY

# SwitchAll with one expert per choice: 2 heads x 3 experts (k=1), σ-MoE of 4 experts (K=1).
FORCED = [
    *TINY,
    "model.attention.n_heads=2",
    "model.attention.n_experts=3",
    "model.attention.k=1",
    "model.moe.k=1",
    "train.steps=2",
    "train.log_every=1",
    "optim.lr=1e-12",
    "optim.warmup_steps=0",
    "logging.peak_flops=1e9",
]


def _force_expert_zero(model) -> None:
    """Every token's LayerNorm output becomes the constant 1 vector, and only the routing row of
    expert 0 (of each head) is non-zero: every routing decision picks expert 0."""
    with torch.no_grad():
        for block in model.blocks:
            for ln in (block.ln1, block.ln2):
                ln.weight.zero_()
                ln.bias.fill_(1.0)
            for sel in (block.attn.sel_src, block.attn.sel_dst, block.mlp.sel):
                experts = sel.shape[0] // (2 if sel is not block.mlp.sel else 1)
                sel.zero_()
                sel.view(-1, experts, sel.shape[-1])[:, 0] = 1.0


def test_forced_router_gives_overload_e_and_e_minus_1_idle(tiny_dataset, tmp_path):
    cfg = load_run_config("configs/demo_switchall.yaml", [*FORCED, f"data.path={tiny_dataset}"])
    trainer = Trainer(cfg, tmp_path / "run", LocalRuntime(torch.device("cpu")))
    _force_expert_zero(trainer.model)
    trainer.run()
    steps = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        for layer in range(2):
            assert r[f"load/mlp{layer}/overload"] == pytest.approx(4.0)
            assert r[f"load/mlp{layer}/idle"] == 3
            assert r[f"load/mlp{layer}/entropy"] == pytest.approx(0.0, abs=1e-12)
            for side in "vo":
                assert r[f"load/attn{layer}.{side}/overload"] == pytest.approx(3.0)
                assert r[f"load/attn{layer}.{side}/idle"] == 2 * 2  # per head E - 1, 2 heads
                assert r[f"load/attn{layer}.{side}/entropy"] == pytest.approx(0.0, abs=1e-12)
        tokens = r["step"] * 4 * 16
        assert r["tokens_seen"] == tokens
        flops = train_flops_per_token(cfg.model, sequences_per_forward=4)
        assert r["train_flops_seen"] == pytest.approx(tokens * flops)
        assert r["mfu"] == pytest.approx(flops * r["tokens_per_s"] / 1e9)


def test_load_stats_by_hand():
    # head 0: counts 6, 2, 0, 0 -> overload 6 / 2 = 3, 2 idle; head 1 uniform.
    stats = load_stats(torch.tensor([[6.0, 2.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]).double())
    h0 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert stats["entropy"] == pytest.approx((h0 + math.log(4)) / 2)
    assert stats["overload"] == pytest.approx(3.0)
    assert stats["idle"] == 2
    assert load_stats(torch.zeros(1, 4).double()) is None


def test_peak_table_and_cpu():
    from switchall.pretrain.run_metrics import PEAK_FLOPS, device_peak_flops

    assert device_peak_flops(torch.device("cpu"), "bf16") is None
    names = [n for n, _ in PEAK_FLOPS]
    # A name that contains another one must come first, or it would never match.
    for i, a in enumerate(names):
        assert not any(b in a for b in names[:i]), a
