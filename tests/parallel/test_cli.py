"""`torchrun --nproc_per_node 2 -m switchall pretrain CONFIG parallel.expert=2 ...`: the same
command and loop as one process; metrics logged once, by rank 0, in global terms."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from switchall.pretrain.metrics import read_metrics
from tests.parallel.conftest import overrides, train_records
from tests.parallel.launch import SWITCHALL, TINY, torchrun

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]


# `torchrun -m switchall` and torchrun running the installed `switchall` console script.
LAUNCHERS = {
    "module": ["-m", "switchall"],
    "script": [str(Path(sys.executable).with_name("switchall"))],
}


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_torchrun_pretrain_logs_global_metrics_once(dataset, reference, tmp_path, launcher):
    if launcher == "script" and not Path(LAUNCHERS["script"][0]).is_file():
        pytest.skip("the switchall console script is not installed next to this interpreter")
    run = tmp_path / "run"
    layout = ["parallel.expert=2", "parallel.zero_stage=1", "train.steps=3"]
    output = torchrun(
        2,
        [
            *LAUNCHERS[launcher],
            "pretrain",
            SWITCHALL,
            *overrides(dataset, TINY, *layout),
            "--run-dir",
            str(run),
        ],
        timeout=240,
    )
    # Rank 0 alone prints and writes metrics: each step and validation appears once.
    assert output.count("done: step 3") == 1
    assert output.count("step      1/3") == 1
    records = read_metrics(run / "metrics.jsonl")
    steps = train_records(records)
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert [r["step"] for r in records if "val_loss" in r] == [0, 3]
    # Global terms: the loss of the whole global batch (the single-process value) and the
    # tokens of the whole global batch per second.
    ref = train_records(reference["switchall"])
    for got, want in zip(steps, ref[:3], strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
        assert got["tokens_per_s"] * got["step_time"] == pytest.approx(8 * 16)
    ckpt = run / "checkpoints" / "step_00000003"
    assert {p.name for p in ckpt.iterdir()} == {
        "meta.json",
        "dcp_metadata.json",
        "train_state.json",
        "__0_0.distcp",
        "__1_0.distcp",
        "rng_rank0.json",
        "rng_rank1.json",
    }
