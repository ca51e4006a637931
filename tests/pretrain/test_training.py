"""End-to-end single-process training on real prepared text: learning, resume, evaluate, CLI."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from switchall.checkpoint.errors import CheckpointError
from switchall.cli import main as cli_main
from switchall.config import load_run_config
from switchall.configtools import ConfigError
from switchall.data_pipeline import read_manifest
from switchall.pretrain.checkpoint import CheckpointManager
from switchall.pretrain.metrics import latest_per_step, read_metrics
from switchall.pretrain.runtime import LocalRuntime
from switchall.pretrain.trainer import Trainer
from tests.stdlib_data import prepare_stdlib
from tests.subproc import REPO, subprocess_env
from tests.tiny import TINY_MODEL

TINY = [
    "model.vocab_size=400",
    *TINY_MODEL,
    "train.batch_size=4",
    "train.log_every=2",
    "train.eval_batches=4",
    "logging.wandb=disabled",
    "optim.warmup_steps=3",
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A small real-text dataset: a slice of the standard library's sources, BPE vocab 400."""
    root = tmp_path_factory.mktemp("data")
    train = ["argparse.py", "json/decoder.py", "textwrap.py", "heapq.py", "shlex.py"]
    return prepare_stdlib(root, train, "bisect.py", "--vocab-size", "400")


def config(dataset: Path, name: str = "configs/demo_switchall.yaml", *extra: str):
    return load_run_config(name, [*TINY, f"data.path={dataset}", *extra])


def train(cfg, run_dir, resume=False, stop_after=None):
    return Trainer(cfg, run_dir, LocalRuntime(torch.device("cpu")), resume=resume).run(
        stop_after=stop_after
    )


@pytest.mark.parametrize("name", ["configs/demo_switchall.yaml", "configs/demo_transformer.yaml"])
def test_short_run_lowers_validation_loss(dataset, tmp_path, name):
    cfg = config(
        dataset, name, "train.steps=40", "optim.lr=3e-3", "train.ckpt_every=10",
        "train.keep_checkpoints=3",
    )  # fmt: skip
    result = train(cfg, tmp_path / "run")
    # train.keep_checkpoints reaches the trainer's checkpoint manager (the default keeps 2).
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert kept == ["step_00000020", "step_00000030", "step_00000040"]
    vals = [r["val_loss"] for r in result["history"] if "val_loss" in r]
    assert vals[-1] < vals[0] - 0.5, vals
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(2, 41, 2))
    assert all({"loss", "lr", "tokens_per_s"} <= r.keys() for r in steps)
    assert {"val_loss", "val_ppl"} <= records[-1].keys()
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert load_run_config(tmp_path / "run" / "config.yaml") == cfg


@pytest.mark.parametrize("extra", [[], ["model.pos_encoding=rope", "model.mem_chunks=0"]])
def test_resume_gives_identical_losses(dataset, tmp_path, extra):
    """Stopped at step 5 and resumed = uninterrupted, bit for bit (XL memory, accumulation)."""
    cfg = config(
        dataset,
        "configs/demo_switchall.yaml",
        "train.steps=12",
        "train.grad_accum=2",
        "train.ckpt_every=4",
        "model.moe.expert_dropout=0.2",
        "model.attention.expert_dropout=0.2",
        "model.dropout=0.1",
        *extra,
    )
    train(cfg, tmp_path / "full")
    stopped = train(cfg, tmp_path / "split", stop_after=5)
    assert stopped["stopped"] and stopped["step"] == 5
    resumed = train(cfg, tmp_path / "split", resume=True)
    # The resumed call starts at the checkpoint's step: a restart from step 0 with the same
    # seed would reproduce the same losses, and its later lines would overwrite the earlier.
    assert [r["step"] for r in resumed["history"] if "loss" in r] == [6, 8, 10, 12]
    records = read_metrics(tmp_path / "split" / "metrics.jsonl")
    assert [r["step"] for r in records if r.get("event") == "resume"] == [5]
    train_steps = [r["step"] for r in records if "loss" in r]
    assert train_steps == [2, 4, 6, 8, 10, 12]  # every step logged once: nothing was redone
    full = latest_per_step(read_metrics(tmp_path / "full" / "metrics.jsonl"), "loss")
    split = latest_per_step(records, "loss")
    assert full == split and sorted(full) == [2, 4, 6, 8, 10, 12]
    full_val = latest_per_step(read_metrics(tmp_path / "full" / "metrics.jsonl"), "val_loss")
    split_val = latest_per_step(read_metrics(tmp_path / "split" / "metrics.jsonl"), "val_loss")
    assert full_val[12] == split_val[12]


