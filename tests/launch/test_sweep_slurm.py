"""`switchall sweep run --slurm`: a sweep's points as one job array on the real two-node test
cluster (`slurm_cluster`, the session's one), in the sweep's own point directories.

A tiny two-point sweep submitted with `--wait` ends with every point done and results written
(and a local `sweep run` then finds nothing to do); a submission while the array is queued
submits nothing twice and a local run leaves the points to it, while a job that is gone (or
never existed) holds nothing; `--dry-run` writes the array script and submits nothing."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

import switchall.launch.slurm as launch_slurm
from switchall.cli import main as cli_main
from switchall.sweep.plan import plan_sweep
from switchall.sweep.runner import point_state
from tests.launch.helpers import REPO

pytestmark = pytest.mark.timeout(180)
NAMES = ["a-transformer", "a-switchall"]


def sweep_file(tmp_path: Path, data: Path, steps: int = 6) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(
        f"""
base: {REPO}/configs/demo_transformer.yaml
overrides: [data.path={data}, model.vocab_size=256, model.seq_len=16, train.batch_size=4,
            train.log_every=2, train.ckpt_every=3, train.eval_batches=2, logging.wandb=disabled,
            optim.warmup_steps=0, train.steps={steps}]
sizes:
  a: {{d_model: 32, n_layers: 2, n_heads: 2, d_head: 16, d_ff: 64}}
variants:
  transformer: {{}}
  switchall:
    model: {{attention: {{n_heads: 1, n_experts: 2, k: 1, rope_fraction: 0.0}},
             moe: {{expert_size: 16, k: 2}}}}
