"""Metrics: console lines, `RUN/metrics.jsonl`, and wandb (offline by default).

metrics.jsonl gets one JSON object per logged step (`step`, `loss`, `lr`, `tokens_per_s`, ...)
and per validation (`step`, `val_loss`, `val_ppl`), each line flushed and fsynced as written
so a crash loses at most the line being written. A resumed run appends; its first line is
`{"event": "resume", "step": N}` and later lines for a step supersede earlier ones.
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
        self._file = open(run_dir / "metrics.jsonl", "a", buffering=1)
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
