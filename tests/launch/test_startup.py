"""What `switchall pretrain` / `evaluate` refuse at start-up, in one line with exit code 2 (before
a model or process group exists), and what they say on resume: the findings of items 6, 8, 9."""

from __future__ import annotations

import json
import os

import pytest
import torch

from switchall.cli import main as cli_main
from switchall.config import dump_run_config, load_run_config
from switchall.pretrain.control import StopSignals
from switchall.pretrain.metrics import MetricsLogger, read_metrics
from switchall.pretrain.runtime import LocalRuntime
from switchall.pretrain.trainer import Trainer
from tests.launch.helpers import SWITCHALL, tiny

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def _restore_signals():
    yield
    StopSignals.uninstall()  # the CLI installs its handlers in this process


def pretrain(dataset, run, *extra, flags=()):
    return cli_main(["pretrain", SWITCHALL, *tiny(dataset, *extra), "--run-dir", str(run), *flags])


@pytest.fixture(scope="module")
def trained(launch_dataset, tmp_path_factory):
    """A finished 4-step run (checkpoints at 2 and 4), trained in this process."""
    run = tmp_path_factory.mktemp("trained") / "run"
    cfg = load_run_config(SWITCHALL, tiny(launch_dataset, "train.steps=4", "train.ckpt_every=2"))
    Trainer(cfg, run, LocalRuntime(torch.device("cpu"))).run()
    return run


def one_error_line(capsys, code: int, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    return err


# ------------------------------------------------------------------ item 9: resume surprises
def test_resume_of_a_missing_directory_is_refused(launch_dataset, tmp_path, capsys):
    code = pretrain(launch_dataset, tmp_path / "nope", flags=["--resume"])
    one_error_line(capsys, code, "--resume", "does not exist")
    assert not (tmp_path / "nope").exists()


def test_resume_without_a_checkpoint_says_so_loudly(launch_dataset, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert pretrain(launch_dataset, tmp_path / "run", "train.steps=1", flags=["--resume"]) == 0
    assert "WARNING: --resume, but" in capsys.readouterr().err


def test_a_changed_schedule_on_resume_needs_a_flag_and_is_shown(
    launch_dataset, trained, tmp_path, capsys
):
    run = tmp_path / "run"
    import shutil

    shutil.copytree(trained, run)
    before = (run / "config.yaml").read_text()
    code = pretrain(launch_dataset, run, "train.steps=6", "train.ckpt_every=2", flags=["--resume"])
    one_error_line(
        capsys, code, f"{run}/config.yaml", SWITCHALL, "train.steps: 4 -> 6", "--allow-config"
    )
    assert (run / "config.yaml").read_text() == before
    # A change that leaves the mathematics alone is shown, not refused; with the flag the run
    # continues under the new schedule and config.yaml records it.
    flags = ["--resume", "--allow-config-change"]
    assert pretrain(launch_dataset, run, "train.steps=6", "train.log_every=3", flags=flags) == 0
    err = capsys.readouterr().err
    assert "config change on resume: train.steps: 4 -> 6" in err
    assert "config change on resume: train.log_every: 1 -> 3" in err
    assert load_run_config(run / "config.yaml").train.steps == 6


def test_a_finished_run_does_nothing(launch_dataset, trained, capsys):
    meta = sorted((trained / "checkpoints").iterdir())[-1]
    before = {p.name: p.stat().st_mtime_ns for p in meta.iterdir()}
    args = ("train.steps=4", "train.ckpt_every=2")
    assert pretrain(launch_dataset, trained, *args, flags=["--auto-resume"]) == 0
    assert "is finished (checkpoint at step 4" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in meta.iterdir()} == before  # not re-saved
    # The trainer itself (the Python API) does not evaluate or save a finished run again.
    cfg = load_run_config(trained / "config.yaml")
    result = Trainer(cfg, trained, LocalRuntime(torch.device("cpu")), resume=True).run()
    assert result["already_finished"] and result["step"] == 4
    assert {p.name: p.stat().st_mtime_ns for p in meta.iterdir()} == before


# ------------------------------------------------------------ item 8: one line, exit code 2
def test_cuda_on_a_cpu_machine(launch_dataset, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code = pretrain(launch_dataset, tmp_path / "run", "train.device=cuda")
    one_error_line(capsys, code, "train.device", "no usable CUDA device")


def test_wandb_online_without_a_key(launch_dataset, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    code = pretrain(launch_dataset, tmp_path / "run", "logging.wandb=online")
    one_error_line(capsys, code, "logging.wandb", "WANDB_API_KEY")


def test_checkpoint_errors_of_evaluate(trained, tmp_path, capsys):
    code = cli_main(["evaluate", str(trained), "--checkpoint", str(tmp_path / "missing")])
    one_error_line(capsys, code, "checkpoint error", str(tmp_path / "missing"))
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    latest = sorted((run / "checkpoints").iterdir())[-1]
    victim = next(p for p in sorted(latest.iterdir()) if p.name.startswith("model"))
    victim.write_bytes(victim.read_bytes()[:-10])
    code = cli_main(["evaluate", str(run), "--checkpoint", str(latest)])
    one_error_line(capsys, code, "checkpoint error", victim.name)


def test_ctrl_c_during_start_up(launch_dataset, tmp_path, capsys, monkeypatch):
    import switchall.pretrain.startup as startup

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(startup, "check_start", interrupted)
    assert pretrain(launch_dataset, tmp_path / "run") == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err


# -------------------------------------------------- item 6: crash-safe files, checked early
def test_an_unwritable_checkpoint_directory_fails_before_training(launch_dataset, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").write_text("a file where the directory should be")
    code = pretrain(launch_dataset, run, "train.steps=3")
    one_error_line(capsys, code, f"{run}/checkpoints", "not writable")
    assert not (run / "metrics.jsonl").exists()  # no step was trained


def test_config_yaml_is_replaced_atomically(launch_dataset, tmp_path, monkeypatch):
    cfg = load_run_config(SWITCHALL, tiny(launch_dataset))
    path = tmp_path / "config.yaml"
    dump_run_config(cfg, path)
    before = path.read_bytes()

    def crash(*a, **k):
        raise OSError("crash in the middle of the write")

    monkeypatch.setattr(os, "replace", crash)
    cfg.train.steps += 1
    with pytest.raises(OSError):
        dump_run_config(cfg, path)
    assert path.read_bytes() == before


def test_metrics_torn_line_and_records_past_the_resumed_step(tmp_path):
    from switchall.pretrain.config import LoggingConfig

    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 0, "val_loss": 5.0}]
    lines += [{"step": s, "loss": float(s)} for s in range(1, 8)]
    lines += [{"event": "resume", "step": 4}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 8, "lo')
    log = MetricsLogger(tmp_path, LoggingConfig(wandb="disabled", console=False))
    assert log.rewind(5) == 2  # steps 6 and 7 are trained again
    log.log({"step": 6, "loss": 6.5})
    log.close()
    got = read_metrics(path)
    assert [r.get("step") for r in got if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert got[-1]["loss"] == 6.5
    assert path.read_text().count("\n") == len(path.read_text().splitlines())
    # A fresh start (step 0) drops every earlier record, the step-0 validation included.
    log = MetricsLogger(tmp_path, LoggingConfig(wandb="disabled", console=False))
    log.rewind(0)
    log.close()
    assert path.read_text() == ""
