"""`switchall sweep plan SWEEP [--json]` and `switchall sweep run SWEEP --out DIR`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def run_plan(args: argparse.Namespace) -> int:
    from switchall.sweep.plan import format_plan, plan_sweep

    sweep, points = plan_sweep(args.sweep)
    if args.json:
        print(json.dumps([p.row() for p in points]))
    else:
        print(format_plan(sweep, points))
    return 0 if all(p.valid for p in points) else 2


def run_run(args: argparse.Namespace) -> int:
    from switchall.sweep.backends import LocalBackend
    from switchall.sweep.plan import format_plan, plan_sweep
    from switchall.sweep.runner import run_sweep

    sweep, points = plan_sweep(args.sweep)
    print(format_plan(sweep, points), flush=True)
    out = Path(args.out)
    final = run_sweep(
        out,
        points,
        LocalBackend(args.parallel),
        retry_failed=args.retry_failed,
        log=lambda text: print(text, flush=True),
    )
    summary = ", ".join(f"{len(v)} {k}" for k, v in sorted(final.items()))
    print(f"sweep {sweep.name}: {summary}; results in {out / 'results.csv'}")
    return 0 if set(final) <= {"done"} else 1


def register(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("sweep", help="plan and run scaling-law sweeps")
    sub = p.add_subparsers(dest="sweep_verb", required=True, metavar="ACTION")
    plan = sub.add_parser("plan", help="validate, match and count every point; print the table")
    plan.add_argument("sweep", help="sweep file, e.g. configs/sweeps/demo.yaml")
    plan.add_argument("--json", action="store_true", help="print a JSON list of points")
    plan.set_defaults(func=run_plan)
    run = sub.add_parser(
        "run",
        help="run the points (resumable: done points are skipped, interrupted ones resumed)",
    )
    run.add_argument("sweep", help="sweep file")
    run.add_argument("--out", required=True, help="sweep directory (points/, results.csv)")
    run.add_argument("--parallel", type=int, default=1, help="points run at a time (local)")
    run.add_argument("--retry-failed", action="store_true", help="run failed points again")
    run.set_defaults(func=run_run)
