"""`switchall sweep plan SWEEP [--json]`, `switchall sweep run SWEEP --out DIR [--slurm ...]`
and `switchall sweep status SWEEP --out DIR`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from switchall.configtools import ConfigError


def run_plan(args: argparse.Namespace) -> int:
    from switchall.sweep.plan import format_plan, plan_sweep

    sweep, points = plan_sweep(args.sweep)
    if args.json:
        print(json.dumps([p.row() for p in points]))
    else:
        print(format_plan(sweep, points))
    return 0 if all(p.valid for p in points) else 2


def _say(text: str) -> None:
    print(text, flush=True)


def _check_flags(args: argparse.Namespace) -> None:
    """Slurm flags only with --slurm, --parallel only without."""
    if args.slurm:
        if args.parallel != 1:
            raise ConfigError("--parallel", "is for local runs; with --slurm use --array-parallel")
        if args.dry_run and args.wait:
            raise ConfigError("--wait", "a --dry-run submits nothing to wait for")
        return
    given = [k for k, v in args.slurm_defaults.items() if getattr(args, k) != v]
    given += [k for k in ("dry_run", "wait") if getattr(args, k)]
    if given:
        raise ConfigError("--" + given[0].replace("_", "-"), "needs --slurm")


def run_run(args: argparse.Namespace) -> int:
    from switchall.sweep.plan import format_plan, plan_sweep

    _check_flags(args)
    sweep, points = plan_sweep(args.sweep)
    print(format_plan(sweep, points), flush=True)
    out = Path(args.out)
    if args.slurm:
        return _run_slurm(args, sweep, points, out)
    from switchall.sweep.backends import LocalBackend
    from switchall.sweep.runner import run_sweep

    final = run_sweep(
        out, points, LocalBackend(args.parallel), retry_failed=args.retry_failed, log=_say
    )
    summary = ", ".join(f"{len(v)} {k}" for k, v in sorted(final.items()))
    print(f"sweep {sweep.name}: {summary}; results in {out / 'results.csv'}")
    return 0 if set(final) <= {"done"} else 1


def _run_slurm(args, sweep, points, out: Path) -> int:
    from switchall.launch.cli import slurm_options
    from switchall.sweep.results import write_results
    from switchall.sweep.runner import point_state
    from switchall.sweep.slurm import report_failures, submit_sweep, wait_for_sweep

    opts = slurm_options(args)
    opts.job_name = opts.job_name or f"switchall-sweep-{sweep.name}"
    sub = submit_sweep(
        out, points, opts, retry_failed=args.retry_failed, dry_run=args.dry_run, log=_say
    )
    status = f"switchall sweep status {args.sweep} --out {out}"
    if sub is None:
        print("nothing to submit")
    elif args.dry_run:
        print(sub.script.read_text(), end="")
        print(f"# dry run: {sub.script} written for {len(sub.runs)} point(s), nothing submitted")
        return 0
    else:
        print(f"submitted job {sub.job_id} ({len(sub.runs)} point(s)): {sub.script}")
        for i, run in enumerate(sub.runs):
            print(f"  {run.name}: task {sub.task_id(i)}, console {sub.console(i)}")
        print(f"rank logs: {out}/points/NAME/logs/attempt-NN-jobJOB/rank-R.log")
        print(f"progress: {status}; stop: scancel {sub.job_id} (points keep their checkpoints)")
    if args.wait:
        wait_for_sweep(out, points, args.poll_seconds, log=_say)
    final: dict[str, list[str]] = {}
    for p in points:
        final.setdefault(point_state(out, p), []).append(p.name)
    if not args.wait:
        return 1 if "failed" in final and not args.retry_failed else 0
    write_results(out, points, point_state)
    report_failures(out, points, log=_say)
    summary = ", ".join(f"{len(v)} {k}" for k, v in sorted(final.items()))
    print(f"sweep {sweep.name}: {summary}; results in {out / 'results.csv'}")
    return 0 if set(final) <= {"done"} else 1


def run_status(args: argparse.Namespace) -> int:
    from switchall.sweep.plan import plan_sweep
    from switchall.sweep.slurm import status_rows

    _, points = plan_sweep(args.sweep)
    rows = status_rows(Path(args.out), [p for p in points if p.valid], log=_say)
    rows += [{"name": p.name, "state": "invalid", "detail": p.error} for p in points if not p.valid]
    width = max([len(r["name"]) for r in rows] + [5])
    for r in rows:
        print(f"{r['name']:<{width}}  {r['state']:<11}  {r['detail']}".rstrip())
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    print(", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    return 0


def register(verbs: argparse._SubParsersAction) -> None:
    from switchall.launch.cli import add_slurm_options

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
    slurm = run.add_argument_group("Slurm (the points as one job array)")
    slurm.add_argument("--slurm", action="store_true", help="submit the points as a job array")
    add_slurm_options(slurm)
    slurm.add_argument("--dry-run", action="store_true", help="write the script, submit nothing")
    slurm.add_argument("--wait", action="store_true", help="wait for the array, write results")
    slurm.add_argument(
        "--poll-seconds", type=float, default=30.0, help="squeue polls with --wait (default 30)"
    )
    defaults = argparse.ArgumentParser()
    add_slurm_options(defaults)
    run.set_defaults(func=run_run, slurm_defaults=vars(defaults.parse_args([])))
    status = sub.add_parser("status", help="per point: done, failed, running, queued, pending")
    status.add_argument("sweep", help="sweep file")
    status.add_argument("--out", required=True, help="sweep directory")
    status.set_defaults(func=run_status)
