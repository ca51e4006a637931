"""`switchall sweep run`: points -> run directories -> one `switchall pretrain` per point.

Layout of `--out DIR`:
- `DIR/points/NAME/`: the point's run directory (config.yaml, metrics.jsonl, checkpoints/ as
  `switchall pretrain` writes them) plus `planned.yaml` (the config it runs), `point.json` (its
  config hash and counts), `train.log` (every attempt's output), `exit_code` (the last
  attempt's) and `attempts.jsonl` (start, seconds and exit code of each attempt);
- `DIR/results.csv`, `DIR/results.json`: one row per point, rewritten after every point.

Resuming is read off the run directories: a point whose final checkpoint exists is done and
skipped; one with an earlier checkpoint (killed sweep, killed node) continues from it through
the trainer's `--resume`; one whose last attempt exited non-zero is failed, reported with its
log, and run again only with `--retry-failed`. A point's config hash is checked against the
plan, so an edited sweep file never resumes a run with another config.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import switchall
from switchall.config import dump_run_config
from switchall.configtools import ConfigError
from switchall.fileio import write_atomic
from switchall.pretrain.checkpoint import CheckpointManager
from switchall.sweep.backends import Backend, PointJob
from switchall.sweep.plan import PlannedPoint
from switchall.sweep.results import write_results

REPO_ROOT = Path(switchall.__file__).resolve().parents[1]


def point_dir(out: Path, name: str) -> Path:
    return out / "points" / name


def point_state(out: Path, p: PlannedPoint) -> str:
    """done | failed | interrupted | pending, from the point's run directory alone."""
    d = point_dir(out, p.name)
    steps = CheckpointManager(d / "checkpoints").complete()
    if steps and steps[-1][0] >= p.cfg.train.steps:
        return "done"
    exit_file = d / "exit_code"
    if exit_file.is_file() and exit_file.read_text().strip() not in ("", "0"):
        return "failed"
    return "interrupted" if steps else "pending"


def exit_code(out: Path, name: str) -> int | None:
    f = point_dir(out, name) / "exit_code"
    try:
        return int(f.read_text().strip())
    except (OSError, ValueError):
        return None


@contextmanager
def sweep_lock(out: Path) -> Iterator[None]:
    """One `sweep run` per output directory at a time."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".sweep.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError("--out", f"another `switchall sweep run` is using {out}") from None
        yield


def _check_hash(out: Path, p: PlannedPoint) -> None:
    meta = point_dir(out, p.name) / "point.json"
    if not meta.is_file():
        return
    old = json.loads(meta.read_text()).get("config_hash")
    if old != p.config_hash:
        raise ConfigError(
            f"point {p.name}",
            f"{meta.parent} was run with config hash {old}, the sweep file now gives "
            f"{p.config_hash}; restore the sweep file, or use a new --out (or delete that "
            "point's directory to rerun it)",
        )


def make_job(out: Path, p: PlannedPoint) -> PointJob:
    d = point_dir(out, p.name)
    d.mkdir(parents=True, exist_ok=True)
    dump_run_config(p.cfg, d / "planned.yaml")
    meta = {"name": p.name, "config_hash": p.config_hash, **p.row()}
    write_atomic(d / "point.json", json.dumps(meta, indent=1).encode())
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    # --resume also starts a point that has no checkpoint yet (the trainer says so).
    command = [
        sys.executable,
        "-m",
        "switchall",
        "pretrain",
        str(d / "planned.yaml"),
        "--run-dir",
        str(d),
        "--resume",
    ]
    return PointJob(p.name, d, command, env, d / "train.log", d / "exit_code")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def run_sweep(
    out: Path,
    points: list[PlannedPoint],
    backend: Backend,
    retry_failed: bool = False,
    log=print,
) -> dict[str, list[str]]:
    """Run what is left of the sweep; returns point names by final state."""
    invalid = [p for p in points if not p.valid]
    if invalid:
        raise ConfigError(
            "sweep", "invalid points: " + "; ".join(f"{p.name}: {p.error}" for p in invalid)
        )
    with sweep_lock(out):
        for p in points:
            _check_hash(out, p)
        states = {p.name: point_state(out, p) for p in points}
        todo = []
        for p in points:
            s = states[p.name]
            if s == "done":
                log(f"{p.name}: done, skipped")
            elif s == "failed" and not retry_failed:
                log(
                    f"{p.name}: FAILED before (exit code {exit_code(out, p.name)}), skipped; "
                    f"log {point_dir(out, p.name) / 'train.log'} (--retry-failed runs it again)"
                )
            else:
                log(
                    f"{p.name}: {'resuming' if s == 'interrupted' else 'starting'}"
                    + (" (retry)" if s == "failed" else "")
                )
                if s == "failed":
                    (point_dir(out, p.name) / "exit_code").unlink()
                todo.append(p)
        by_name = {p.name: p for p in points}
        write_results(out, points, point_state)

        def on_done(job: PointJob, code: int, seconds: float) -> None:
            attempt = {"time": round(time.time(), 3), "seconds": round(seconds, 3), "exit": code}
            with open(job.run_dir / "attempts.jsonl", "a") as f:
                f.write(json.dumps(attempt) + "\n")
            state = point_state(out, by_name[job.name])
            if code == 0 and state == "done":
                log(f"{job.name}: done in {seconds:.0f} s")
            elif code == 0:
                log(f"{job.name}: stopped at a checkpoint after {seconds:.0f} s; resumes next run")
            else:
                log(f"{job.name}: FAILED (exit code {code}) after {seconds:.0f} s; log {job.log}:")
                log("    " + _tail(job.log).replace("\n", "\n    "))
            write_results(out, points, point_state)

        backend.run([make_job(out, p) for p in todo], on_done)
        final: dict[str, list[str]] = {}
        for p in points:
            final.setdefault(point_state(out, p), []).append(p.name)
        write_results(out, points, point_state)
        return final
