"""A small real-text dataset shared by the scaling tests (sweeps, metrics, analyses)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.stdlib_data import prepare_stdlib
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
    train = ["argparse.py", "textwrap.py", "heapq.py", "shlex.py"]
    return prepare_stdlib(root, train, "bisect.py", "--vocab-size", "400")
