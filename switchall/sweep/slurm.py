"""`switchall sweep run --slurm`: the points that are left, as one Slurm job array.

Each point trains in its own run directory, `DIR/points/NAME/`, the one the local runner uses,
so `sweep run` with or without `--slurm`, `sweep status` and `scaling fit` see the same runs and
states. The launcher (`switchall.launch.slurm.submit_array`) checks every point as it checks
any launched run (config, layout for the job's world size, dataset, run directory), writes its
`launch/config.yaml` and the array script `DIR/launch/array.sbatch`, and submits it. After
every attempt, the point's array task writes its `exit_code` and a line of `attempts.jsonl`
(`RunSpec.exit_file`, `attempts_file`): 0 finished, 3 stopped by a signal after a checkpoint
(and requeued: not a failure), anything else a failure. The runner reads the outcome off the
run directory exactly as for a local point; no Slurm accounting (sacct) is needed.

`slurm_job.json` in a point's directory names the array task that holds it. A point whose task
squeue still lists (queued, running, requeued) is neither submitted again nor run locally; a
job that squeue no longer lists (finished, cancelled, forgotten) holds nothing.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from switchall.configtools import ConfigError
from switchall.fileio import write_atomic
from switchall.launch.slurm import RunSpec, SlurmOptions, Submission, active_jobs, submit_array
from switchall.sweep.plan import PlannedPoint
from switchall.sweep.results import write_results
from switchall.sweep.runner import (
    check_hashes,
    check_valid,
    exit_code,
    point_dir,
    point_state,
    prepare_point,
    sweep_lock,
    tail,
)

JOB_RECORD = "slurm_job.json"


@dataclass
class Held:
    """A point's array task that squeue still lists."""

    task: str
    """`JOB_i` (or `JOB` for a one-point submission), as squeue and scancel name it."""
    state: str
    """squeue's: PENDING, RUNNING, COMPLETING, REQUEUED, ..."""

    @property
    def running(self) -> bool:
        return self.state in ("RUNNING", "COMPLETING")

    def describe(self) -> str:
        word = "running" if self.running else "queued"
        usual = self.state in ("RUNNING", "PENDING")
        return f"{word} under job {self.task}" + ("" if usual else f" ({self.state})")


