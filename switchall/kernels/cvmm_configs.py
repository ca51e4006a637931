"""Autotune configurations of the CVMM Triton kernels, per GPU generation.

Imported only by the Triton backend. The shapes that matter (spec §1.5, §4) are skinny:
SwitchHead V is d_model 1024 -> d_head 112..132, O is d_head -> 1024, the σ-MoE experts are
1024 -> 128 -> 1024, so one side of every matmul is ~128 wide and the other 1024, with 512 to 8k
rows per expert at 16k-64k tokens.

BLOCK_M (rows per tile) is chosen by `choose_block_m`, not tuned, because the tile table is
built for it before the launch; the autotuner picks BLOCK_N, BLOCK_K, stages and warps.

Hopper (H100: 228 KB shared memory per SM, 132 SMs, wgmma on 64-row warpgroup slices):
BLOCK_K 64 keeps wgmma fed; 8 warps (two warpgroups) for the 128- and 256-wide tiles. 3-4
stages hide the latency of the gathered A rows and fit in shared memory
((128*64 + 64*256) * 2 B * 3 stages = 144 KB for the largest). BLOCK_K 128 covers a whole
d_head of 112-128 in one step, which matters when the reduction is that short.

Ampere (A100: 164 KB shared memory, mma.sync): the classic BLOCK_K 32 with 4 stages, 4 warps
up to 128-wide tiles and 8 warps for 256, all under 100 KB of shared memory.

64-wide tiles stay in both lists for the d_head-wide outputs of the V projection: 132 columns
fill 3 x 64 lanes with 31% masked, against 48% for 2 x 128 or 1 x 256 (112 wastes 12.5% either
way); the autotuner weighs that against the wider tile's better reuse of the A rows.

Keys (see the launchers) are the widths, the dtypes, E, the epilogue flags and a log2 bucket
of the row count, never exact counts, so a new routing decision never triggers tuning again.
Under TRITON_INTERPRET=1 a single config is used: tuning would rerun each numpy-interpreted
kernel once per config for nothing.
"""

from __future__ import annotations

import os

import torch
import triton


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreter_dot_in_fp32(dtype: torch.dtype) -> bool:
    """Whether to upcast tl.dot operands to fp32: only bf16 under the interpreter.

    The Triton 3.x interpreter keeps bf16 as raw uint16 and its tl.dot multiplies those bit
    patterns as integers. Products of bf16 values are exact in fp32, so the upcast computes
    what bf16 tensor cores compute (exact products, fp32 accumulation); compiled kernels
    never take it.
    """
    return interpreting() and dtype == torch.bfloat16


def _gpu_major() -> int:
    return torch.cuda.get_device_capability()[0] if torch.cuda.is_available() else 8


def _gemm(bn: int, bk: int, stages: int, warps: int) -> triton.Config:
    return triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_stages=stages, num_warps=warps)


def _wgrad(bi: int, bo: int, br: int, chunk: int, stages: int, warps: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_I": bi, "BLOCK_O": bo, "BLOCK_R": br, "CHUNK": chunk},
        num_stages=stages,
        num_warps=warps,
    )


def choose_block_m(num_rows: int, num_experts: int) -> int:
    """Rows per gather-GEMM tile. Chosen, not tuned: the tile table is built for it before
    the launch (cvmm_tiles.py). 128 rows (two wgmma warpgroups on Hopper) once experts
    average 1024+ rows; 64 below that, where each expert's last, partial tile is a larger
    share of the work."""
    if interpreting():
        return 64
    return 128 if num_rows >= 1024 * num_experts else 64


def gemm_configs() -> list[triton.Config]:
    """(BLOCK_N, BLOCK_K, stages, warps) of the gather-GEMM kernel; BLOCK_M is chosen."""
    if interpreting():
        return [_gemm(64, 32, 1, 4)]
    if _gpu_major() >= 9:
        return [
            _gemm(128, 64, 3, 8),
            _gemm(256, 64, 3, 8),
            _gemm(128, 64, 4, 4),
            _gemm(64, 64, 4, 4),
            _gemm(128, 128, 3, 8),
            _gemm(64, 128, 3, 4),
        ]
    return [
        _gemm(128, 32, 4, 4),
        _gemm(256, 32, 3, 8),
        _gemm(64, 32, 4, 4),
        _gemm(128, 64, 3, 8),
        _gemm(64, 64, 4, 4),
    ]


def wgrad_configs() -> list[triton.Config]:
    """Configs of the weight-gradient kernel: a (d_in, d_out) tile, BLOCK_R rows per step.

    CHUNK (rows of one expert per program in the split-K fast mode) trades atomics for
    parallelism: at 64k tokens an expert has ~8k rows, so 1024-4096 gives 2-8 chunks.
    """
    if interpreting():
        return [_wgrad(64, 64, 32, 64, 1, 4)]
    if _gpu_major() >= 9:
        tiles = [(128, 128, 64, 3, 8), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 64, 64, 4, 4)]
    else:
        tiles = [(128, 128, 32, 4, 4), (64, 128, 32, 4, 4), (128, 64, 32, 4, 4), (64, 64, 32, 4, 4)]
    return [
        _wgrad(bi, bo, br, chunk, stages, warps)
        for (bi, bo, br, stages, warps) in tiles
        for chunk in (1024, 4096)
    ]


def _fits(block: int, width: int) -> bool:
    # A block much wider than the tensor only adds masked lanes.
    return block <= max(16, triton.next_power_of_2(width))


def prune_gemm(configs, named_args, **kwargs):
    keep = [
        c
        for c in configs
        if _fits(c.kwargs["BLOCK_K"], named_args["K"])
        and _fits(c.kwargs["BLOCK_N"], named_args["N"])
    ]
    return keep or [min(configs, key=lambda c: c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"])]


def prune_wgrad(configs, named_args, **kwargs):
    deterministic = kwargs.get("DETERMINISTIC", named_args.get("DETERMINISTIC"))
    keep = [
        c
        for c in configs
        if _fits(c.kwargs["BLOCK_I"], named_args["D_I"])
        and _fits(c.kwargs["BLOCK_O"], named_args["D_O"])
        # CHUNK is unused in deterministic mode (one program per expert): tune each tile once.
        and not (deterministic and c.kwargs["CHUNK"] != 1024)
    ]
    return keep or [min(configs, key=lambda c: c.kwargs["BLOCK_I"] * c.kwargs["BLOCK_O"])]
