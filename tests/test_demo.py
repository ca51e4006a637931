"""`make demo` runs `python -m switchall.demo`: a smoke run of the same code path (prepare, train
SwitchAll and its dense baseline, print the table) on a slice of the standard library, with a
tiny model and 4 steps instead of the demo's size."""

from __future__ import annotations

import shlex
import shutil
import sysconfig
from pathlib import Path

import pytest

from switchall import demo
from switchall.pretrain.metrics import read_metrics
from tests.subproc import REPO
from tests.tiny import TINY_MODEL

TINY = [
    "model.vocab_size=256",
    *TINY_MODEL,
    "model.mlp.d_ff=64",
    "train.batch_size=4",
    "train.log_every=2",
    "train.eval_batches=2",
    "logging.wandb=disabled",
]


@pytest.mark.timeout(300)
def test_demo_smoke_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # the demo's configs are repository-relative, as under `make demo`
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    (tmp_path / "text").mkdir()
    for name in ["textwrap.py", "heapq.py", "shlex.py"]:
        shutil.copy(stdlib / name, tmp_path / "text" / name)
    shutil.copy(stdlib / "bisect.py", tmp_path / "val.py")
    prepare = [str(tmp_path / "text"), "--val", str(tmp_path / "val.py"), "--tokenizer", "byte"]
    argv = [
        "--data", str(tmp_path / "data"),
        "--runs", str(tmp_path / "runs"),
        "--prepare-args", shlex.join([*prepare, "--no-progress", "--workers", "1"]),
        "--steps", "4",
        *TINY,
    ]  # fmt: skip
    assert demo.main(argv) == 0
    out = capsys.readouterr().out
    (root,) = (tmp_path / "runs").iterdir()
    assert root.name.startswith("demo-") and f"runs, metrics.jsonl and checkpoints: {root}" in out
    header = next(
        line for line in out.splitlines() if "SwitchAll" in line and "Transformer" in line
    )
    assert header.split() == ["SwitchAll", "Transformer-XL"]
    rows = {line[:40].strip(): line[40:].split() for line in out.splitlines() if line[:1].isalpha()}
    for label in ("parameters", "validation perplexity at start", "validation perplexity at end"):
        assert len(rows[label]) == 2, (label, out)
    for name in ("demo_switchall", "demo_transformer"):
        records = read_metrics(root / name / "metrics.jsonl")
        assert [r["step"] for r in records if "loss" in r] == [2, 4]
        assert (root / name / "checkpoints" / "step_00000004" / "meta.json").is_file()
        ppl = [r["val_ppl"] for r in records if "val_ppl" in r]
        assert f"{ppl[-1]:,.2f}" in rows["validation perplexity at end"]