# `switchall pretrain` in a child process whose Trainer stops inside step STOP + 1 (after the
# checkpoint at step 4 and the metrics of steps 5-6), says so through a marker file, and waits
# for the test's SIGKILL: no cleanup, no final checkpoint.
KILLED_PRETRAIN = """
import sys, time
from pathlib import Path
from switchall.cli import main
from switchall.pretrain.trainer import Trainer

marker, stop = Path(sys.argv[1]), int(sys.argv[2])
train_step = Trainer.train_step

def train_step_or_wait(self, batch):
    if self.step == stop:
        marker.write_text(str(self.step))
        time.sleep(600)
    return train_step(self, batch)

Trainer.train_step = train_step_or_wait
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.timeout(240)
def test_sigkilled_pretrain_resumes_with_identical_losses(dataset, tmp_path):
    """A real `switchall pretrain` SIGKILLed mid-run, then `--resume`d: it continues from the
    last checkpoint (step 4, redoing steps 5-6) and every loss equals the uninterrupted run's."""
    extra = ["train.steps=12", "train.ckpt_every=4", "model.dropout=0.1"]
    args = ["configs/demo_switchall.yaml", *TINY, f"data.path={dataset}", *extra]
    run, marker, log = tmp_path / "killed", tmp_path / "marker", tmp_path / "child.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", KILLED_PRETRAIN, str(marker), "6", "pretrain", *args,
             "--run-dir", str(run)],
            # The same thread count as this process: it sets the order of float reductions,
            # and the uninterrupted run below is computed here.
            cwd=REPO, env=subprocess_env(OMP_NUM_THREADS=str(torch.get_num_threads())),
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), log.read_text()[-3000:]
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    # Killed mid-run: the checkpoint of step 4 is the latest; steps 5-6 were logged.
    assert [s for s, _ in CheckpointManager(run / "checkpoints").complete()] == [4]
    before = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in before if "loss" in r] == [2, 4, 6]
    assert cli_main(["pretrain", *args, "--run-dir", str(run), "--resume"]) == 0
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records if r.get("event") == "resume"] == [4]
    resumed = [r for r in records[len(before) :] if "loss" in r]
    assert [r["step"] for r in resumed] == [6, 8, 10, 12]
    # The redone step 6 is bit for bit the killed run's step 6.
    assert resumed[0]["loss"] == next(r["loss"] for r in before if "loss" in r and r["step"] == 6)
    train(config(dataset, "configs/demo_switchall.yaml", *extra), tmp_path / "full")
    full = latest_per_step(read_metrics(tmp_path / "full" / "metrics.jsonl"), "loss")
    assert latest_per_step(records, "loss") == full and sorted(full) == [2, 4, 6, 8, 10, 12]
    full_val = latest_per_step(read_metrics(tmp_path / "full" / "metrics.jsonl"), "val_loss")
    assert latest_per_step(records, "val_loss")[12] == full_val[12]


