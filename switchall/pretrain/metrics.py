"""Metrics: console lines, `RUN/metrics.jsonl`, and wandb (offline by default).

metrics.jsonl gets one JSON object per logged step (`step`, `loss`, `lr`, `tokens_per_s`, ...)
and per validation (`step`, `val_loss`, `val_ppl`), each line flushed and fsynced as written
so a crash loses at most the line being written. That torn last line is cut off when the file
is opened again, so the next record starts on a line of its own.

A resumed run first drops the records that the interrupted run wrote past the checkpoint it
resumes from (they are written again, identically, as training redoes those steps), so the
file holds exactly one record per logged step and validation, like an uninterrupted run's,
plus `{"event": "resume", "step": N}` lines. A fresh start in a directory without a checkpoint
drops all earlier records. The file is rewritten atomically for that.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from switchall.pretrain.config import LoggingConfig


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl, skipping a torn last line from a crash."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def latest_per_step(records: list[dict[str, Any]], key: str) -> dict[int, float]:
    """step -> the last value of `key` logged for it (a resumed run's lines win)."""
    out: dict[int, float] = {}
    for r in records:
        if key in r and "step" in r:
            out[int(r["step"])] = r[key]
    return out


def _cut_torn_tail(path: Path) -> None:
    """Truncate a file to its last complete line (a crash mid-write leaves a partial one)."""
    if not path.is_file():
        return
    with open(path, "rb+") as f:
        end = pos = f.seek(0, os.SEEK_END)
        keep = 0
        while pos > 0:  # scan back, in blocks, for the last newline
            start = max(0, pos - 65536)
            f.seek(start)
            nl = f.read(pos - start).rfind(b"\n")
            if nl >= 0:
                keep = start + nl + 1
                break
            pos = start
        if keep < end:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())


def _kept(line: bytes, step: int) -> bool:
    """A record an interrupted run wrote stays if a run resumed at `step` will not write it:
    steps before `step`, and `step` itself unless it is 0 (a fresh start validates step 0)."""
    try:
        record = json.loads(line)
    except ValueError:
        return False
    s = record.get("step") if isinstance(record, dict) else None
    if not isinstance(s, (int, float)):
        return True
    return s < step or (s == step and step > 0)


class MetricsLogger:
    """Writes metrics on the process that owns logging (rank 0); a no-op elsewhere."""

    def __init__(
        self,
        run_dir: Path,
        cfg: LoggingConfig,
        enabled: bool = True,
        run_config: dict[str, Any] | None = None,
    ):
        self.enabled, self.cfg = enabled, cfg
        self.wandb_run = None
        self._file = None
        if not enabled:
            return
        self.path = run_dir / "metrics.jsonl"
        _cut_torn_tail(self.path)
        self._inherited = self.path.stat().st_size if self.path.exists() else 0
        """Bytes written by earlier runs: only those are candidates for `rewind`."""
        self._file = open(self.path, "a", buffering=1)
        if cfg.wandb != "disabled":
            self.wandb_run = self._start_wandb(run_dir, run_config)

    def _start_wandb(self, run_dir: Path, run_config: dict[str, Any] | None):
        import wandb  # slow import, only when used

        id_file = run_dir / "wandb_id.txt"
        if id_file.is_file():
            run_id = id_file.read_text().strip()
        else:
            run_id = secrets.token_hex(8)  # wandb ids: lowercase letters and digits
            id_file.write_text(run_id)
        return wandb.init(
            project=self.cfg.project,
            name=self.cfg.name or run_dir.name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            mode=self.cfg.wandb,
            config=run_config,
            # wandb's own banners would interleave with the progress lines; close() names the
            # run directory instead.
            settings=wandb.Settings(silent=True),
        )

    def rewind(self, step: int) -> int:
        """Drop the earlier runs' records that a run continuing at `step` writes again (see
        the module docstring); records this logger wrote stay. Returns how many it dropped."""
        if not self.enabled or self._file is None or not self._inherited:
            return 0
        data = self.path.read_bytes()
        old, new = data[: self._inherited], data[self._inherited :]
        lines = old.splitlines(keepends=True)
        kept = [line for line in lines if _kept(line, step)]
        if len(kept) == len(lines):
            return 0
        from switchall.fileio import write_atomic

        self._file.close()
        write_atomic(self.path, b"".join(kept) + new)
        self._inherited = sum(map(len, kept))
        self._file = open(self.path, "a", buffering=1)
        return len(lines) - len(kept)

    def log(self, record: dict[str, Any], console: str | None = None) -> None:
        if not self.enabled:
            return
        record = {**record, "time": round(time.time(), 3)}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        if self.wandb_run is not None and "step" in record:
            data = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
            self.wandb_run.log(data, step=int(record["step"]))
        if console and self.cfg.console:
            print(console, file=sys.stdout, flush=True)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.wandb_run is not None:
            run_dir = Path(self.wandb_run.dir).parent
            self.wandb_run.finish()
            self.wandb_run = None
            if self.cfg.console and self.cfg.wandb == "offline":
                print(f"wandb offline run; to upload it: wandb sync {run_dir}", flush=True)
