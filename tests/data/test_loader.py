"""TokenLoader: the global order (no overlap, no gap), rank and worker independence, resumption
at another data-parallel size, seeking without reading through, and argument/state checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from switchall.data_pipeline import DataError, TokenLoader, read_manifest
from switchall.data_pipeline.order import GlobalOrder, keyed_permutation
from switchall.data_pipeline.shards import load_shard
from tests.data.helpers import global_stream

GBS, T = 16, 64
pytestmark = pytest.mark.timeout(120)  # DataLoader worker processes: fail instead of hanging


@pytest.fixture(autouse=True)
def small_worker_groups(monkeypatch):
    """Workers pass groups of ~2500 tokens (2 batches of 16 x 65 here, not hundreds), so that
    the tests' few dozen batches really are split among the workers."""
    from switchall.data_pipeline import loader

    monkeypatch.setattr(loader, "GROUP_TOKENS", 2500)


def loaders(ds, dp_size: int, **kw) -> list[TokenLoader]:
    kw = {"global_batch_size": GBS, "seq_len": T, **kw}
    return [TokenLoader(ds, dp_rank=r, dp_size=dp_size, **kw) for r in range(dp_size)]


def epoch_stream(ds, split: str, order: GlobalOrder, epoch: int) -> np.ndarray:
    """The epoch's token stream, built independently of the loader: shards in the epoch's order."""
    m = read_manifest(ds)
    shards = m.shards(split)
    order_S, _ = order.stream_map(epoch)
    return np.concatenate(
        [load_shard(m.url(shards[i].name), shards[i], m.dtype) for i in order_S]
    ).astype(np.int64)


