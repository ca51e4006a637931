"""Fixtures of the launch / fault-tolerance tests: one small real-text dataset, a tiny model's
overrides, and (for the Slurm tests) a real two-node Slurm cluster on this machine."""

from __future__ import annotations

import shutil
import sysconfig
import warnings
from pathlib import Path

import pytest

from switchall.data_pipeline.prepare import PrepareOptions, prepare
from tests.launch.slurm_cluster import SlurmCluster, missing_reason


@pytest.fixture(scope="session")
def launch_dataset(tmp_path_factory) -> Path:
    """Byte tokens of a few standard-library modules (validation: two others)."""
    root = tmp_path_factory.mktemp("launch_data")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for split, names in {
        "train": ["argparse.py", "json/decoder.py", "textwrap.py", "heapq.py"],
        "val": ["bisect.py", "glob.py"],
    }.items():
        (root / split).mkdir()
        for name in names:
            shutil.copy(stdlib / name, root / split / name.replace("/", "_"))
    out = root / "prepared"
    prepare(
        PrepareOptions(
            out=out,
            inputs=[str(root / "train")],
            val_inputs=[str(root / "val")],
            tokenizer="byte",
            workers=1,
            progress=False,
        )
    )
    return out


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A running two-node cluster (n1, n2), stopped at the end of the session whatever happens."""
    reason = missing_reason()
    if reason:
        warnings.warn(reason, stacklevel=1)  # listed in every run's summary, not only with -rs
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def local_reference(launch_dataset, tmp_path_factory) -> list[tuple[int, float]]:
    """Losses of the uninterrupted single-process run the local chains must reproduce."""
    from tests.launch.helpers import finish, local_args, start, train_losses

    run = tmp_path_factory.mktemp("local_ref") / "run"
    log = run.parent / "out.txt"
    proc = start(local_args(launch_dataset, run), log)
    assert finish(proc, 240) == 0, log.read_text()
    losses = train_losses(run)
    assert [s for s, _ in losses] == list(range(1, 161))
    return losses
