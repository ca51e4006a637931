"""Scheduling, determinism and memory of the Triton CVMM path (interpreted on CPU).

On CPU the interpreter runs programs one after another, so atomics cannot race here; the
determinism tests below still catch what breaks reproducibility without a race (reading
memory that no program wrote), and the GPU suite repeats them where atomics do race.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from torch.utils._python_dispatch import TorchDispatchMode

from switchall.kernels import cvmm, cvmm_prepare
from switchall.kernels.cvmm_tiles import _expert_major_chunk, grid_upper_bound, tile_schedule
from switchall.kernels.cvmm_triton import _slot_major
from tests.kernels.cvmm_cases import (
    CASE_BY_NAME,
    TOLERANCE,
    assert_close_scaled,
    make_inputs,
    reference_with_grads,
    run_with_grads,
)


@pytest.mark.parametrize(
    "counts", [[5, 0, 40, 17, 1, 0, 33], [0, 0, 0], [300], [0, 64, 0, 65, 16], [1] * 9]
)
def test_gemm_tiles_cover_each_sorted_row_once_in_round_robin_order(counts):
    tile = 16
    offsets = torch.zeros(len(counts) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(counts).cumsum(0)
    schedule, max_tiles = tile_schedule(offsets, int(offsets[-1]), tile)
    total = int(schedule[0])
    assert total == sum(-(-c // tile) for c in counts) <= max_tiles
    experts = schedule[1 : 1 + total].tolist()
    starts = schedule[1 + max_tiles : 1 + max_tiles + total].tolist()
    covered = torch.zeros(int(offsets[-1]), dtype=torch.int64)
    for expert, start in zip(experts, starts, strict=True):
        end = min(start + tile, int(offsets[expert + 1]))
        assert offsets[expert] <= start < end, "tile inside its expert"
        covered[start:end] += 1
    assert covered.eq(1).all(), "every sorted row in exactly one tile"
    # Round-robin: the r-th tile of every expert comes before any expert's (r+1)-th tile,
    # and experts take turns in order within a round.
    order = [((s - int(offsets[e])) // tile, e) for e, s in zip(experts, starts, strict=True)]
    assert order == sorted(order)


@triton.jit
def _chunk_probe(OFFSETS, OUT, num_experts, E_POW2: tl.constexpr, CHUNK: tl.constexpr):
    pid = tl.program_id(0)
    valid, expert, start, end = _expert_major_chunk(pid, OFFSETS, num_experts, E_POW2, CHUNK)
    tl.store(OUT + pid * 4 + 0, valid.to(tl.int32))
    tl.store(OUT + pid * 4 + 1, expert)
    tl.store(OUT + pid * 4 + 2, start)
    tl.store(OUT + pid * 4 + 3, end)


@pytest.mark.parametrize("counts", [[5, 0, 40, 17, 1, 0, 33], [0, 0], [100], [0, 32, 0, 33]])
def test_weight_grad_chunks_cover_each_sorted_row_once(counts):
    chunk = 16
    offsets = torch.zeros(len(counts) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(counts).cumsum(0)
    num_programs = grid_upper_bound(int(offsets[-1]), chunk, len(counts))
    out = torch.full((num_programs, 4), -7, dtype=torch.int32)
    e_pow2 = max(2, triton.next_power_of_2(len(counts)))
    _chunk_probe[(num_programs,)](offsets, out, len(counts), E_POW2=e_pow2, CHUNK=chunk)
    valid = out[:, 0].bool()
    assert int(valid.sum()) == sum(-(-c // chunk) for c in counts)
    assert not valid[int(valid.sum()) :].any(), "valid programs come first"
    covered = torch.zeros(int(offsets[-1]), dtype=torch.int64)
    for expert, start, end in out[valid, 1:].tolist():
        assert offsets[expert] <= start < end <= offsets[expert + 1]
        assert end - start <= chunk
        covered[start:end] += 1
    assert covered.eq(1).all()


def test_slot_major_groups_hold_one_slot_of_every_row():
    n, slots, num_experts = 37, 6, 5
    idx = torch.randint(0, num_experts, (n, slots), generator=torch.Generator().manual_seed(0))
    sel = cvmm_prepare(idx, num_experts)
    order_J, offsets_J = _slot_major(sel.order_M, sel.sorted_expert_M, num_experts, slots)
    for j in range(slots):
        group = order_J[j * n : (j + 1) * n]
        assert torch.equal(group.sort().values, torch.arange(n) * slots + j)
        for e in range(num_experts):
            part = order_J[offsets_J[j * num_experts + e] : offsets_J[j * num_experts + e + 1]]
            assert (idx.view(-1)[part] == e).all() and (part.diff() > 0).all()


@pytest.fixture
def poisoned_allocations(monkeypatch):
    """Fill every new uninitialised float tensor with NaN, so that reading memory no kernel
    wrote shows up as NaN, and record the shape of every tensor the factories allocate."""
    shapes = []

    def record(factory, poison):
        def wrapper(*args, **kwargs):
            t = factory(*args, **kwargs)
            shapes.append(tuple(t.shape))
            return t.fill_(float("nan")) if poison and t.is_floating_point() else t

        return wrapper

    for name in ("empty", "empty_like", "zeros", "zeros_like"):
        monkeypatch.setattr(torch, name, record(getattr(torch, name), "empty" in name))
    for name in ("new_empty", "new_zeros"):
        method = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, record(method, "empty" in name))
    return shapes


@pytest.mark.parametrize("gated", [False, True], ids=["slots", "gated"])
@pytest.mark.parametrize("case_name", ["R_heads_oproj", "empty_experts", "G_heads_vproj"])
def test_deterministic_mode_is_bitwise_reproducible(case_name, gated, poisoned_allocations):
    x, idx, w, gates = make_inputs(CASE_BY_NAME[case_name])
    gates = gates if gated else None

    def fn(x, i, w, g):
        return cvmm(x, i, w, g, backend="triton", deterministic=True)

    first, cot = run_with_grads(fn, x, idx, w, gates)
    second, _ = run_with_grads(fn, x, idx, w, gates)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    for got, want in zip(first, reference_with_grads(x, idx, w, gates, cot), strict=True):
        assert_close_scaled(got, want, TOLERANCE[torch.float32], "deterministic")


class _NewTensors(TorchDispatchMode):
    """Records the shape of every tensor an aten op creates (views and in-place ops excluded:
    they allocate nothing), whatever Python function asked for it."""

    def __init__(self, shapes: list):
        super().__init__()
        self.shapes = shapes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not (func.is_view or func._schema.is_mutable):
            for t in out if isinstance(out, tuple | list) else [out]:
                if isinstance(t, torch.Tensor):
                    self.shapes.append((str(func), tuple(t.shape)))
        return out


@pytest.fixture
def backend_allocations(monkeypatch):
    """(op, shape) of every tensor created inside the Triton backend's forward and backward
    (inside the custom ops, where a dispatch mode of the caller does not reach)."""
    from switchall.kernels import cvmm_triton

    shapes: list[tuple[str, tuple]] = []

    def recorded(fn):
        def wrapper(*args):
            with _NewTensors(shapes):
                return fn(*args)

        return wrapper

    for name in ("cvmm_forward", "cvmm_backward"):
        monkeypatch.setattr(cvmm_triton, name, recorded(getattr(cvmm_triton, name)))
    return shapes


@pytest.mark.parametrize("case_name", ["R_heads_oproj", "G_heads_vproj"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["fast", "deterministic"])
def test_gated_path_never_allocates_per_slot_rows(
    deterministic, case_name, poisoned_allocations, backend_allocations
):
    """Memory of the fused reduction does not grow with k: nothing [M, width] is allocated.

    R_heads_oproj: M = N*R*k = 320 slots of I = 28 -> O = 50. Materialising the per-slot
    outputs, the per-slot input gradients or gates (x) grad_out would allocate M * 28 or M * 50
    floats; the legitimate buffers are [N, O], [N*R, I] (= M * I / k) and the gate-gradient
    partials [cdiv(I, 16), M]. G_heads_vproj (one x row for G groups): M = N*G*k = 270 slots of
    I = 30 -> O = 14; legitimate: [N*G, O], [N, I] and the partials [cdiv(I, 16), M].
    """
    case = CASE_BY_NAME[case_name]
    x, idx, w, gates = make_inputs(case)
    num_slots = idx.numel()
    results, _ = run_with_grads(
        lambda x, i, w, g: cvmm(x, i, w, g, backend="triton", deterministic=deterministic),
        x, idx, w, gates,
    )  # fmt: skip
    assert all(torch.isfinite(r).all() for r in results)
    weight_shape = tuple(w.shape)
    limit = num_slots * min(case.d_in, case.d_out)
    sizes = [torch.Size(s).numel() for s in poisoned_allocations if s != weight_shape]
    assert sizes and max(sizes) < limit
    # Every aten op, not only the factories above (torch.full, empty_strided, cat, matmul...).
    created = [(op, s) for op, s in backend_allocations if s != weight_shape]
    assert created and max(torch.Size(s).numel() for _, s in created) < limit, [
        (op, s) for op, s in created if torch.Size(s).numel() >= limit
    ]


@pytest.mark.parametrize("major", [8, 9], ids=["ampere", "hopper"])
def test_gpu_config_lists_and_pruning(major, monkeypatch):
    """The GPU autotune lists (unused by the interpreter) are well formed and prune sensibly."""
    from switchall.kernels import cvmm_configs

    monkeypatch.setattr(cvmm_configs, "interpreting", lambda: False)
    monkeypatch.setattr(cvmm_configs, "_gpu_major", lambda: major)
    gemm, wgrad = cvmm_configs.gemm_configs(), cvmm_configs.wgrad_configs()
    assert len(gemm) > 1 and len(wgrad) > 1
    for c in gemm:
        assert min(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) >= 32
    # The σ-MoE second matmul: K = expert size 128, N = d_model 1024.
    kept = cvmm_configs.prune_gemm(gemm, {"K": 128, "N": 1024})
    assert kept == [c for c in gemm if c.kwargs["BLOCK_K"] <= 128]
    # Widths of 20: no config is that narrow, so the smallest one is kept.
    (narrow,) = cvmm_configs.prune_gemm(gemm, {"K": 20, "N": 20})
    assert narrow.kwargs["BLOCK_N"] * narrow.kwargs["BLOCK_K"] == min(
        c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] for c in gemm
    )
    shapes = {"D_I": 1024, "D_O": 112}
    fast = cvmm_configs.prune_wgrad(wgrad, shapes, DETERMINISTIC=False)
    det = cvmm_configs.prune_wgrad(wgrad, shapes, DETERMINISTIC=True)
    assert len(fast) == 2 * len(det) and {c.kwargs["CHUNK"] for c in det} == {1024}
    # Small experts get 64-row tiles, large ones 128.
    assert cvmm_configs.choose_block_m(16 * 512, 16) == 64
    assert cvmm_configs.choose_block_m(16 * 4096, 16) == 128
