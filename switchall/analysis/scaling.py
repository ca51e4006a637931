"""From a sweep's results to its laws: `DIR/fits.json` (what `switchall scaling fit` writes).

Per variant (finished points only):
- `compute_law`: L(C) = E + A·(C/x0)^(−α), C = training FLOPs (active experts only);
- `joint_law`: L(N, D) = E + A·(N/N0)^(−α) + B·(D/D0)^(−β), N = non-embedding parameters
  (equal across the variants of a size: they are parameter-matched), D = training tokens;
- `compute_optimal`: N and D minimising the joint law at C = κ·N·D, with κ the variant's mean
  training FLOPs per parameter and token, for budgets from the sweep's smallest to 100× its
  largest compute;
- `extrapolation`: the compute law at 2×, 4× and 10× the largest compute, and the joint law at
  2× and 4× the largest N with the largest point's tokens per parameter.

Against the dense variant (model variant `transformer`), `multipliers`: how much a variant
needs of each cost to reach the dense model's loss, as a function of scale. For a dense budget
x, L = L_dense(x), and the multiplier is x_variant(L) / x. Costs: training FLOPs, attention
MACs spent in training (per-token attention MACs × tokens), and attention memory of the model
(per-sequence floats × layers; fitted on each variant's largest token budget only, since memory
does not grow with tokens). Infinite where the variant's fitted floor E is above the loss.
Every figure carries a 95% bootstrap interval (resampling each variant's points).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from switchall.analysis.fits import (
    Law,
    compute_for_loss,
    compute_optimal,
    fit_compute_law,
    fit_joint_law,
)

COSTS = {"flops": "train FLOPs", "attn_macs": "attention MACs", "attn_mem": "attention memory"}


def cost_of(row: dict[str, Any], cost: str) -> float:
    if cost == "flops":
        return float(row["train_flops"])
    if cost == "attn_macs":
        return float(row["attn_macs_per_token"]) * float(row["tokens"])
    return float(row["attn_mem_model"])


def finished(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("status") == "done" and r.get("final_val_loss") is not None]


def by_variant(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(r["variant"], []).append(r)
    return out


def dense_variant(groups: dict[str, list[dict[str, Any]]]) -> str | None:
    dense = [v for v, rs in groups.items() if rs[0].get("model_variant", v) == "transformer"]
    if "transformer" in dense:
        return "transformer"
    return dense[0] if dense else None


def _interval(samples) -> list[float] | None:
    vals = np.asarray([s for s in samples if np.isfinite(s)], float)
    if len(vals) < max(5, 0.5 * len(samples)):
        return None  # most resamples never reach the loss: no finite interval
    lo, hi = np.percentile(vals, [2.5, 97.5])
    return [float(lo), float(hi)]


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _cost_law(rows, cost, n_boot, seed) -> Law | None:
    if cost == "attn_mem":
        top = max(r["tokens"] for r in rows)
        rows = [r for r in rows if r["tokens"] == top]
    if len(rows) < 3:
        return None
    xs = [cost_of(r, cost) for r in rows]
    if len(set(xs)) < 2:
        return None
    return fit_compute_law(xs, [r["final_val_loss"] for r in rows], n_boot=n_boot, seed=seed)


def multiplier_curve(dense: Law, other: Law, xs: np.ndarray) -> list[dict[str, Any]]:
    """x_other(L_dense(x)) / x at each dense budget x, with bootstrap intervals."""
    loss = dense.predict(xs)
    mult = compute_for_loss(other, loss) / xs
    pairs = list(zip(dense.resampled(), other.resampled(), strict=False))
    boot = np.array([compute_for_loss(o, d.predict(xs)) / xs for d, o in pairs]).reshape(
        -1, len(xs)
    )
    return [
        {
            "dense_cost": float(x),
            "loss": float(lv),
            "multiplier": _finite(m),
            "ci95": _interval(boot[:, i]) if len(boot) else None,
        }
        for i, (x, lv, m) in enumerate(zip(xs, loss, mult, strict=True))
    ]


def _variant_fits(rows, n_boot, seed) -> dict[str, Any]:
    out: dict[str, Any] = {"n_points": len(rows), "notes": []}
    laws: dict[str, Law] = {}
    for cost in COSTS:
        law = _cost_law(rows, cost, n_boot, seed)
        if law is None:
            out["notes"].append(f"too few distinct points for a {COSTS[cost]} law")
            continue
        laws[cost] = law
        out["compute_law" if cost == "flops" else f"{cost}_law"] = law.to_json()
    n = [r["non_embedding_params"] for r in rows]
    d = [r["tokens"] for r in rows]
    if len(rows) >= 5 and len(set(n)) >= 2 and len(set(d)) >= 2:
        joint = fit_joint_law(n, d, [r["final_val_loss"] for r in rows], n_boot=n_boot, seed=seed)
        laws["joint"] = joint
        kappa = float(
            np.mean([r["train_flops_per_token"] / r["non_embedding_params"] for r in rows])
        )
        c_lo, c_hi = min(r["train_flops"] for r in rows), max(r["train_flops"] for r in rows)
        budgets = np.geomspace(c_lo, 100 * c_hi, 7)
        opt = compute_optimal(joint, budgets, kappa)
        out["joint_law"] = joint.to_json()
        out["kappa_flops_per_param_token"] = kappa
        out["compute_optimal"] = [
            {"compute": float(c), "N": float(nn), "D": float(dd), "loss": float(lv)}
            for c, nn, dd, lv in zip(budgets, opt["N"], opt["D"], opt["loss"], strict=True)
        ]
    else:
        out["notes"].append("the joint law needs >= 5 points with >= 2 sizes and >= 2 budgets")
    out["extrapolation"] = _extrapolate(rows, laws)
    return out, laws


def _extrapolate(rows, laws) -> list[dict[str, Any]]:
    out = []
    if "flops" in laws:
        law, top = laws["flops"], max(r["train_flops"] for r in rows)
        for f in (2, 4, 10):
            samples = [b.predict(f * top) for b in law.resampled()]
            out.append(
                {
                    "law": "compute",
                    "compute": f * top,
                    "loss": float(law.predict(f * top)),
                    "ci95": _interval(samples) if samples else None,
                }
            )
    if "joint" in laws:
        law = laws["joint"]
        big = max(rows, key=lambda r: (r["non_embedding_params"], r["tokens"]))
        ratio = big["tokens"] / big["non_embedding_params"]
        for f in (2, 4):
            n = f * big["non_embedding_params"]
            samples = [b.predict(n, ratio * n) for b in law.resampled()]
            out.append(
                {
                    "law": "joint",
                    "N": n,
                    "D": ratio * n,
                    "loss": float(law.predict(n, ratio * n)),
                    "ci95": _interval(samples) if samples else None,
                }
            )
    return out


def fit_sweep(rows: list[dict[str, Any]], n_boot: int = 200, seed: int = 0) -> dict[str, Any]:
    done = finished(rows)
    groups = by_variant(done)
    result: dict[str, Any] = {
        "points": len(rows),
        "finished": len(done),
        "unfinished": sorted(r["name"] for r in rows if r not in done),
        "bootstrap_samples": n_boot,
        "variants": {},
        "multipliers": {},
        "headline": {},
    }
    all_laws = {}
    for v, vrows in sorted(groups.items()):
        result["variants"][v], all_laws[v] = _variant_fits(vrows, n_boot, seed)
    dense = dense_variant(groups)
    result["dense_variant"] = dense
    if dense is None or dense not in all_laws:
        return result
    for v, laws in all_laws.items():
        if v == dense:
            continue
        curves = {}
        for cost in COSTS:
            if cost in laws and cost in all_laws[dense]:
                xs = sorted({cost_of(r, cost) for r in groups[dense]})
                grid = np.geomspace(xs[0], 10 * xs[-1], 9)
                curves[cost] = {
                    "at_dense_points": multiplier_curve(
                        all_laws[dense][cost], laws[cost], np.asarray(xs)
                    ),
                    "grid": multiplier_curve(all_laws[dense][cost], laws[cost], grid),
                }
        result["multipliers"][v] = curves
        result["headline"][v] = _headline(result, v, dense, curves)
    return result


def _headline(result, v, dense, curves) -> dict[str, Any]:
    head: dict[str, Any] = {}
    for name in (v, dense):
        law = result["variants"][name].get("compute_law")
        if law:
            head[f"alpha_{'variant' if name == v else 'dense'}"] = law["params"]["alpha"]
            head[f"alpha_{'variant' if name == v else 'dense'}_ci95"] = (law.get("ci95") or {}).get(
                "alpha"
            )
    for cost, curve in curves.items():
        last = curve["at_dense_points"][-1]
        head[f"{cost}_multiplier_at_largest"] = last["multiplier"]
        head[f"{cost}_multiplier_at_largest_ci95"] = last["ci95"]
    return head