def test_cli_pretrain_evaluate_count(dataset, tmp_path, capsys):
    run = tmp_path / "cli"
    args = ["configs/demo_transformer.yaml", *TINY, f"data.path={dataset}", "train.steps=4"]
    assert cli_main(["pretrain", *args, "--run-dir", str(run)]) == 0
    capsys.readouterr()
    # The trainer's final validation covered train.eval_batches=4 batches; so does --batches 4.
    # (tests/pretrain/test_evaluate.py checks evaluate against an independent computation.)
    assert cli_main(["evaluate", str(run), "--batches", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    last_val = read_metrics(run / "metrics.jsonl")[-1]
    assert out["step"] == 4 and out["val_tokens"] == last_val["val_tokens"] == 4 * 4 * 16
    assert out["val_loss"] == pytest.approx(last_val["val_loss"], rel=1e-9)
    assert cli_main(["count", "configs/demo_transformer.yaml", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["params"] > 0
    # A second run into the same directory without --resume is refused, nothing touched.
    before = (run / "metrics.jsonl").read_bytes()
    assert cli_main(["pretrain", *args, "--run-dir", str(run)]) == 2
    assert (run / "metrics.jsonl").read_bytes() == before


def test_bad_inputs_name_the_culprit(dataset, tmp_path):
    with pytest.raises(ConfigError, match="model.vocab_size"):
        train(
            config(dataset, "configs/demo_switchall.yaml", "model.vocab_size=100"), tmp_path / "a"
        )
    cfg = config(dataset, "configs/demo_switchall.yaml", "train.steps=2")
    train(cfg, tmp_path / "b")
    other = config(dataset, "configs/demo_switchall.yaml", "train.steps=4", "model.d_model=48")
    with pytest.raises(ConfigError, match="differs from the model of checkpoint"):
        train(other, tmp_path / "b", resume=True)


def test_checkpoint_refuses_a_dataset_of_another_tokenizer(dataset, tmp_path, capsys):
    """The tokenizer hash a checkpoint records is compared with the dataset's: resuming or
    evaluating on data prepared with another tokenizer (same vocabulary size) is refused."""
    other = prepare_stdlib(tmp_path / "other", ["calendar.py", "difflib.py"], "glob.py",
                           "--vocab-size", "400")  # fmt: skip
    theirs, ours = (read_manifest(d).tokenizer["sha256"] for d in (other, dataset))
    assert theirs != ours and read_manifest(other).vocab_size == 400
    cfg = config(dataset, "configs/demo_switchall.yaml", "train.steps=2")
    train(cfg, tmp_path / "run")
    meta = CheckpointManager.read_meta(tmp_path / "run" / "checkpoints" / "step_00000002")
    assert meta["tokenizer_sha256"] == ours
    moved = config(other, "configs/demo_switchall.yaml", "train.steps=4")
    with pytest.raises(ConfigError, match=r"data\.path.*tokenizer .* differs"):
        train(moved, tmp_path / "run", resume=True)
    capsys.readouterr()
    assert cli_main(["evaluate", str(tmp_path / "run"), f"data.path={other}"]) == 2
    assert "tokenizer" in capsys.readouterr().err


@pytest.mark.parametrize("deterministic", [True, False])
def test_deterministic_reaches_the_cvmm_calls(dataset, tmp_path, monkeypatch, deterministic):
    """`switchall pretrain ... train.deterministic=true` turns on torch's deterministic
    algorithms (and cuBLAS's fixed workspace), which every CVMM call of the run then resolves
    to deterministic=True (the Triton weight gradient's mode without atomics)."""
    import switchall.kernels as kernels
    from switchall.kernels import cvmm_op

    seen, real = [], kernels.resolve_deterministic

    def spy(requested):
        seen.append(real(requested))  # what this cvmm call passes on as `deterministic`
        return seen[-1]

    monkeypatch.setattr(kernels, "resolve_deterministic", spy)
    monkeypatch.delenv(cvmm_op.DETERMINISTIC_ENV, raising=False)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)  # restored after the test
    args = ["configs/demo_switchall.yaml", *TINY, f"data.path={dataset}", "train.steps=2"]
    args.append(f"train.deterministic={str(deterministic).lower()}")
    previous = torch.are_deterministic_algorithms_enabled()
    assert previous is False
    try:
        assert cli_main(["pretrain", *args, "--run-dir", str(tmp_path / "run")]) == 0
        assert torch.are_deterministic_algorithms_enabled() is deterministic
    finally:
        torch.use_deterministic_algorithms(previous)  # the CLI sets it for its whole process
    assert seen and set(seen) == {deterministic}
    assert ("CUBLAS_WORKSPACE_CONFIG" in os.environ) is deterministic


def test_resume_skips_a_corrupt_checkpoint_and_a_finished_run_does_not_resave(
    dataset, tmp_path, capsys
):
    """The newest checkpoint is corrupt: resume falls back to the one before, loudly, and still
    ends bitwise where the uninterrupted run ends. Resuming the finished run writes nothing."""
    base = ("configs/demo_transformer.yaml", "train.steps=4", "train.keep_checkpoints=3")
    train(config(dataset, *base), tmp_path / "full")
    cfg = config(dataset, *base, "train.ckpt_every=1")
    split = tmp_path / "split"
    train(cfg, split, stop_after=2)  # checkpoints at steps 1 and 2
    data = split / "checkpoints" / "step_00000002" / "__0_0.distcp"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    capsys.readouterr()
    train(cfg, split, resume=True)
    err = capsys.readouterr().err
    assert "skipping checkpoint" in err and "step_00000002" in err and "checksum mismatch" in err
    events = [r for r in read_metrics(split / "metrics.jsonl") if "event" in r]
    assert [e["step"] for e in events if e["event"] == "resume"] == [1]
    full = latest_per_step(read_metrics(tmp_path / "full" / "metrics.jsonl"), "loss")
    assert latest_per_step(read_metrics(split / "metrics.jsonl"), "loss") == full
    final = split / "checkpoints" / "step_00000004" / "meta.json"
    before = final.stat().st_mtime_ns
    train(cfg, split, resume=True)
    assert final.stat().st_mtime_ns == before


def test_consolidated_checkpoint_is_the_model_state(dataset, tmp_path):
    from switchall.checkpoint.consolidate import consolidate

    cfg = config(dataset, "configs/demo_switchall.yaml", "train.steps=2")
    trainer = Trainer(cfg, tmp_path / "run", LocalRuntime(torch.device("cpu")))
    trainer.run()
    weights = consolidate(tmp_path / "run" / "checkpoints" / "step_00000002")
    state = trainer.model.state_dict()
    assert weights.keys() == state.keys()
    assert all(torch.equal(weights[k], state[k]) for k in state)


def _write_old_format(trainer: Trainer, ckpt: Path) -> None:
    """A checkpoint as switchall wrote it before the layout-free format (one process: the
    model's state_dict and the train state pickled per rank, sha256 listing, meta.json)."""
    import hashlib
    import io
    import random

    state = {
        "step": trainer.step,
        "engine": {"optimizer": trainer.engine.optimizer.state_dict()},
        "memory": trainer.memory,
        "loader": trainer.loader.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "cuda": [], "python": random.getstate()},
    }
    ckpt.mkdir(parents=True)
    hashes = {}
    for name, obj in {
        "model_rank0.pt": trainer.model.state_dict(),
        "train_state_rank0.pt": state,
    }.items():
        buf = io.BytesIO()
        torch.save(obj, buf)
        (ckpt / name).write_bytes(buf.getvalue())
        hashes[name] = hashlib.sha256(buf.getvalue()).hexdigest()
    (ckpt / "files_rank0.json").write_text(json.dumps(hashes))
    model = {k: v for k, v in trainer.setup.config_dict["model"].items() if k != "init_from"}
    meta = {
        "step": trainer.step,
        "model": model,  # main's ModelConfig had no init_from
        "dp_size": 1,
        "tokenizer_sha256": trainer.setup.tokenizer_sha256,
        "layout": "single",
    }
    (ckpt / "meta.json").write_text(json.dumps(meta))


def test_old_format_is_refused_then_converted_once_and_resumes_exactly(dataset, tmp_path, capsys):
    cfg = config(dataset, "configs/demo_transformer.yaml", "train.steps=4", "model.dropout=0.1")
    train(cfg, tmp_path / "full")
    trainer = Trainer(cfg, tmp_path / "split", LocalRuntime(torch.device("cpu")))
    trainer.run(stop_after=2)
    old = tmp_path / "old"
    _write_old_format(trainer, old / "checkpoints" / "step_00000002")
    shutil.copy(tmp_path / "split" / "config.yaml", old / "config.yaml")
    with pytest.raises(CheckpointError, match="old per-rank format.*switchall checkpoint convert"):
        train(cfg, old, resume=True)
    ckpt = old / "checkpoints" / "step_00000002"
    assert cli_main(["checkpoint", "convert", str(ckpt)]) == 0
    assert (old / "checkpoints" / "step_00000002.old-format" / "model_rank0.pt").is_file()
    capsys.readouterr()
    assert cli_main(["checkpoint", "convert", str(ckpt)]) == 2
    assert "not a checkpoint of the old per-rank format" in capsys.readouterr().err
    assert cli_main(["checkpoint", "info", str(old)]) == 0
    info = capsys.readouterr().out
    assert "step        2" in info and "saved with  single" in info and "verified    yes" in info
    train(cfg, old, resume=True)
    full = latest_per_step(read_metrics(tmp_path / "full" / "metrics.jsonl"), "loss")
    resumed = latest_per_step(read_metrics(old / "metrics.jsonl"), "loss")
    assert resumed == {s: v for s, v in full.items() if s > 2}


def test_checkpoint_info_and_evaluate_name_a_corrupt_file(dataset, tmp_path, capsys):
    cfg = config(dataset, "configs/demo_transformer.yaml", "train.steps=2")
    train(cfg, tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000002"
    data = ckpt / "__0_0.distcp"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    capsys.readouterr()
    assert cli_main(["checkpoint", "info", str(ckpt)]) == 1
    assert "__0_0.distcp: checksum mismatch" in capsys.readouterr().out
    # One line naming the file, exit code 2 (no traceback).
    assert cli_main(["evaluate", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "checkpoint error:" in err
    assert "__0_0.distcp: checksum mismatch" in err
    data.unlink()
    assert cli_main(["evaluate", str(tmp_path / "run"), "--checkpoint", str(ckpt)]) == 2
    assert "__0_0.distcp: missing checkpoint file" in capsys.readouterr().err


@pytest.mark.skipif(
    importlib.util.find_spec("switchall.models.pretrained") is None,
    reason="switchall.models.pretrained (the export writer) is not installed",
)
def test_init_from_starts_from_the_export_and_checks_it(dataset, tmp_path):
    cfg = config(dataset, "configs/demo_transformer.yaml", "train.steps=2")
    train(cfg, tmp_path / "run")
    export = tmp_path / "export"
    assert cli_main(["export", str(tmp_path / "run"), "--out", str(export)]) == 0
    start = config(dataset, "configs/demo_transformer.yaml", f"model.init_from={export}")
    trainer = Trainer(start, tmp_path / "new", LocalRuntime(torch.device("cpu")))
    from switchall.models.pretrained import load_pretrained_state

    weights, _ = load_pretrained_state(export)
    assert all(torch.equal(weights[k], v) for k, v in trainer.model.state_dict().items())
    assert trainer.step == 0 and not trainer.engine.has_optimizer_state()
    other = config(
        dataset, "configs/demo_transformer.yaml", "model.n_layers=3", f"model.init_from={export}"
    )
    with pytest.raises(ConfigError, match="model.init_from.*n_layers: export 2, run 3"):
        Trainer(other, tmp_path / "other", LocalRuntime(torch.device("cpu")))
    missing = config(
        dataset, "configs/demo_transformer.yaml", f"model.init_from={tmp_path / 'nope'}"
    )
    with pytest.raises(ConfigError, match="no such export directory"):
        Trainer(missing, tmp_path / "missing", LocalRuntime(torch.device("cpu")))


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a given size (root only); yields a function mounting one at a path."""
    mounted = []

    def mount(path: Path, size: int) -> Path:
        path.mkdir(parents=True)
        cmd = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]
        if os.geteuid() != 0 or subprocess.run(cmd, capture_output=True).returncode != 0:
            pytest.skip(
                "mounting a small tmpfs needs root (the quota test in test_checkpoint.py "
                "covers the order without one)"
            )
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_disk_with_room_for_keep_checkpoints_keeps_working(dataset, tmp_path, small_disk):
    """A real full disk: room for the config's 2 checkpoints and not 3 -- every save succeeds;
    room for less than one -- the error names the directory and no temporary is left."""
    cfg = config(dataset, "configs/demo_transformer.yaml", "train.steps=4", "train.ckpt_every=1")
    probe = tmp_path / "probe"
    train(cfg, probe)
    one = sum(p.stat().st_size for p in (probe / "checkpoints" / "step_00000004").iterdir())
    run = tmp_path / "run"
    small_disk(run / "checkpoints", int(2.6 * one))  # tmpfs rounds up to pages
    train(cfg, run)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step_00000003",
        "step_00000004",
    ]
    full = tmp_path / "full"
    small_disk(full / "checkpoints", one // 2)
    with pytest.raises(
        CheckpointError, match=r"\.tmp-step_00000001/__0_0\.distcp: No space left on device"
    ):
        train(cfg, full)
    assert list((full / "checkpoints").iterdir()) == []
