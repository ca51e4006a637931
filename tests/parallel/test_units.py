"""In-process checks of the pieces that need no process group."""

from __future__ import annotations

import pytest
import torch

from switchall.parallel.sharded_state import global_name, mark_shard
from switchall.parallel.tensor_parallel import TensorParallelDropout


def test_tensor_parallel_dropout_draws_per_rank_masks_in_rng_lockstep():
    """Ranks of one tensor-parallel group start from the same global RNG state: their masks
    must differ (each holds a different shard) while the global RNG advances identically
    (replicated activations elsewhere need identical masks)."""
    x = torch.ones(64, 256)
    outs, states = [], []
    for tp_rank in (0, 1):
        torch.manual_seed(7)
        drop = TensorParallelDropout(0.25, tp_rank)
        outs.append(drop(x))
        states.append(torch.get_rng_state())
    assert torch.equal(states[0], states[1])
    assert not torch.equal(outs[0], outs[1])
    for out in outs:
        kept = out != 0
        assert torch.allclose(out[kept], torch.full_like(out[kept], 1 / 0.75))
        assert abs(kept.float().mean().item() - 0.75) < 0.01
    # Reproducible: the same global state gives the same mask (so a resumed run matches).
    torch.manual_seed(7)
    assert torch.equal(TensorParallelDropout(0.25, 1)(x), outs[1])
    drop.eval()
    assert drop(x) is x


def test_names_and_shard_marks():
    assert global_name("blocks.0.attn.parametrizations.scale.original") == "blocks.0.attn.scale"
    assert global_name("blocks.0.mlp.w1") == "blocks.0.mlp.w1"
    p = torch.nn.Parameter(torch.zeros(2, 3, 4))
    mark_shard(p, 2, 4, 8)
    mark_shard(p, 0, 2, 4)
    assert p.switchall_shards == ((2, 4, 8), (0, 2, 4))


@pytest.mark.distributed
def test_replicated_parameters_stay_identical_with_dropout(two_ranks):
    """TP=2 with dropout 0.2: residual dropout must draw the same masks on both ranks and the
    MLP's sharded dropout its own; after training, every replicated parameter is identical."""
    results, out = two_ranks
    # Dropout was on: the same run without it (same seed, data and layout) has other losses.
    with_dropout, without = (
        [r["loss"] for r in results[case]["history"] if "loss" in r]
        for case in ("transformer_tp2_dropout", "transformer_tp2")
    )
    assert len(with_dropout) == len(without) == 3
    assert all(abs(a - b) > 1e-3 * abs(b) for a, b in zip(with_dropout, without, strict=True))
    ranks = [torch.load(out / f"transformer_tp2_dropout_replicated_rank{r}.pt") for r in (0, 1)]
    assert set(ranks[0]) == set(ranks[1]) and "embedding.weight" in ranks[0]
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
