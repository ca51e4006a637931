"""Tile schedules of the CVMM Triton kernels: which rows of the sorted list a program owns.

Imported only by the Triton backend (it imports triton). Legend: E experts, M assignments
sorted by expert, `offsets[e]:offsets[e+1]` the range of expert e, TILE rows per tile.

Every tile holds rows of a single expert, so none straddles two experts (the official kernel
recomputes a straddling tile once per expert in it). Expert e needs `cdiv(count_e, TILE)`
tiles; launches use the bound `cdiv(M, TILE) + E`, known from shapes alone, so routing never
forces a device-to-host sync. Surplus programs exit at once.

Gather-GEMM tiles are dealt out round-robin over experts: round r holds tile r of every expert
that has more than r tiles. Rows of one expert are in token order (the sort is stable), so
programs running at the same time cover the same window of output rows whatever their expert.
That keeps the fused gated reduction's scatter-adds on a few MB of output that stay in L2,
where expert-major order would sweep the whole output once per expert. Finding the round of a
program needs a search over rounds, too slow to repeat in each of thousands of programs (a
dozen dependent reductions before the first load), so `tile_schedule` writes a table once per
launch with one tiny kernel: tile t -> (expert, first row). Each GEMM program then reads two
integers.

The weight gradient needs no such order (its atomics go to W tiles, not output rows): its
chunks are expert-major and found in-kernel by `_expert_major_chunk` in a few reductions,
negligible next to the >= 1024 rows each chunk reduces.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def grid_upper_bound(num_rows: int, tile: int, num_experts: int) -> int:
    """Tiles needed for any routing of `num_rows` rows over `num_experts` experts."""
    return triton.cdiv(num_rows, tile) + num_experts


def rows_bucket(num_rows: int) -> int:
    """log2 bucket of the row count for autotune keys: changes with the batch shape only."""
    return max(num_rows, 1).bit_length()


@triton.jit
def _cvmm_schedule_kernel(
    OFFSETS,  # pointer to int64 [E + 1] expert ranges in the sorted list
    SCHEDULE,  # pointer to int32 [1 + 2 * max_tiles]: total, experts, first rows
    num_experts,
    max_tiles,  # entries of each table (the launch bound)
    E_POW2: tl.constexpr,
    TILE: tl.constexpr,
    ROUNDS: tl.constexpr,  # rounds handled by one program
):
    offs_e = tl.arange(0, E_POW2)
    valid_e = offs_e < num_experts
    start_e = tl.load(OFFSETS + offs_e, mask=valid_e, other=0).to(tl.int32)
    end_e = tl.load(OFFSETS + offs_e + 1, mask=valid_e, other=0).to(tl.int32)
    tiles_e = (end_e - start_e + TILE - 1) // TILE
    if tl.program_id(0) == 0:
        tl.store(SCHEDULE, tl.sum(tiles_e, 0))
    rounds = tl.program_id(0) * ROUNDS + tl.arange(0, ROUNDS)
    # Tiles scheduled before round r: sum_e min(tiles_e, r). In round r, the experts that still
    # have a tile follow in expert order.
    before_r = tl.sum(tl.minimum(tiles_e[None, :], rounds[:, None]), axis=1)
    in_round = tiles_e[None, :] > rounds[:, None]
    slot = before_r[:, None] + tl.cumsum(in_round.to(tl.int32), axis=1) - 1
    mask = in_round & (slot < max_tiles)
    tl.store(SCHEDULE + 1 + slot, tl.broadcast_to(offs_e[None, :], (ROUNDS, E_POW2)), mask=mask)
    tl.store(SCHEDULE + 1 + max_tiles + slot, start_e[None, :] + rounds[:, None] * TILE, mask=mask)


def tile_schedule(offsets: torch.Tensor, num_rows: int, tile: int) -> tuple[torch.Tensor, int]:
    """The round-robin tile table for `tile`-row tiles, and its length (the launch bound).

    Layout (int32): [total tiles, expert of tile 0..max-1, first row of tile 0..max-1]. Entries
    past the total are never read.
    """
    num_experts = offsets.numel() - 1
    max_tiles = grid_upper_bound(num_rows, tile, num_experts)
    schedule = torch.empty(1 + 2 * max_tiles, dtype=torch.int32, device=offsets.device)
    rounds = 64
    max_rounds = triton.cdiv(max(num_rows, 1), tile)  # no expert has more tiles than this
    _cvmm_schedule_kernel[(triton.cdiv(max_rounds, rounds),)](
        offsets, schedule, num_experts, max_tiles,
        E_POW2=max(2, triton.next_power_of_2(num_experts)), TILE=tile, ROUNDS=rounds,
    )  # fmt: skip
    return schedule, max_tiles


@triton.jit
def _expert_major_chunk(
    pid,  # index of this chunk among all chunks of the launch
    OFFSETS,  # pointer to int64 [E + 1] expert ranges in the sorted list
    num_experts,
    E_POW2: tl.constexpr,
    CHUNK: tl.constexpr,  # rows per chunk
):
    """(valid, expert, start, end) of chunk `pid`, chunks numbered expert by expert."""
    offs_e = tl.arange(0, E_POW2)
    valid_e = offs_e < num_experts
    start_e = tl.load(OFFSETS + offs_e, mask=valid_e, other=0).to(tl.int32)
    end_e = tl.load(OFFSETS + offs_e + 1, mask=valid_e, other=0).to(tl.int32)
    chunks_e = (end_e - start_e + CHUNK - 1) // CHUNK
    upto_e = tl.cumsum(chunks_e, 0)  # chunks of experts 0..e
    done = upto_e <= pid  # experts entirely before this chunk
    expert = tl.sum(done.to(tl.int32), 0)
    before = tl.max(tl.where(done, upto_e, 0), 0)
    start = tl.load(OFFSETS + expert, mask=expert < num_experts, other=0).to(tl.int32)
    start += (pid - before) * CHUNK
    end = tl.load(OFFSETS + expert + 1, mask=expert < num_experts, other=0).to(tl.int32)
    return pid < tl.sum(chunks_e, 0), expert, start, tl.minimum(end, start + CHUNK)
