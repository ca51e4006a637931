"""`switchall launch slurm`: check a run (or many), write its batch script, submit it.

    from switchall.launch.slurm import RunSpec, SlurmOptions, submit_array
    job = submit_array(
        [RunSpec("configs/a.yaml", ["train.steps=1000"], "runs/sweep/a"), ...],
        SlurmOptions(nodes=1, gpus_per_node=8, time="04:00:00"),
        launch_dir="runs/sweep/launch",
    )
    job.job_id, job.script, job.output

Before anything is submitted, every run's config is loaded and validated, its layout checked
for the world size the job will get (nodes x GPUs, or nodes x tasks on CPU), its dataset read
and its run directory checked (another config's run, a run in use). Each run directory then
gets `launch/config.yaml`, the resolved config the job trains (relative local data paths made
absolute), and `logs/`. One run is one job; several runs are one job array, task i training
run i. The script (see `sbatch_script`) is written to `launch_dir`, and `sbatch` submits it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from switchall.configtools import ConfigError, to_dict

DEFAULT_SIGNAL_GRACE_S = 120
DEFAULT_MAX_REQUEUES = 10
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


@dataclass
class RunSpec:
    """One run: a YAML config, `section.key=value` overrides, and its run directory."""

    config: str | Path
    overrides: list[str] = field(default_factory=list)
    run_dir: str | Path = ""


@dataclass
class SlurmOptions:
    """The job's resources and behaviour; each field is a `switchall launch slurm` flag."""

    nodes: int = 1
    gpus_per_node: int | None = None
    """GPUs (and ranks) per node; None: a CPU job with `tasks_per_node` ranks per node."""
    tasks_per_node: int | None = None
    cpus_per_task: int | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None
    """Time limit, as sbatch takes it: MM, HH:MM:SS, D-HH:MM:SS, ..."""
    signal_grace: int = DEFAULT_SIGNAL_GRACE_S
    """Seconds before the time limit at which the job is told to checkpoint and stop."""
    max_requeues: int = DEFAULT_MAX_REQUEUES
    sbatch_args: list[str] = field(default_factory=list)
    job_name: str | None = None
    array_parallel: int | None = None
    """At most this many array tasks at once (`--array=0-N%K`)."""
    allow_config_change: bool = False
    python: str = sys.executable

    @property
    def ranks_per_node(self) -> int:
        return self.gpus_per_node or self.tasks_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node

    @property
    def device_type(self) -> str:
        return "cuda" if self.gpus_per_node else "cpu"

    def validate(self) -> None:
        def need(ok: bool, flag: str, message: str) -> None:
            if not ok:
                raise ConfigError(flag, message)

        need(self.nodes >= 1, "--nodes", "must be >= 1")
        need(
            not (self.gpus_per_node and self.tasks_per_node),
            "--tasks-per-node",
            "give --gpus-per-node (one rank per GPU) or --tasks-per-node (CPU ranks), not both",
        )
        for flag, v in (
            ("--gpus-per-node", self.gpus_per_node),
            ("--tasks-per-node", self.tasks_per_node),
            ("--cpus-per-task", self.cpus_per_task),
            ("--array-parallel", self.array_parallel),
        ):
            need(v is None or v >= 1, flag, "must be >= 1")
        need(1 <= self.signal_grace <= 65535, "--signal-grace", "must be 1..65535 seconds")
        need(self.max_requeues >= 0, "--max-requeues", "must be >= 0")
        if self.time is not None:
            limit = time_limit_seconds(self.time)
            need(
                limit is None or limit > self.signal_grace,
                "--signal-grace",
                f"{self.signal_grace}s is not shorter than --time {self.time}",
            )
        for arg in self.sbatch_args:
            need("\n" not in arg and arg.startswith("-"), "--sbatch-arg", f"bad option {arg!r}")


def time_limit_seconds(text: str) -> int | None:
    """sbatch's --time forms (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) in seconds;
    None for UNLIMITED. A malformed one is a ConfigError naming --time."""
    if text.upper() in ("UNLIMITED", "INFINITE"):
        return None
    m = _TIME.match(text)
    if not m:
        raise ConfigError("--time", f"{text!r} is not a Slurm time (e.g. 04:00:00, 2-00:00:00)")
    days, a, b, c = m.groups()
    if days is not None:
        return int(days) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
    nums = [int(x) for x in (a, b, c) if x is not None]
    if len(nums) == 3:
        return nums[0] * 3600 + nums[1] * 60 + nums[2]
    return nums[0] * 60 + (nums[1] if len(nums) == 2 else 0)


def absolute_data_path(path: str) -> str:
    """A relative local dataset path made absolute (the job may start elsewhere); URLs,
    `pipe:` commands and `{}` templates are left as they are."""
    if "{}" in path or re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", path):
        return path
    return os.path.abspath(path)


@dataclass
class Submission:
    script: Path
    runs: list[Path]
    output: str
    """Where rank 0's console goes (an sbatch --output pattern for arrays: one file per run)."""
    job_id: str | None = None
    """None for a dry run."""