def job_record(out: Path, name: str) -> dict | None:
    try:
        record = json.loads((point_dir(out, name) / JOB_RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("task") else None


def held_points(out: Path, points: list[PlannedPoint], missing_ok: bool = False) -> dict:
    """{point name: Held} for the points whose recorded task squeue lists. `missing_ok`: where
    squeue is not installed no job can be running here (a local run of copied results)."""
    records = {p.name: r for p in points if (r := job_record(out, p.name))}
    if not records or (missing_ok and shutil.which("squeue") is None):
        return {}
    states = active_jobs([r["task"] for r in records.values()])
    return {
        n: Held(r["task"], states[r["task"]]) for n, r in records.items() if r["task"] in states
    }


def point_log(out: Path, name: str) -> Path:
    """The console of the point's latest attempt: its Slurm job's, or the local runner's."""
    record = job_record(out, name) or {}
    logs = [Path(f) for f in (record.get("console"), point_dir(out, name) / "train.log") if f]
    existing = [f for f in logs if f.is_file()]
    return max(existing, key=lambda f: f.stat().st_mtime) if existing else logs[0]


def submit_sweep(
    out: Path,
    points: list[PlannedPoint],
    opts: SlurmOptions,
    *,
    retry_failed: bool = False,
    dry_run: bool = False,
    log=print,
) -> Submission | None:
    """Submit the points that are neither done, failed (unless `retry_failed`) nor held by a
    live job as one array; None when there is nothing to submit."""
    check_valid(points)
    with sweep_lock(out):
        check_hashes(out, points)
        held = held_points(out, points, missing_ok=dry_run)
        todo = []
        for p in points:
            state = point_state(out, p)
            if p.name in held:
                log(f"{p.name}: {held[p.name].describe()}, not submitted again")
            elif state == "done":
                log(f"{p.name}: done, skipped")
            elif state == "failed" and not retry_failed:
                log(
                    f"{p.name}: FAILED before (exit code {exit_code(out, p.name)}), skipped; "
                    f"log {point_log(out, p.name)} (--retry-failed submits it again)"
                )
            else:
                verb = "resumes from its checkpoint" if state == "interrupted" else "starts"
                log(f"{p.name}: {verb}" + (" (retry)" if state == "failed" else ""))
                todo.append(p)
        if not todo:
            return None
        specs = []
        for p in todo:
            d = prepare_point(out, p)
            specs.append(
                RunSpec(
                    d / "planned.yaml",
                    [],
                    d,
                    exit_file=d / "exit_code",
                    attempts_file=d / "attempts.jsonl",
                )
            )
        sub = submit_array(specs, opts, out / "launch", dry_run=dry_run)
        if dry_run:
            return sub
        # A failed point that is retried keeps its old exit code until its first new attempt
        # ends: while its job is listed the job's state is what counts.
        for i, p in enumerate(todo):
            record = {
                "job_id": sub.job_id,
                "task": sub.task_id(i),
                "console": sub.console(i),
                "script": str(sub.script),
                "submitted": round(time.time(), 3),
            }
            write_atomic(point_dir(out, p.name) / JOB_RECORD, json.dumps(record).encode())
        write_results(out, points, point_state)
        return sub


def wait_for_sweep(out: Path, points: list[PlannedPoint], poll_s: float, log=print) -> None:
    """Until no point is held by a job squeue lists; each point's changes are logged. squeue
    failing now and then (a controller restarting) is waited out; ten times in a row is not."""
    seen: dict[str, str] = {}
    failures = 0
    while True:
        try:
            held = held_points(out, points)
            failures = 0
        except ConfigError as e:
            failures += 1
            if failures >= 10:
                raise
            log(f"{e} (will ask again)")
            time.sleep(poll_s)
            continue
        for p in points:
            now = held[p.name].describe() if p.name in held else point_state(out, p)
            if seen.get(p.name) != now and (p.name in seen or p.name in held):
                log(f"[{time.strftime('%H:%M:%S')}] {p.name}: {now}")
            seen[p.name] = now
        if not held:
            return
        time.sleep(poll_s)


def _last_logged_step(run_dir: Path) -> int | None:
    """The step of the last training record of metrics.jsonl, from the file's tail only."""
    path = run_dir / "metrics.jsonl"
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - 16384))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if isinstance(r, dict) and "loss" in r and "step" in r:
            return int(r["step"])
    return None


def status_rows(out: Path, points: list[PlannedPoint], log=print) -> list[dict]:
    """Per point: name, state (done, failed, running, queued, interrupted, pending), detail."""
    try:
        held = held_points(out, points, missing_ok=True)
    except ConfigError as e:
        log(f"Slurm jobs not checked: {e}")
        held = {}
    rows = []
    for p in points:
        d, steps = point_dir(out, p.name), p.cfg.train.steps
        state = point_state(out, p)
        step = _last_logged_step(d)
        progress = f"step {step}/{steps}" if step is not None else ""
        if p.name in held:
            h = held[p.name]
            state = "running" if h.running else "queued"
            detail = f"job {h.task} ({h.state})" + (f", {progress}" if progress else "")
            if point_log(out, p.name).is_file():
                detail += f"; log {point_log(out, p.name)}"
        elif state == "failed":
            detail = f"exit code {exit_code(out, p.name)}; log {point_log(out, p.name)}"
        elif state == "interrupted":
            detail = f"{progress or 'checkpointed'}; resumes from its latest checkpoint"
        elif state == "done":
            detail = f"step {steps}/{steps}"
        else:
            detail = ""
        rows.append({"name": p.name, "state": state, "detail": detail})
    return rows


def report_failures(out: Path, points: list[PlannedPoint], log=print) -> None:
    for p in points:
        if point_state(out, p) == "failed":
            f = point_log(out, p.name)
            log(f"{p.name}: FAILED (exit code {exit_code(out, p.name)}); log {f}:")
            log("    " + tail(f).replace("\n", "\n    "))
