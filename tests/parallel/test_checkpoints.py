"""Checkpoints of parallel runs: experts distinct, on the right rank and saved once; resuming
under the same layout continues bit for bit; another layout is refused."""

from __future__ import annotations

import shutil

import pytest
import torch

from switchall.config import load_run_config
from switchall.configtools import ConfigError
from switchall.pretrain.runtime import LocalRuntime
from switchall.pretrain.trainer import Trainer
from tests.parallel.conftest import CURVE_STEPS, SPLIT_AT, train_records

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(600)]

NUM_EXPERTS, LAYERS = 4, ("blocks.0.mlp", "blocks.1.mlp")


def _final_checkpoint(root):
    return root / "checkpoints" / f"step_{CURVE_STEPS:08d}"


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_every_expert_saved_once_distinct_and_on_its_rank(two_ranks, reference):
    _, out = two_ranks
    ckpt = _final_checkpoint(out / "ep2_z2")
    files = {p.name: _load(p) for p in ckpt.glob("*.pt") if not p.name.startswith("train_")}
    assert set(files) == {"model_tp0.pt", "experts_tp0_ep0.pt", "experts_tp0_ep1.pt"}

    # Every parameter name of the model is in exactly one kind of file; experts are split.
    ref_model = _load(_final_checkpoint(reference["switchall_dir"]) / "model_rank0.pt")
    dense = set(files["model_tp0.pt"]["params"])
    expert_names = {f"{layer}.{w}" for layer in LAYERS for w in ("w1", "w2")}
    assert dense | expert_names == set(ref_model) and not dense & expert_names
    for ep in (0, 1):
        assert set(files[f"experts_tp0_ep{ep}.pt"]["params"]) == expert_names

    rank_dumps = [_load(out / f"ep2_z2_experts_rank{r}.pt") for r in (0, 1)]
    for name in expert_names:
        # The two files' slices tile [0, 4) exactly once.
        slices = sorted((files[f"experts_tp0_ep{ep}.pt"]["shards"][name][0], ep) for ep in (0, 1))
        assert [s for s, _ in slices] == [[0, 0, NUM_EXPERTS], [0, 2, NUM_EXPERTS]]
        full = torch.cat([files[f"experts_tp0_ep{ep}.pt"]["params"][name] for _, ep in slices])
        assert full.shape[0] == NUM_EXPERTS
        # Distinct: no expert is a copy of another (the EP bug class of saving one rank's
        # experts for every rank).
        for a in range(NUM_EXPERTS):
            for b in range(a + 1, NUM_EXPERTS):
                assert not torch.allclose(full[a], full[b]), (name, a, b)
        # On the right rank: rank r holds experts [2r, 2r + 2), exactly what its file holds,
        # and they track the single-process run's experts of the same index.
        layer, w = name.rsplit(".", 1)
        for rank, dump in enumerate(rank_dumps):
            assert dump["ep_rank"] == rank and dump["layers"][layer]["expert_offset"] == 2 * rank
            local = dump["layers"][layer][w]
            assert torch.equal(local, files[f"experts_tp0_ep{rank}.pt"]["params"][name])
        torch.testing.assert_close(full, ref_model[name], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize(
    "launch, name, stop, steps",
    [
        ("two_ranks", "ep2_z2", SPLIT_AT, CURVE_STEPS),  # EP=2, ZeRO-2
        ("two_ranks", "transformer_z3", 3, 6),  # ZeRO-3: gathered model files
        ("four_ranks", "tp2_ep2_dp2_z2", 2, 4),  # every shard kind at once
    ],
)
def test_resume_under_the_same_layout_continues_identically(request, launch, name, stop, steps):
    """Stopped, then resumed under the same layout: the same losses, bit for bit."""
    results, _ = request.getfixturevalue(launch)
    full = {r["step"]: r["loss"] for r in train_records(results[name]["history"])}
    stopped = train_records(results[f"{name}_stop"]["history"])
    resumed = train_records(results[f"{name}_resume"]["history"])
    assert [r["step"] for r in stopped] == list(range(1, stop + 1))
    assert [r["step"] for r in resumed] == list(range(stop + 1, steps + 1))
    assert {r["step"]: r["loss"] for r in stopped + resumed} == full
    val = [r["val_loss"] for r in results[name]["history"] if "val_loss" in r]
    val_resumed = [r["val_loss"] for r in results[f"{name}_resume"]["history"] if "val_loss" in r]
    assert val[-1] == val_resumed[-1]


def test_checkpoint_of_another_layout_is_refused(two_ranks, tmp_path, dataset):
    """The EP=2 checkpoint names its layout; a single-process run refuses to resume from it."""
    _, out = two_ranks
    run = tmp_path / "run"
    shutil.copytree(out / "ep2_z2", run)
    cfg = load_run_config(run / "config.yaml", ["parallel.expert=1", "parallel.zero_stage=0"])
    with pytest.raises(ConfigError, match="saved with layout tp1-ep2-dp2-zero2"):
        Trainer(cfg, run, LocalRuntime(torch.device("cpu")), resume=True)
