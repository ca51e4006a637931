"""`switchall launch slurm CONFIG [CONFIG ...] [overrides ...] --run-dir DIR --nodes N ...`."""

from __future__ import annotations

import argparse
from pathlib import Path

from switchall.configtools import ConfigError

EPILOG = """\
One CONFIG: the run directory is DIR. Several: one job array, run i in DIR/<name of config i>,
the script in DIR/launch/. Overrides apply to every config. The script is written, printed
with --dry-run, else submitted; sbatch it again by hand at any time to continue the run.
"""


def register(verbs) -> None:
    p = verbs.add_parser("launch", help="run training as a Slurm job (or job array)")
    targets = p.add_subparsers(dest="target", required=True, metavar="TARGET")
    s = targets.add_parser(
        "slurm",
        help="check, write and submit a Slurm batch job",
        description="Check the run(s), write a batch script into DIR/launch/, submit it.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("items", nargs="+", metavar="CONFIG|OVERRIDE", help="YAML configs, key=value")
    s.add_argument("--run-dir", required=True, type=Path)
    s.add_argument("--nodes", type=int, default=1)
    shape = s.add_mutually_exclusive_group()
    shape.add_argument("--gpus-per-node", type=int, help="one rank per GPU")
    shape.add_argument("--tasks-per-node", type=int, help="CPU ranks per node (default 1)")
    s.add_argument("--cpus-per-task", type=int)
    s.add_argument("--partition")
    s.add_argument("--account")
    s.add_argument("--qos")
    s.add_argument("--time", help="time limit, e.g. 04:00:00")
    s.add_argument(
        "--signal-grace",
        type=int,
        default=120,
        metavar="SECONDS",
        help="warn this long before the time limit: checkpoint, stop, requeue (default 120)",
    )
    s.add_argument("--max-requeues", type=int, default=10, metavar="R", help="default 10")
    s.add_argument(
        "--sbatch-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="an extra sbatch option, e.g. --sbatch-arg=--exclusive (repeatable)",
    )
    s.add_argument("--job-name")
    s.add_argument(
        "--allow-config-change",
        action="store_true",
        help="let the job resume a run whose config.yaml differs in the run's mathematics",
    )
    s.add_argument("--dry-run", action="store_true", help="write and print the script only")
    s.set_defaults(func=run_launch_slurm)


def split_items(items: list[str]) -> tuple[list[str], list[str]]:
    """(configs, overrides): an item with `=` that is not an existing file is an override."""
    configs, overrides = [], []
    for item in items:
        (overrides if "=" in item and not Path(item).is_file() else configs).append(item)
    if not configs:
        raise ConfigError("", "no config given (a YAML file before the overrides)")
    return configs, overrides


def run_specs(configs: list[str], overrides: list[str], run_dir: Path):
    from switchall.launch.slurm import RunSpec

    if len(configs) == 1:
        return [RunSpec(configs[0], overrides, run_dir)], None
    names = [Path(c).stem for c in configs]
    if len(set(names)) != len(names):
        names = [f"{i:03d}-{n}" for i, n in enumerate(names)]
    specs = [RunSpec(c, overrides, run_dir / n) for c, n in zip(configs, names, strict=True)]
    return specs, run_dir / "launch"


def run_launch_slurm(args: argparse.Namespace) -> int:
    from switchall.launch.slurm import SlurmOptions, submit_array

    configs, overrides = split_items(args.items)
    specs, launch_dir = run_specs(configs, overrides, args.run_dir)
    opts = SlurmOptions(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        tasks_per_node=args.tasks_per_node,
        cpus_per_task=args.cpus_per_task,
        partition=args.partition,
        account=args.account,
        qos=args.qos,
        time=args.time,
        signal_grace=args.signal_grace,
        max_requeues=args.max_requeues,
        sbatch_args=args.sbatch_arg,
        job_name=args.job_name,
        allow_config_change=args.allow_config_change,
    )
    sub = submit_array(specs, opts, launch_dir, dry_run=args.dry_run)
    if args.dry_run:
        print(sub.script.read_text(), end="")
        print(f"# dry run: written to {sub.script}; submit it with: sbatch {sub.script}")
        return 0
    job = sub.job_id
    print(f"submitted job {job}: {sub.script}")
    if len(sub.runs) == 1:
        print(f"rank 0's console: {sub.output.replace('%j', job)}")
        print(f"rank logs: {sub.runs[0]}/logs/attempt-*-job{job}/rank-*.log")
    else:
        for i, run in enumerate(sub.runs):
            print(f"task {i}: {run}, console {run}/logs/slurm-{job}_{i}.out")
    print(f"stop it with: scancel {job}  (the run resumes when you sbatch {sub.script} again)")
    return 0
