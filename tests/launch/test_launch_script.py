"""`switchall launch slurm --dry-run` and `submit_array`: everything is checked for the job's
world size before anything is written or submitted; the script is plain, valid bash."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from switchall.cli import main as cli_main
from switchall.launch.slurm import RunSpec, SlurmOptions, submit_array, time_limit_seconds
from tests.launch.helpers import SWITCHALL, tiny

pytestmark = pytest.mark.timeout(60)
TRANSFORMER = SWITCHALL.replace("demo_switchall", "demo_transformer")


def launch(dataset, run, *extra, flags=()):
    return cli_main(
        ["launch", "slurm", SWITCHALL, *tiny(dataset, *extra), "--run-dir", str(run), *flags]
    )


def test_dry_run_writes_a_readable_script_and_submits_nothing(
    launch_dataset, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(launch_dataset.parent)
    run = tmp_path / "run"
    flags = [
        "--nodes=4",
        "--gpus-per-node=8",
        "--cpus-per-task=12",
        "--partition=gpu",
        "--account=lab",
        "--qos=high",
        "--time=04:00:00",
        "--signal-grace=300",
        "--max-requeues=5",
        "--sbatch-arg=--exclusive",
        "--dry-run",
    ]
    # A relative data path is made absolute: the job may start in another directory.
    ok = launch("prepared", run, "parallel.expert=2", "train.batch_size=64", flags=flags)
    assert ok == 0
    out = capsys.readouterr().out
    script = run / "launch/job.sbatch"
    assert out.startswith(script.read_text())
    for line in [
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --cpus-per-task=12",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=lab",
        "#SBATCH --qos=high",
        "#SBATCH --time=04:00:00",
        "#SBATCH --signal=B:USR1@300",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={run}/logs/slurm-%j.out",
        "#SBATCH --exclusive",
        "MAX_REQUEUES=5",
        "srun --kill-on-bad-exit=1",
        "--auto-resume",
    ]:
        assert line in out, line
    subprocess.run(["bash", "-n", str(script)], check=True)
    frozen = yaml.safe_load((run / "launch/config.yaml").read_text())
    assert frozen["data"]["path"] == str(launch_dataset)
    assert frozen["parallel"]["expert"] == 2
    assert not (run / "launch/submissions.txt").exists()


@pytest.mark.parametrize(
    "extra, flags, message",
    [
        (["parallel.expert=2"], ["--nodes=1"], "parallel.expert: 2 needs several processes"),
        (["parallel.expert=3"], ["--nodes=2"], "parallel.expert: 3 does not divide"),
        (["train.device=cpu"], ["--gpus-per-node=2"], "train.device: 'cpu', but the job asks"),
        ([], ["--time=00:01:00", "--signal-grace=120"], "--signal-grace: 120s is not shorter"),
        ([], ["--time=soon"], "--time: 'soon' is not a Slurm time"),
        (["data.path=/nonexistent"], [], "no dataset at /nonexistent"),
    ],
)
def test_mistakes_are_refused_before_anything_is_written(
    launch_dataset, tmp_path, capsys, extra, flags, message
):
    run = tmp_path / "run"
    assert launch(launch_dataset, run, *extra, flags=[*flags, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not run.exists()


def test_a_run_directory_of_another_config_is_refused_naming_both(launch_dataset, tmp_path, capsys):
    run = tmp_path / "run"
    assert launch(launch_dataset, run, "--dry-run") == 0
    capsys.readouterr()
    (run / "config.yaml").write_text((run / "launch/config.yaml").read_text())  # as a start does
    code = launch(launch_dataset, run, "model.d_model=48", flags=["--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and f"{run}/config.yaml" in err and SWITCHALL in err, err
    assert "model.d_model: 32 -> 48" in err


def test_several_configs_make_one_array(launch_dataset, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    overrides = [o for o in tiny(launch_dataset) if not o.startswith("model.attention.")]
    overrides = [o for o in overrides if not o.startswith(("model.moe.", "model.d_model"))]
    args = ["launch", "slurm", SWITCHALL, TRANSFORMER, *overrides, "model.vocab_size=256"]
    assert cli_main([*args, "--run-dir", str(sweep), "--nodes=1", "--dry-run"]) == 0
    text = (sweep / "launch/array.sbatch").read_text()
    assert "#SBATCH --array=0-1" in text
    assert f"  {sweep}/demo_switchall\n  {sweep}/demo_transformer\n" in text
    assert 'exec >>"$RUN_DIR/logs/slurm-${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}.out"' in text
    assert (sweep / "demo_transformer/launch/config.yaml").is_file()
    subprocess.run(["bash", "-n", str(sweep / "launch/array.sbatch")], check=True)


def test_submit_array_api(launch_dataset, tmp_path):
    """What a sweep driver calls: RunSpecs in, one array (dry run: no job id)."""
    runs = [
        RunSpec(SWITCHALL, tiny(launch_dataset, f"train.seed={s}"), tmp_path / f"seed{s}")
        for s in range(3)
    ]
    sub = submit_array(
        runs, SlurmOptions(nodes=1, time="1-00:00:00", array_parallel=2), tmp_path, dry_run=True
    )
    assert sub.job_id is None and sub.runs == [tmp_path / f"seed{s}" for s in range(3)]
    assert "#SBATCH --array=0-2%2" in sub.script.read_text()
    assert sub.output == f"{tmp_path}/slurm-%A_%a.out"


def test_time_limits():
    assert time_limit_seconds("90") == 5400
    assert time_limit_seconds("10:30") == 630
    assert time_limit_seconds("04:00:00") == 14400
    assert time_limit_seconds("2-12") == 2 * 86400 + 12 * 3600
    assert time_limit_seconds("1-00:30:15") == 86400 + 1815
    assert time_limit_seconds("UNLIMITED") is None
