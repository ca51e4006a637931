"""A small real-text dataset shared by the scaling tests (sweeps, metrics, analyses)."""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

import pytest

from switchall.cli import main as cli_main
from tests.tiny import TINY_MODEL

# Tiny models: byte-pair vocabulary 400, 2 layers of width 32, chunks of 16 tokens.
TINY = [
    "model.vocab_size=400",
    *TINY_MODEL,
    "train.batch_size=4",
    "train.log_every=2",
    "train.eval_batches=2",
    "logging.wandb=disabled",
]


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scaling-data")
    src = root / "text"
    src.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ["argparse.py", "textwrap.py", "heapq.py", "shlex.py"]:
        shutil.copy(stdlib / name, src / name)
    val = root / "val.py"
    shutil.copy(stdlib / "bisect.py", val)
    out = root / "prepared"
    argv = ["prepare", str(src), "--val", str(val), "--out", str(out), "--vocab-size", "400"]
    assert cli_main([*argv, "--no-progress"]) == 0
    return out
