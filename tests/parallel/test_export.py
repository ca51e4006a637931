"""Checkpoints of any layout leave the training system: `switchall evaluate RUN_DIR`,
`switchall export` (single-device safetensors) and `model.init_from` (a new run from an export,
under any layout)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from switchall.cli import main as cli_main
from switchall.config import load_run_config
from switchall.pretrain.runtime import LocalRuntime
from switchall.pretrain.trainer import Trainer
from tests.parallel.conftest import HAVE_EXPORTS, train_records
from tests.parallel.test_checkpoints import (
    CONTINUE_RTOL,
    check_state,
    ckpt_dir,
    max_rel,
    rank_dumps,
)

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(600)]
needs_exports = pytest.mark.skipif(
    not HAVE_EXPORTS, reason="switchall.models.pretrained (the export writer) is not installed"
)


@pytest.mark.parametrize("name", ["ep2_z2", "tp2"])
def test_evaluate_scores_a_torchrun_run(two_ranks, capsys, name):
    """EP=2 (ZeRO-2) and TP=2 runs, scored in one process: their own last validation loss."""
    results, out = two_ranks
    capsys.readouterr()
    assert cli_main(["evaluate", str(out / name), "--batches", "2", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = [r for r in results[name]["history"] if "val_loss" in r][-1]
    assert got["step"] == want["step"]
    assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-5)


@needs_exports
def test_export_of_a_tp2_ep2_checkpoint_is_the_single_device_model(four_ranks, tmp_path):
    """Exported from TP=2 x EP=2 x DP=2: the same tensors as the one-process model that resumes
    the checkpoint, and the same logits once loaded back; bf16 is the same values rounded."""
    from switchall.models.pretrained import load_pretrained, load_pretrained_state

    _, out = four_ranks
    source = out / "tp2_ep2_dp2_z2_split"
    ckpt = ckpt_dir(source, 2)
    args = ["export", str(source), "--checkpoint", str(ckpt)]
    assert cli_main([*args, "--out", str(tmp_path / "fp32")]) == 0
    assert cli_main([*args, "--out", str(tmp_path / "bf16"), "--dtype", "bf16"]) == 0
    run = tmp_path / "one_process"
    shutil.copytree(ckpt, ckpt_dir(run, 2))
    shutil.copy(source / "config.yaml", run / "config.yaml")
    cfg = load_run_config(
        run / "config.yaml", ["parallel.tensor=1", "parallel.expert=1", "parallel.zero_stage=0"]
    )
    trainer = Trainer(cfg, run, LocalRuntime(torch.device("cpu")), resume=True)
    live = trainer.model.state_dict()
    exported, _ = load_pretrained_state(tmp_path / "fp32")
    assert exported.keys() == live.keys()
    assert all(torch.equal(exported[k], live[k]) for k in live)
    halves, _ = load_pretrained_state(tmp_path / "bf16")
    assert all(torch.equal(halves[k], live[k].to(torch.bfloat16)) for k in live)
    model, _ = load_pretrained(tmp_path / "fp32")
    tokens = trainer.loader.batch(0)[:, :-1]
    trainer.model.eval()
    with torch.no_grad():
        assert torch.equal(model(tokens).logits_BTV, trainer.model(tokens).logits_BTV)


@needs_exports
def test_init_from_an_export_under_a_parallel_layout(two_ranks, reference):
    """EP=2 with ZeRO-2 starts from the exported weights, each rank holding its slices of them,
    the optimiser fresh, and trains like the one-process run started from the same export."""
    from switchall.models.pretrained import load_pretrained_state

    results, out = two_ranks
    weights, _ = load_pretrained_state(reference["export_dir"])
    check_state(
        rank_dumps(out, "init_from_ep2", "start"), {f"model/{k}": v for k, v in weights.items()}
    )
    got = train_records(results["init_from_ep2"]["history"])
    want = train_records(reference["init_from"])
    assert [r["step"] for r in got] == [1, 2, 3]
    assert max_rel(got, want) <= CONTINUE_RTOL
    # Trained weights, not a fresh start: the first loss is far below a fresh model's.
    assert got[0]["loss"] < train_records(reference["switchall"])[0]["loss"] - 1.0
