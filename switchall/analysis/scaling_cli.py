"""`switchall scaling fit DIR`: fit a sweep's laws, write `DIR/fits.json` and `DIR/plots/*.png`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _ci(ci) -> str:
    return f" [{ci[0]:.3g}, {ci[1]:.3g}]" if ci else " [no finite interval]"


def summary(fits: dict) -> list[str]:
    lines = [f"{fits['finished']} of {fits['points']} points finished"]
    if fits["unfinished"]:
        lines.append("not fitted (unfinished): " + ", ".join(fits["unfinished"]))
    for v, f in fits["variants"].items():
        law = f.get("compute_law")
        if law:
            p, ci = law["params"], (law.get("ci95") or {})
            lines.append(
                f"{v}: L(C) = {p['E']:.3f} + {p['A']:.3f}·(C/{law['scale']['x0']:.3g})"
                f"^-{p['alpha']:.3f}; α 95%{_ci(ci.get('alpha'))}"
            )
        joint = f.get("joint_law")
        if joint:
            p, ci = joint["params"], (joint.get("ci95") or {})
            lines.append(
                f"{v}: L(N,D): α {p['alpha']:.3f}{_ci(ci.get('alpha'))}, "
                f"β {p['beta']:.3f}{_ci(ci.get('beta'))}, E {p['E']:.3f}"
            )
        lines.extend(f"{v}: {n}" for n in f.get("notes", []))
    for v, head in fits["headline"].items():
        for cost in ("flops", "attn_macs", "attn_mem"):
            m = head.get(f"{cost}_multiplier_at_largest", "absent")
            if m == "absent":
                continue
            text = "never (fitted floor above the dense loss)" if m is None else f"{m:.3g}x"
            lines.append(
                f"{v} vs {fits['dense_variant']}: {cost} needed at the largest dense "
                f"point's loss: {text}{_ci(head.get(f'{cost}_multiplier_at_largest_ci95'))}"
            )
    return lines


def run_fit(args: argparse.Namespace) -> int:
    from switchall.analysis.plots import write_plots
    from switchall.analysis.scaling import finished, fit_sweep
    from switchall.fileio import write_atomic
    from switchall.sweep.results import read_results

    out = Path(args.dir)
    rows = read_results(out)
    fits = fit_sweep(rows, n_boot=args.bootstrap, seed=args.seed)
    write_atomic(out / "fits.json", json.dumps(fits, indent=1).encode())
    plots = write_plots(finished(rows), fits, out / "plots")
    for line in summary(fits):
        print(line)
    print(f"wrote {out / 'fits.json'}")
    for p in plots:
        print(f"wrote {p}")
    return 0


def register(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("scaling", help="fit scaling laws to a sweep's results")
    sub = p.add_subparsers(dest="scaling_verb", required=True, metavar="ACTION")
    f = sub.add_parser("fit", help="write DIR/fits.json and DIR/plots/*.png")
    f.add_argument("dir", help="a sweep directory (with results.json)")
    f.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples (0: none)")
    f.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    f.set_defaults(func=run_fit)
