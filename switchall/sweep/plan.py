"""Plan a sweep: every point matched, validated, counted and named before anything runs."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from switchall.config import RunConfig, build_run_config
from switchall.configtools import ConfigError, to_dict
from switchall.sweep.matching import MatchError, match_model, non_embedding_params, skip_init
from switchall.sweep.spec import PointSpec, SweepSpec, load_sweep


@dataclass
class PlannedPoint:
    name: str
    size: str
    variant: str
    cfg: RunConfig | None
    counts: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    config_hash: str = ""

    @property
    def valid(self) -> bool:
        return self.error is None

    def row(self) -> dict[str, Any]:
        """What `sweep plan --json` prints and `results.csv` starts from."""
        return {
            "name": self.name,
            "size": self.size,
            "variant": self.variant,
            "config_hash": self.config_hash,
            **self.counts,
            **({"error": self.error} if self.error else {}),
        }


def config_hash(cfg: RunConfig) -> str:
    """What decides the run: everything but logging (where and how it is reported)."""
    tree = to_dict(cfg)
    tree.pop("logging", None)
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:12]


def count_point(cfg: RunConfig) -> dict[str, Any]:
    from switchall.analysis.accounting import account
    from switchall.analysis.count_cli import count_params

    with skip_init():
        total, body = count_params(cfg.model)
    micro = max(cfg.train.batch_size // cfg.train.grad_accum, 1)
    acc = account(cfg.model, total, sequences_per_forward=micro)
    tokens = cfg.train.steps * cfg.train.batch_size * cfg.model.seq_len
    layers = cfg.model.n_layers
    return {
        "params": total,
        "non_embedding_params": body,
        "active_params": acc["active_params"],
        "train_flops_per_token": acc["train_flops_per_token"],
        "attn_macs": acc["attn_macs"],
        "attn_mem": acc["attn_mem"],
        # Whole-model attention cost per token and in total (paper tables' convention per
        # layer and sequence, times layers, over the chunk length).
        "attn_macs_per_token": acc["attn_macs"] * layers / cfg.model.seq_len,
        "attn_mem_model": acc["attn_mem"] * layers,
        "tokens": tokens,
        "train_flops": acc["train_flops_per_token"] * tokens,
        "steps": cfg.train.steps,
        "seq_len": cfg.model.seq_len,
        "batch_size": cfg.train.batch_size,
        "lr": cfg.optim.lr,
        "seed": cfg.train.seed,
    }


def plan_point(p: PointSpec, sweep: SweepSpec) -> PlannedPoint:
    where = f"{sweep.path}: point {p.name}"
    try:
        tree = dict(p.tree)
        model = match_model(
            tree["model"], p.dense_model, p.solve, sweep.moe_experts_multiple, sweep.tolerance
        )
        tree["model"] = model
        cfg = build_run_config(tree, source=where)
        counts = count_point(cfg)
        target = non_embedding_params(p.dense_model)
        counts["dense_non_embedding_params"] = target
        counts["param_mismatch"] = (counts["non_embedding_params"] - target) / target
        out = PlannedPoint(p.name, p.size, p.variant, cfg, counts, config_hash=config_hash(cfg))
        if cfg.model.variant != "transformer" and abs(counts["param_mismatch"]) > sweep.tolerance:
            out.error = (
                f"{counts['non_embedding_params']:,} non-embedding parameters vs "
                f"{target:,} of the dense point ({100 * counts['param_mismatch']:+.2f}%, "
                f"tolerance {100 * sweep.tolerance:.2f}%)"
            )
        return out
    except (ConfigError, MatchError, KeyError) as e:
        msg = str(e) if not isinstance(e, KeyError) else f"missing config key {e}"
        return PlannedPoint(p.name, p.size, p.variant, None, error=msg)


def plan_sweep(path) -> tuple[SweepSpec, list[PlannedPoint]]:
    sweep = load_sweep(path)
    return sweep, [plan_point(p, sweep) for p in sweep.points]


def _si(x: float) -> str:
    for unit, div in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def describe_model(cfg: RunConfig) -> str:
    m, a = cfg.model, cfg.model.attention
    text = f"L{m.n_layers} d{m.d_model} H{a.n_heads}x{a.d_head}"
    if m.uses_switchhead:
        text += f" E{a.n_experts}k{a.k}"
    if m.uses_sigma_moe:
        text += f" moe{m.moe.n_experts}x{m.moe.expert_size}k{m.moe.k}"
    else:
        text += f" ff{m.mlp.d_ff}"
    return text


def format_plan(sweep: SweepSpec, points: list[PlannedPoint]) -> str:
    head = (
        "point",
        "shape",
        "params",
        "non-emb",
        "match",
        "active",
        "FLOPs/tok",
        "attn MACs",
        "attn mem",
        "tokens",
        "train FLOPs",
        "hash",
    )
    rows = []
    for p in points:
        if not p.valid and p.cfg is None:
            rows.append(
                (
                    p.name,
                    "INVALID: " + (p.error or ""),
                )
                + ("",) * (len(head) - 2)
            )
            continue
        c = p.counts
        rows.append(
            (
                p.name + ("" if p.valid else " (INVALID)"),
                describe_model(p.cfg),
                _si(c["params"]),
                _si(c["non_embedding_params"]),
                f"{100 * c['param_mismatch']:+.2f}%",
                _si(c["active_params"]),
                _si(c["train_flops_per_token"]),
                _si(c["attn_macs"]),
                _si(c["attn_mem"]),
                _si(c["tokens"]),
                _si(c["train_flops"]),
                p.config_hash,
            )
        )
    widths = [
        max(len(h), *(len(r[i]) for r in rows if len(r[1]) < 60 or i != 1))
        for i, h in enumerate(head)
    ]
    lines = [f"sweep {sweep.name} ({sweep.path}): {len(points)} points"]
    lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
    for r in rows:
        if r[1].startswith("INVALID"):
            lines.append(f"{r[0].ljust(widths[0])}  {r[1]}")
        else:
            lines.append("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))
    for p in points:
        if p.cfg is not None and not p.valid:
            lines.append(f"INVALID {p.name}: {p.error}")
    lines.append(
        "(attn MACs / mem: per layer and sequence, the paper tables' convention; match: "
        "non-embedding parameters vs the size's dense point; FLOPs count active experts)"
    )
    return "\n".join(lines)