axes: {{size: [a], variant: [transformer, switchall]}}
"""
    )
    return path


def sweep(capsys, *args: str) -> tuple[int, str]:
    code = cli_main(["sweep", *args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.fixture
def cluster_env(slurm, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", slurm.env["SLURM_CONF"])
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return slurm


def record(out: Path, name: str) -> dict:
    return json.loads((out / "points" / name / "slurm_job.json").read_text())


@pytest.mark.slow
def test_a_sweep_on_slurm_waits_for_its_array_and_writes_results(
    cluster_env, launch_dataset, tmp_path, capsys
):
    spec, out = sweep_file(tmp_path, launch_dataset), tmp_path / "out"
    flags = ["--slurm", "--nodes=1", "--tasks-per-node=1", "--signal-grace=30"]
    wait = ["--wait", "--poll-seconds=0.5"]
    code, text = sweep(capsys, "run", str(spec), "--out", str(out), *flags, *wait)
    assert code == 0, text
    job = record(out, NAMES[0])["job_id"]
    assert f"submitted job {job} (2 point(s))" in text
    assert "a-switchall: done" in text and "sweep tiny: 2 done" in text
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["name"], r["status"]) for r in rows] == [(n, "done") for n in NAMES]
    for i, (name, row) in enumerate(zip(NAMES, rows, strict=True)):
        d = out / "points" / name
        assert record(out, name)["task"] == f"{job}_{i}"
        assert (d / "exit_code").read_text() == "0\n"  # written by the array task
        attempts = [json.loads(x) for x in (d / "attempts.jsonl").read_text().splitlines()]
        assert [(a["exit"], a["job"]) for a in attempts] == [(0, f"{job}_{i}")]
        assert float(row["wall_clock_s"]) > 0 and int(row["steps_done"]) == 6
        assert float(row["final_val_loss"]) > 0
        assert "the run is finished" in (d / f"logs/slurm-{job}_{i}.out").read_text()
    # The same run directories for the local runner and `sweep status`: nothing left to do.
    code, text = sweep(capsys, "run", str(spec), "--out", str(out))
    assert code == 0 and text.count("done, skipped") == 2, text
    code, text = sweep(capsys, "status", str(spec), "--out", str(out))
    assert code == 0 and text.count(" done ") == 2 and "2 done" in text, text
    code, text = sweep(capsys, "run", str(spec), "--out", str(out), *flags)
    assert "nothing to submit" in text
    assert len((out / "launch/submissions.txt").read_text().splitlines()) == 1


@pytest.mark.slow
def test_a_queued_array_is_not_submitted_twice(cluster_env, launch_dataset, tmp_path, capsys):
    slurm = cluster_env
    spec, out = sweep_file(tmp_path, launch_dataset), tmp_path / "out"
    # A record of a job that Slurm never had (or forgot) holds nothing.
    (out / "points" / NAMES[0]).mkdir(parents=True)
    (out / "points" / NAMES[0] / "slurm_job.json").write_text('{"task": "987654_0"}')
    held = ["run", str(spec), "--out", str(out), "--slurm", "--sbatch-arg=--hold"]
    code, text = sweep(capsys, *held)
    assert code == 0 and text.count(": starts") == 2, text
    job = record(out, NAMES[0])["job_id"]
    tasks = slurm.run("squeue", "-h", "-r", "-o", "%i %T").split("\n")
    assert sorted(t for t in tasks if t) == [f"{job}_0 PENDING", f"{job}_1 PENDING"]

    code, text = sweep(capsys, *held)
    assert code == 0 and "nothing to submit" in text, text
    assert f"a-switchall: queued under job {job}_1, not submitted again" in text
    assert len((out / "launch/submissions.txt").read_text().splitlines()) == 1
    code, text = sweep(capsys, "run", str(spec), "--out", str(out))  # locally: left to the job
    assert text.count("left to it") == 2 and not list(out.glob("points/*/train.log")), text
    code, text = sweep(capsys, "status", str(spec), "--out", str(out))
    assert f"queued       job {job}_0 (PENDING)" in text and "2 queued" in text, text

    slurm.run("scancel", job)  # gone: the points are pending again and submitted again
    code, text = sweep(capsys, "status", str(spec), "--out", str(out))
    assert "2 pending" in text, text
    code, text = sweep(capsys, *held)
    again = record(out, NAMES[1])["job_id"]
    assert code == 0 and again != job and f"submitted job {again}" in text, text
    slurm.run("scancel", again)


def test_dry_run_writes_the_array_script_and_submits_nothing(
    launch_dataset, tmp_path, capsys, monkeypatch
):
    def no_sbatch(script):
        raise AssertionError("a dry run called sbatch")

    monkeypatch.setattr(launch_slurm, "sbatch_submit", no_sbatch)
    spec, out = sweep_file(tmp_path, launch_dataset), tmp_path / "out"
    flags = ["--slurm", "--nodes=2", "--tasks-per-node=1", "--array-parallel=1", "--dry-run"]
    code, text = sweep(capsys, "run", str(spec), "--out", str(out), *flags, "--time=01:00:00")
    assert code == 0, text
    script = out / "launch/array.sbatch"
    body = script.read_text()
    assert body in text and f"{script} written for 2 point(s), nothing submitted" in text
    for line in [
        "#SBATCH --job-name=switchall-sweep-tiny",
        "#SBATCH --nodes=2",
        "#SBATCH --array=0-1%1",
        "#SBATCH --time=01:00:00",
        "#SBATCH --requeue",
        *(f"  {out}/points/{n}\n" for n in NAMES),
        *(f"  {out}/points/{n}/exit_code\n" for n in NAMES),
        'record "$rc"',
    ]:
        assert line in body, line
    for name in NAMES:  # checked and written like any launched run; nothing recorded
        d = out / "points" / name
        assert (d / "launch/config.yaml").is_file() and (d / "planned.yaml").is_file()
        assert not (d / "slurm_job.json").exists()
    assert not (out / "launch/submissions.txt").exists()
    # A layout the job's world size cannot hold is refused by the launcher's checks, before
    # any script or job config is written.
    bad = ["--slurm", "--nodes=1", "--tasks-per-node=3", "--dry-run"]
    code, text = sweep(capsys, "run", str(spec), "--out", str(tmp_path / "o2"), *bad)
    assert code == 2 and "train.batch_size: 4 does not split evenly over 3" in text, text
    assert not list((tmp_path / "o2").glob("**/*.sbatch"))
    assert not list((tmp_path / "o2").glob("points/*/launch/config.yaml"))


def test_slurm_flags_need_slurm_and_stopped_points_are_not_failures(
    launch_dataset, tmp_path, capsys
):
    spec, out = sweep_file(tmp_path, launch_dataset), tmp_path / "out"
    code, text = sweep(capsys, "run", str(spec), "--out", str(out), "--nodes=2")
    assert code == 2 and "--nodes: needs --slurm" in text, text
    code, text = sweep(capsys, "run", str(spec), "--out", str(out), "--slurm", "--parallel=2")
    assert code == 2 and "--parallel: is for local runs" in text, text
    _, points = plan_sweep(spec)
    d = out / "points" / points[0].name
    d.mkdir(parents=True)
    for written, state in [("3\n", "pending"), ("2\n", "failed"), ("0\n", "pending")]:
        (d / "exit_code").write_text(written)  # 3: stopped by a signal after a checkpoint
        assert point_state(out, points[0]) == state, written