def _freeze_config(spec: RunSpec, opts: SlurmOptions, run_dir: Path) -> dict:
    """The resolved config of `spec`, checked for this job's world size and run directory."""
    from switchall.config import load_run_config
    from switchall.pretrain.runlock import holder_of
    from switchall.pretrain.startup import check_start

    cfg = load_run_config(spec.config, spec.overrides)
    cfg.data.path = absolute_data_path(cfg.data.path)
    if opts.device_type == "cpu" and cfg.train.device == "auto":
        cfg.train.device = "cpu"  # CPU ranks, whatever the nodes have
    if opts.device_type == "cuda" and not cfg.train.device.startswith(("auto", "cuda")):
        raise ConfigError("train.device", f"{cfg.train.device!r}, but the job asks for GPUs")
    check_start(
        cfg,
        run_dir,
        config_source=str(spec.config),
        auto_resume=True,
        allow_config_change=opts.allow_config_change,
        world_size=opts.world_size,
        device_type=opts.device_type,
        claim=False,
    )
    held = holder_of(run_dir)
    if held:
        raise ConfigError("--run-dir", held)
    return to_dict(cfg)


def submit_array(
    runs: list[RunSpec],
    opts: SlurmOptions,
    launch_dir: str | Path | None = None,
    *,
    dry_run: bool = False,
) -> Submission:
    """Check every run, write the batch script into `launch_dir` (default: the single run's
    `RUN/launch/`), submit it unless `dry_run`. Several runs become one job array."""
    from switchall.fileio import write_atomic
    from switchall.launch.sbatch_script import render

    if not runs:
        raise ConfigError("", "no run to launch")
    opts.validate()
    dirs = [Path(os.path.abspath(r.run_dir)) for r in runs]
    if len(set(dirs)) != len(dirs):
        raise ConfigError("--run-dir", "two runs of the array share a run directory")
    if launch_dir is None:
        if len(runs) > 1:
            raise ConfigError("", "an array of runs needs a launch_dir for its script")
        launch_dir = dirs[0] / "launch"
    launch_dir = Path(os.path.abspath(launch_dir))
    frozen = [_freeze_config(r, opts, d) for r, d in zip(runs, dirs, strict=True)]
    array = len(runs) > 1
    script = launch_dir / ("array.sbatch" if array else "job.sbatch")
    output = str(launch_dir / "slurm-%A_%a.out") if array else str(dirs[0] / "logs/slurm-%j.out")
    sbatch = _sbatch_options(opts, runs, dirs, output)
    for d, tree in zip(dirs, frozen, strict=True):
        (d / "launch").mkdir(parents=True, exist_ok=True)
        (d / "logs").mkdir(parents=True, exist_ok=True)
        write_atomic(d / "launch/config.yaml", yaml.safe_dump(tree, sort_keys=False).encode())
    launch_dir.mkdir(parents=True, exist_ok=True)
    shape = (
        f"{opts.nodes} node(s) x {opts.ranks_per_node} "
        f"{'GPU rank(s)' if opts.gpus_per_node else 'CPU rank(s)'} = {opts.world_size} ranks"
        + (f"; array of {len(runs)} runs" if array else "")
    )
    text = render(
        script=str(script),
        sbatch=sbatch,
        python=opts.python,
        run_dirs=[str(d) for d in dirs],
        max_requeues=opts.max_requeues,
        shape=shape,
        pretrain_flags=["--allow-config-change"] if opts.allow_config_change else [],
        array=array,
    )
    write_atomic(script, text.encode())
    script.chmod(0o755)
    sub = Submission(script=script, runs=dirs, output=output)
    if dry_run:
        return sub
    sub.job_id = sbatch_submit(script)
    with open(launch_dir / "submissions.txt", "a") as f:
        f.write(f"{sub.job_id} {script}\n")
    return sub


def _sbatch_options(opts: SlurmOptions, runs, dirs, output: str) -> list[str]:
    name = opts.job_name or f"switchall-{dirs[0].name if len(dirs) == 1 else dirs[0].parent.name}"
    out = [
        f"--job-name={name}",
        f"--nodes={opts.nodes}",
        f"--ntasks-per-node={opts.ranks_per_node}",
    ]
    if opts.gpus_per_node:
        out.append(f"--gpus-per-node={opts.gpus_per_node}")
    for flag, value in (
        ("cpus-per-task", opts.cpus_per_task),
        ("partition", opts.partition),
        ("account", opts.account),
        ("qos", opts.qos),
        ("time", opts.time),
    ):
        if value is not None:
            out.append(f"--{flag}={value}")
    if len(runs) > 1:
        throttle = f"%{opts.array_parallel}" if opts.array_parallel else ""
        out.append(f"--array=0-{len(runs) - 1}{throttle}")
    out += [
        f"--signal=B:USR1@{opts.signal_grace}",
        "--requeue",
        "--open-mode=append",
        f"--output={output}",
        *opts.sbatch_args,
    ]
    return out


def sbatch_submit(script: Path) -> str:
    """`sbatch --parsable SCRIPT`; the job id. Errors name sbatch's own message."""
    try:
        proc = subprocess.run(
            ["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=120
        )
    except FileNotFoundError:
        raise ConfigError("", "sbatch is not on PATH: is this a Slurm login node?") from None
    if proc.returncode != 0:
        raise ConfigError("", f"sbatch {script} failed: {proc.stderr.strip() or proc.stdout}")
    return proc.stdout.strip().split(";")[0]
