"""`DIR/results.csv` and `DIR/results.json`: one row per point, read off its run directory."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from switchall.fileio import write_atomic
from switchall.pretrain.metrics import read_metrics

COLUMNS = [
    "name",
    "size",
    "variant",
    "status",
    "config_hash",
    "params",
    "non_embedding_params",
    "active_params",
    "train_flops_per_token",
    "attn_macs",
    "attn_mem",
    "attn_macs_per_token",
    "attn_mem_model",
    "tokens",
    "train_flops",
    "steps",
    "steps_done",
    "tokens_seen",
    "train_flops_seen",
    "final_val_loss",
    "best_val_loss",
    "final_val_ppl",
    "wall_clock_s",
    "lr",
    "seed",
    "param_mismatch",
]


def _point_metrics(run_dir: Path, tokens_per_step: int) -> dict[str, Any]:
    path = run_dir / "metrics.jsonl"
    records = read_metrics(path) if path.is_file() else []
    val: dict[int, float] = {}
    train: dict[int, float] = {}
    for r in records:  # a resumed run's lines supersede earlier ones for the same step
        if "val_loss" in r:
            val[int(r["step"])] = float(r["val_loss"])
        elif "loss" in r and "step" in r:
            train[int(r["step"])] = float(r["loss"])
    steps_done = max([*train, *val], default=0)
    curve = [[s, s * tokens_per_step, v] for s, v in sorted(val.items())]
    train_curve = [[s, s * tokens_per_step, v] for s, v in sorted(train.items())]
    return {
        "steps_done": steps_done,
        "tokens_seen": steps_done * tokens_per_step,
        "val_curve": curve,
        "train_curve": train_curve,
    }


def _wall_clock(run_dir: Path) -> float:
    path = run_dir / "attempts.jsonl"
    if not path.is_file():
        return 0.0
    return round(sum(r.get("seconds", 0.0) for r in read_metrics(path)), 1)


def point_result(out: Path, p, state: str) -> dict[str, Any]:
    run_dir = out / "points" / p.name
    row = {**p.row(), "status": state}
    c = p.counts
    m = _point_metrics(run_dir, c["batch_size"] * c["seq_len"])
    final = m["val_curve"][-1][2] if m["val_curve"] and state == "done" else None
    row.update(
        steps_done=m["steps_done"],
        tokens_seen=m["tokens_seen"],
        train_flops_seen=m["tokens_seen"] * c["train_flops_per_token"],
        final_val_loss=final,
        best_val_loss=min((v for _, _, v in m["val_curve"]), default=None),
        final_val_ppl=None if final is None else math.exp(final),
        wall_clock_s=_wall_clock(run_dir),
        val_curve=m["val_curve"],
        train_curve=m["train_curve"],
        run_dir=str(run_dir),
    )
    return row


def write_results(out: Path, points, state_of) -> list[dict[str, Any]]:
    rows = [point_result(out, p, state_of(out, p)) for p in points]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS})
    write_atomic(out / "results.csv", buf.getvalue().encode())
    write_atomic(out / "results.json", json.dumps({"points": rows}, indent=1).encode())
    return rows


def read_results(out: str | Path) -> list[dict[str, Any]]:
    path = Path(out) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no sweep results (run `switchall sweep run` first)")
    return json.loads(path.read_text())["points"]
