"""Sweeps: planning and parameter matching (spec §1.5), and a sweep that is killed and resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from switchall.cli import main as cli_main
from switchall.configtools import ConfigError
from switchall.pretrain.metrics import read_metrics
from switchall.sweep.plan import plan_sweep

REPO = Path(__file__).resolve().parents[2]
SWEEPS = REPO / "configs" / "sweeps"


@pytest.mark.parametrize("name", ["c4", "wt103", "pes2o", "enwik8", "demo"])
def test_every_point_of_the_sweeps_is_matched_within_half_a_percent(name):
    sweep, points = plan_sweep(SWEEPS / f"{name}.yaml")
    assert points and all(p.valid for p in points), [p.error for p in points if not p.valid]
    dense = {p.size: p for p in points if p.cfg.model.variant == "transformer"}
    for p in points:
        target = dense[p.size].counts["non_embedding_params"]
        assert abs(p.counts["non_embedding_params"] - target) <= 0.005 * target, p.name
        if p.cfg.model.uses_switchhead and p.size in ("47m", "41m"):
            assert p.cfg.model.routing_init == "row_std"  # the paper's configs, as trained


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_invalid_points_are_named(tmp_path, capsys):
    sweep = _write(
        tmp_path / "bad.yaml",
        f"""
base: {REPO}/configs/demo_transformer.yaml
sizes:
  s: {{d_model: 64, n_layers: 2, n_heads: 2, d_head: 32, d_ff: 256}}
variants:
  transformer: {{}}
  switchhead: {{model: {{attention: {{n_heads: 3, n_experts: auto, k: 1}}}}}}
  switchall: {{model: {{attention: {{n_heads: 2, n_experts: 2, k: 3}}}}}}
""",
    )
    _, points = plan_sweep(sweep)
    errors = {p.name: p.error for p in points}
    assert errors["s-transformer"] is None
    assert "n_heads (3) to divide" in errors["s-switchhead"]
    assert "attention.k" in errors["s-switchall"]
    assert cli_main(["sweep", "plan", str(sweep)]) == 2
    assert "INVALID" in capsys.readouterr().out
    assert cli_main(["sweep", "run", str(sweep), "--out", str(tmp_path / "out")]) == 2
    assert "invalid points: s-switchhead" in capsys.readouterr().err
    assert not (tmp_path / "out" / "points").exists()  # nothing ran
    with pytest.raises(ConfigError, match="unknown size"):
        plan_sweep(_write(tmp_path / "b2.yaml", sweep.read_text() + "axes: {size: [xl]}\n"))


def _sweep_file(tmp_path: Path, data: Path) -> Path:
    # Point `b` is slow enough (60 steps) to be killed between its checkpoints; `c` cannot
    # find its data and fails.
    return _write(
        tmp_path / "tiny.yaml",
        f"""
base: {REPO}/configs/demo_transformer.yaml
overrides: [data.path={data}, model.vocab_size=400, model.seq_len=16, train.batch_size=4,
            train.log_every=5, train.ckpt_every=10, train.eval_batches=2, logging.wandb=disabled,
            optim.warmup_steps=0]
sizes:
  a: {{d_model: 32, n_layers: 2, n_heads: 2, d_head: 16, d_ff: 64}}
variants:
  transformer: {{}}
  switchall:
    model: {{attention: {{n_heads: 1, n_experts: 2, k: 1, rope_fraction: 0.0}},
             moe: {{expert_size: 16, k: 2}}}}
points:
  - {{name: a, size: a, variant: transformer, overrides: [train.steps=6]}}
  - {{name: b, size: a, variant: switchall, overrides: [train.steps=60, train.batch_size=16]}}
  - {{name: c, size: a, variant: transformer, overrides: [train.steps=4, data.path={data}-gone]}}
""",
    )


def _run(sweep: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "switchall", "sweep", "run", str(sweep), "--out", str(out), *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)


def _attempts(out: Path, name: str) -> int:
    path = out / "points" / name / "attempts.jsonl"
    return len(read_metrics(path)) if path.is_file() else 0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sweep_is_killed_resumes_and_reports_failures(tiny_dataset, tmp_path):
    sweep, out = _sweep_file(tmp_path, tiny_dataset), tmp_path / "out"
    cmd = [sys.executable, "-m", "switchall", "sweep", "run", str(sweep), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    runner = subprocess.Popen(
        cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    ckpts = out / "points" / "b" / "checkpoints"
    deadline = time.time() + 240
    while not (ckpts.is_dir() and any(p.name.startswith("step_") for p in ckpts.iterdir())):
        assert runner.poll() is None and time.time() < deadline, "point b never checkpointed"
        time.sleep(0.02)
    runner.send_signal(signal.SIGKILL)  # the whole sweep dies, its trainer with it
    runner.wait(timeout=30)
    time.sleep(1.0)
    state = json.loads((out / "results.json").read_text())["points"]
    assert [p["status"] for p in state] == ["done", "pending", "pending"]  # written before b ran
    assert _attempts(out, "a") == 1 and _attempts(out, "b") == 0
    first = read_metrics(out / "points" / "b" / "metrics.jsonl")
    assert first and first[-1].get("step", 0) < 60

    result = _run(sweep, out)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "a: done, skipped" in result.stdout
    assert "b: resuming" in result.stdout
    assert "c: FAILED (exit code 2)" in result.stdout and "data error" in result.stdout
    assert _attempts(out, "a") == 1  # not redone
    b = read_metrics(out / "points" / "b" / "metrics.jsonl")
    resumed = [r for r in b if r.get("event") == "resume"]
    assert len(resumed) == 1 and resumed[0]["step"] >= 10
    steps = [r for r in b if "loss" in r]
    assert steps[-1]["step"] == 60 and steps[-1]["tokens_seen"] == 60 * 16 * 16
    assert "load/mlp0/overload" in steps[-1] and steps[-1]["load/mlp0/overload"] >= 1.0

    rows = {r["name"]: r for r in json.loads((out / "results.json").read_text())["points"]}
    assert rows["a"]["status"] == rows["b"]["status"] == "done"
    assert rows["c"]["status"] == "failed"
    assert rows["b"]["final_val_loss"] == b[-1]["val_loss"]
    assert rows["b"]["tokens_seen"] == 60 * 16 * 16
    csv = (out / "results.csv").read_text().splitlines()
    assert csv[0].startswith("name,size,variant,status,config_hash,params") and len(csv) == 4

    again = _run(sweep, out)  # failed points are not retried unless asked
    assert "c: FAILED before (exit code 2), skipped" in again.stdout
    assert _attempts(out, "c") == 1 and _attempts(out, "b") == 1
    retry = _run(sweep, out, "--retry-failed")
    assert "c: starting (retry)" in retry.stdout and _attempts(out, "c") == 2
