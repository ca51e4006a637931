"""The sweep's plots (matplotlib, Agg): written to `DIR/plots/*.png` by `switchall scaling fit`.

- `loss_curves.png`: validation loss against tokens seen, every point (colour: variant, line
  width: size);
- `loss_vs_compute.png`: final validation loss against training FLOPs with each variant's
  fitted law L(C) and its exponent;
- `isoflop.png`: iso-FLOP curves of the joint law L(N, D) at C = κ·N·D (loss against N at fixed
  budgets), the compute-optimal N marked;
- `compute_multiplier.png`: what each variant needs of training FLOPs, attention MACs and
  attention memory relative to dense at equal loss, against the dense cost, with 95% bands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from switchall.analysis.fits import Law, compute_for_loss  # noqa: E402

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]


def _colours(variants) -> dict[str, str]:
    return {v: COLOURS[i % len(COLOURS)] for i, v in enumerate(sorted(variants))}


def _law(entry: dict[str, Any], kind: str) -> Law:
    return Law(kind, entry["params"], entry["scale"])


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def loss_curves(rows, colours, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 5))
    sizes = sorted({r["non_embedding_params"] for r in rows})
    for r in rows:
        curve = [(t, v) for _, t, v in r.get("val_curve", []) if t > 0]
        if not curve:
            continue
        width = 0.8 + 2.2 * sizes.index(r["non_embedding_params"]) / max(len(sizes) - 1, 1)
        t, v = zip(*curve, strict=True)
        ax.plot(
            t, v, color=colours[r["variant"]], lw=width, alpha=0.85, marker=".", label=r["name"]
        )
    ax.set_xscale("log")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("validation loss (nats / token)")
    ax.set_title("Validation loss of every point (colour: variant, width: model size)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def loss_vs_compute(rows, fits, colours, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 5))
    for v, vrows in _group(rows).items():
        c = np.array([r["train_flops"] for r in vrows])
        y = np.array([r["final_val_loss"] for r in vrows])
        ax.scatter(c, y, color=colours[v], s=30, zorder=3)
        entry = fits["variants"].get(v, {}).get("compute_law")
        label = v
        if entry:
            law = _law(entry, "compute")
            xs = np.geomspace(c.min() / 1.5, c.max() * 10, 100)
            p, ci = entry["params"], (entry.get("ci95") or {}).get("alpha")
            label = (
                f"{v}: L = {p['E']:.2f} + {p['A']:.2f}·(C/{law.scale['x0']:.2g})^-{p['alpha']:.3f}"
            )
            if ci:
                label += f"  (α 95%: {ci[0]:.3f}–{ci[1]:.3f})"
            ax.plot(xs, law.predict(xs), color=colours[v], lw=1.5)
        ax.plot([], [], color=colours[v], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training compute C (FLOPs, active experts only)")
    ax.set_ylabel("final validation loss (nats / token)")
    ax.set_title("Loss against compute, with the fitted law L(C) = E + A·C^-α per variant")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def isoflop(rows, fits, colours, path: Path) -> Path | None:
    variants = [v for v in sorted(fits["variants"]) if "joint_law" in fits["variants"][v]]
    if not variants:
        return None
    fig, axes = plt.subplots(1, len(variants), figsize=(6 * len(variants), 4.5), squeeze=False)
    c_all = [r["train_flops"] for r in rows]
    budgets = np.geomspace(min(c_all), max(c_all) * 10, 4)
    for ax, v in zip(axes[0], variants, strict=True):
        entry = fits["variants"][v]
        law, kappa = _law(entry["joint_law"], "joint"), entry["kappa_flops_per_param_token"]
        n_pts = [r["non_embedding_params"] for r in rows if r["variant"] == v]
        ns = np.geomspace(min(n_pts) / 4, max(n_pts) * 8, 200)
        for i, c in enumerate(budgets):
            loss = law.predict(ns, c / (kappa * ns))
            shade = 0.35 + 0.65 * i / max(len(budgets) - 1, 1)
            ax.plot(ns, loss, color=colours[v], alpha=shade, label=f"C = {c:.2g} FLOPs")
            j = int(np.argmin(loss))
            ax.scatter([ns[j]], [loss[j]], color=colours[v], alpha=shade, marker="*", s=80)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("non-embedding parameters N")
        ax.set_ylabel("predicted loss L(N, C / (κN))")
        ax.set_title(f"{v}: iso-FLOP curves of L(N, D) (★ compute-optimal N)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def compute_multiplier(fits, colours, path: Path) -> Path | None:
    if not fits.get("multipliers"):
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    styles = {"flops": "-", "attn_macs": "--", "attn_mem": ":"}
    names = {"flops": "training FLOPs", "attn_macs": "attention MACs", "attn_mem": "attn. memory"}
    dense = fits["variants"].get(fits.get("dense_variant"), {}).get("compute_law")
    if dense is None:
        plt.close(fig)
        return None
    # Each cost has its own dense scale; all are drawn against the training FLOPs the dense
    # model needs for the same loss, so that they share one axis of scale.
    to_flops = _law(dense, "compute")
    drawn = False
    for v, curves in sorted(fits["multipliers"].items()):
        for cost, curve in curves.items():
            pts = [p for p in curve["grid"] if p["multiplier"] is not None]
            x = compute_for_loss(to_flops, [p["loss"] for p in pts])
            pts = [p for p, xv in zip(pts, x, strict=True) if np.isfinite(xv)]
            x = [xv for xv in x if np.isfinite(xv)]
            if not pts:
                continue
            for p, xv in zip(pts, x, strict=True):
                p["x"] = xv
            ax.plot(
                x,
                [p["multiplier"] for p in pts],
                styles[cost],
                color=colours[v],
                label=f"{v}: {names[cost]}",
            )
            band = [(p["x"], *p["ci95"]) for p in pts if p["ci95"]]
            if band:
                bx, lo, hi = zip(*band, strict=True)
                ax.fill_between(bx, lo, hi, color=colours[v], alpha=0.12)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("dense training compute reaching the same loss (FLOPs)")
    ax.set_ylabel("cost relative to dense at equal loss")
    ax.set_title("Compute multiplier vs dense (95% bootstrap bands; < 1 is cheaper)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def _group(rows) -> dict[str, list]:
    out: dict[str, list] = {}
    for r in rows:
        out.setdefault(r["variant"], []).append(r)
    return out


def write_plots(rows, fits, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    colours = _colours({r["variant"] for r in rows})
    made = [
        loss_curves(rows, colours, out_dir / "loss_curves.png"),
        loss_vs_compute(rows, fits, colours, out_dir / "loss_vs_compute.png"),
        isoflop(rows, fits, colours, out_dir / "isoflop.png"),
        compute_multiplier(fits, colours, out_dir / "compute_multiplier.png"),
    ]
    return [p for p in made if p is not None]