def _splitmix64_py(x: int) -> int:
    m = (1 << 64) - 1
    z = (x + 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def _permutation_py(n: int, *key: int) -> list[int]:
    """keyed_permutation by its definition, in plain Python ints: the indices sorted by their
    SplitMix64 images under a key hashed the same way."""
    h = 0
    for k in key:
        h = _splitmix64_py(h ^ (k & ((1 << 64) - 1)))
    return sorted(range(n), key=lambda i: _splitmix64_py(i ^ h))


def test_keyed_permutation_matches_a_pure_python_reference():
    # The order must not depend on numpy versions or platforms: recompute it with plain ints.
    for n, key in [(1000, (7, 3)), (5, (-1, 2**40, 9))]:
        assert keyed_permutation(n, *key).tolist() == _permutation_py(n, *key)
    assert keyed_permutation(1000, 7, 3).tolist() != keyed_permutation(1000, 7, 4).tolist()


@pytest.mark.parametrize("block_tokens", [1 << 25, 300 * T])
def test_shuffled_order_is_the_documented_permutation(byte_ds, block_tokens):
    """The order module's docstring, recomputed here: epoch e puts the shards in the order
    keyed (seed, e, "SH"); global batch g holds epoch positions [g*B, (g+1)*B), and position p
    of block b = p // m is window b*m + perm_(seed, e, "BL", b)[p % m] (m windows per block)."""
    seed = 3
    loader = TokenLoader(
        byte_ds, global_batch_size=GBS, seq_len=T, seed=seed, shuffle_block_tokens=block_tokens
    )
    order, bpe = loader.order, loader.batches_per_epoch
    shards = len(read_manifest(byte_ds).shards("train"))
    m, windows = max(1, block_tokens // T), order.num_windows
    perms: dict[tuple[int, int], list[int]] = {}
    for epoch in (0, 1):
        assert order.stream_map(epoch)[0].tolist() == _permutation_py(shards, seed, epoch, 0x5348)
        for g in (0, 1, bpe - 1):
            want = []
            for p in range(g * GBS, (g + 1) * GBS):
                block, i = divmod(p, m)
                if (epoch, block) not in perms:
                    size = min(m, windows - block * m)
                    perms[epoch, block] = _permutation_py(size, seed, epoch, 0x424C, block)
                want.append((block * m + perms[epoch, block][i]) * T)
            got = order.row_starts(epoch * bpe + g, 0, GBS)[1]
            assert got.tolist() == want, (epoch, g)
            # Shuffled: a batch's rows are not a run of consecutive windows.
            assert not (np.diff(got) == T).all()


@pytest.mark.parametrize("block_tokens", [1 << 25, 300])
def test_shuffled_epoch_has_no_overlap_and_no_gap(byte_ds, block_tokens):
    loader = TokenLoader(
        byte_ds, global_batch_size=GBS, seq_len=T, shuffle_block_tokens=block_tokens
    )
    order, bpe = loader.order, loader.batches_per_epoch
    starts = np.concatenate([order.row_starts(k, 0, GBS)[1] for k in range(bpe)])
    # Every window of the epoch is used once, and only the remainder (< one batch) is left out.
    assert len(np.unique(starts)) == len(starts) == bpe * GBS
    assert (starts % T == 0).all() and starts.max() // T < order.num_windows
    assert order.num_windows - bpe * GBS < GBS
    stream = epoch_stream(byte_ds, "train", order, 0)
    for k in (0, 1, bpe - 1):
        rows = loader.batch(k).numpy()
        for row, start in zip(rows, order.row_starts(k, 0, GBS)[1], strict=True):
            assert (row == stream[start : start + T + 1]).all()


def test_contiguous_lanes_continue_across_batches(byte_ds):
    loader = TokenLoader(byte_ds, global_batch_size=GBS, seq_len=T, mode="contiguous")
    bpe, lane = loader.batches_per_epoch, loader.order.lane_tokens
    stream = epoch_stream(byte_ds, "train", loader.order, 1)
    batches = [loader.batch(bpe + s).numpy() for s in range(bpe)]  # epoch 1
    for s in range(1, bpe):
        assert (batches[s][:, 0] == batches[s - 1][:, -1]).all()  # one token of overlap
    for lane_i in range(GBS):
        joined = np.concatenate([batches[0][lane_i]] + [b[lane_i, 1:] for b in batches[1:]])
        assert (joined == stream[lane_i * lane : lane_i * lane + bpe * T + 1]).all()
    assert [loader.is_lane_start(k) for k in (0, 1, bpe - 1, bpe, bpe + 1)] == [
        True, False, False, True, False,
    ]  # fmt: skip


@pytest.mark.parametrize("mode", ["shuffled", "contiguous"])
def test_same_global_stream_for_any_ranks_and_workers(small_ds, mode):
    bpe = loaders(small_ds, 1, mode=mode)[0].batches_per_epoch
    n = bpe + 4  # crosses an epoch boundary, where the shard order changes
    reference = global_stream(loaders(small_ds, 1, mode=mode), n)
    assert reference[0].shape == (GBS, T + 1) and reference[0].dtype == torch.int64
    assert not torch.equal(reference[0], reference[bpe])
    for dp_size in (1, 2, 4):
        for workers in (0, 1, 2):
            if dp_size == 1 and workers == 0:
                continue
            got = global_stream(loaders(small_ds, dp_size, mode=mode, num_workers=workers), n)
            for a, b in zip(reference, got, strict=True):
                assert torch.equal(a, b), (dp_size, workers)


@pytest.mark.parametrize("mode", ["shuffled", "contiguous"])
@pytest.mark.parametrize(("dp_before", "dp_after", "workers_after"), [(4, 2, 0), (2, 8, 2)])
def test_resume_exactly_at_another_dp_size(small_ds, mode, dp_before, dp_after, workers_after):
    bpe = loaders(small_ds, 1, mode=mode)[0].batches_per_epoch
    n, k = bpe - 3, 8  # the resumed part crosses into the next epoch
    reference = global_stream(loaders(small_ds, 1, mode=mode), n + k)
    before = loaders(small_ds, dp_before, mode=mode)
    head = global_stream(before, n)
    states = [ld.state_dict() for ld in before]
    assert all(s == states[0] for s in states)  # global: no rank in it
    assert states[0]["batches"] == n and states[0]["samples"] == n * GBS
    after = loaders(small_ds, dp_after, mode=mode, num_workers=workers_after)
    for ld in after:
        ld.load_state_dict(states[0])
    tail = global_stream(after, k)
    for a, b in zip(reference, head + tail, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("mode", "kw"), [("contiguous", {}), ("shuffled", {"shuffle_block_tokens": 256})]
)
def test_resume_seeks_without_reading_through(byte_ds, mode, kw):
    fresh = TokenLoader(byte_ds, global_batch_size=GBS, seq_len=T, mode=mode, **kw)
    deep = 5 * fresh.batches_per_epoch + fresh.batches_per_epoch // 2
    expected = fresh.batch(deep)
    loader = TokenLoader(byte_ds, global_batch_size=GBS, seq_len=T, mode=mode, **kw)
    loader.load_state_dict({**fresh.state_dict(), "batches": deep})
    assert torch.equal(next(iter(loader)), expected)
    # Exactly the shards under the batch's rows were read: nothing before them.
    epoch, starts = loader.order.row_starts(deep, 0, GBS)
    _, offsets = loader.order.stream_map(epoch)
    first = np.searchsorted(offsets, starts, side="right") - 1
    last = np.searchsorted(offsets, starts + T, side="right") - 1
    under_rows = {p for f, la in zip(first, last, strict=True) for p in range(f, la + 1)}
    assert loader.shard_loads == len(under_rows) < len(read_manifest(byte_ds).shards("train"))


def test_validation_pass_is_finite_and_repeatable(byte_ds):
    val = TokenLoader(byte_ds, split="val", global_batch_size=4, seq_len=T, loop=False)
    first = list(val)
    assert len(first) == val.batches_per_epoch > 0
    assert all(torch.equal(a, b) for a, b in zip(first, list(val), strict=True))
    with_workers = TokenLoader(
        byte_ds, split="val", global_batch_size=4, seq_len=T, loop=False, num_workers=2
    )
    assert all(torch.equal(a, b) for a, b in zip(first, list(with_workers), strict=True))


def test_bad_arguments_and_states(byte_ds):
    with pytest.raises(ValueError, match="not divisible by dp_size=3"):
        TokenLoader(byte_ds, global_batch_size=GBS, seq_len=T, dp_size=3)
    with pytest.raises(DataError, match="too few for one"):
        TokenLoader(byte_ds, split="val", global_batch_size=64, seq_len=4096)
    with pytest.raises(DataError, match="no split 'test'"):
        TokenLoader(byte_ds, split="test", global_batch_size=8, seq_len=T)
    loader = TokenLoader(byte_ds, global_batch_size=GBS, seq_len=T, seed=1)
    state = loader.state_dict()
    for key, value in [("seed", 2), ("seq_len", 2 * T), ("mode", "contiguous"), ("manifest", "x")]:
        with pytest.raises(DataError, match=f"{key} is"):
            loader.load_state_dict({**state, key: value})
    with pytest.raises(DataError, match="bad batch count"):
        loader.load_state_dict({**state, "batches": -1})
