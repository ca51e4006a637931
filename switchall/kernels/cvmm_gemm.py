"""Triton gather-GEMM-scatter over expert-sorted assignments: CVMM forward and input gradient.

Legend: M assignments sorted by expert (`ORDER[p]` is the flat slot of sorted position p), E
experts, K the reduction width, N the output width. For every sorted position p in a tile of
expert e:

    acc[p, :] = A[ORDER[p] // A_DIV, :] @ B[e]            (fp32 accumulation)
    acc[p, :] *= GATES[ORDER[p]]                           (if HAS_GATES)
    OUT[ORDER[p] // OUT_DIV, :]  (=|+=)  acc[p, :]          (store, or fp32 atomic add)

Forward: A = x rows (A_DIV = k), B = W, OUT = per-slot rows (OUT_DIV = 1) or, with gates, the
output row shared by S = R*k slots (OUT_DIV = S). Input gradient: A = grad_out rows (A_DIV = 1,
or S with gates), B = W transposed through its strides (no copy), OUT = grad_x rows
(OUT_DIV = k). With GATE_GRAD the same tile also yields the gate gradient
dL/dg[slot] = x[in_row] . (grad_out[row] @ W_e^T): the unscaled acc dotted with the x row,
one partial per N tile, summed on the host in a fixed order.

Summing several slots into one destination row is done either by fp32 atomics (ATOMIC) or,
deterministically, by the caller launching one pass per slot position with disjoint rows and
LOAD_PREV adding the earlier passes' fp32 partial sums (see cvmm_triton.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from switchall.kernels.cvmm_configs import (
    choose_block_m,
    gemm_configs,
    interpreter_dot_in_fp32,
    prune_gemm,
)
from switchall.kernels.cvmm_tiles import rows_bucket, tile_schedule

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit(do_not_specialize=["max_tiles", "rows_bucket"])
def _cvmm_gemm_kernel(
    A,  # pointer to the gathered operand [rows_a, K]
    stride_a_row,
    stride_a_col,
    B,  # pointer to the expert bank, seen as [E, K, N]
    stride_b_e,
    stride_b_k,
    stride_b_n,
    OUT,  # pointer to the destination [rows_out, N]; fp32 when ATOMIC
    stride_out_row,
    stride_out_col,
    PREV,  # pointer to fp32 partial sums of earlier passes, same layout as OUT (LOAD_PREV)
    GATES,  # pointer to the flat gates [M], indexed by slot (HAS_GATES)
    X,  # pointer to x rows [rows_out, N] for the gate gradient (GATE_GRAD)
    stride_x_row,
    stride_x_col,
    GATE_GRAD_PART,  # pointer to fp32 [cdiv(N, BLOCK_N), M] gate-gradient partials
    stride_gg,  # distance between two N tiles' partial rows
    ORDER,  # pointer to int64 [M]: flat slot of each sorted position
    OFFSETS,  # pointer to int64 [E + 1]: expert ranges in ORDER
    SCHEDULE,  # pointer to the int32 tile table of cvmm_tiles.tile_schedule
    max_tiles,  # entries of each table in SCHEDULE
    rows_bucket,  # log2 bucket of the row count: only an autotune key
    num_experts,
    K,
    N,
    A_DIV,  # slots per A row
    OUT_DIV,  # slots per OUT row
    WRITE_OUT: tl.constexpr,  # False when only the gate gradient is wanted
    ATOMIC: tl.constexpr,
    LOAD_PREV: tl.constexpr,
    HAS_GATES: tl.constexpr,
    GATE_GRAD: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,  # "ieee" or "tf32"; ignored for 16-bit inputs
    DOT_IN_FP32: tl.constexpr,  # interpreter only: see interpreter_dot_in_fp32
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    num_n_tiles = (N + BLOCK_N - 1) // BLOCK_N
    # N tiles of one row tile are adjacent in launch order, so its gathered A rows are read
    # from DRAM once and then from L2.
    pid_n = pid % num_n_tiles
    tile = pid // num_n_tiles
    if tile >= tl.load(SCHEDULE):
        return
    expert = tl.load(SCHEDULE + 1 + tile)
    start = tl.load(SCHEDULE + 1 + max_tiles + tile)
    end = tl.minimum(tl.load(OFFSETS + expert + 1).to(tl.int32), start + BLOCK_M)

    offs_m = start + tl.arange(0, BLOCK_M)
    mask_m = offs_m < end
    slot = tl.load(ORDER + offs_m, mask=mask_m, other=0)  # int64: row * stride never overflows
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = A + (slot // A_DIV)[:, None] * stride_a_row + offs_k[None, :] * stride_a_col
    b_ptrs = (
        B
        + expert.to(tl.int64) * stride_b_e
        + offs_k[:, None] * stride_b_k
        + offs_n[None, :] * stride_b_n
    )
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if DOT_IN_FP32:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_a_col
        b_ptrs += BLOCK_K * stride_b_k

    out_row = slot // OUT_DIV
    mask_mn = mask_m[:, None] & mask_n[None, :]
    if GATE_GRAD:
        x = tl.load(
            X + out_row[:, None] * stride_x_row + offs_n[None, :] * stride_x_col,
            mask=mask_mn,
            other=0.0,
        )
        partial = tl.sum(acc * x.to(tl.float32), axis=1)
        tl.store(GATE_GRAD_PART + pid_n.to(tl.int64) * stride_gg + slot, partial, mask=mask_m)
    if HAS_GATES:
        acc = acc * tl.load(GATES + slot, mask=mask_m, other=0.0).to(tl.float32)[:, None]
    if WRITE_OUT:
        out_offs = out_row[:, None] * stride_out_row + offs_n[None, :] * stride_out_col
        if ATOMIC:
            tl.atomic_add(OUT + out_offs, acc, mask=mask_mn, sem="relaxed")
        else:
            if LOAD_PREV:
                acc += tl.load(PREV + out_offs, mask=mask_mn, other=0.0)
            tl.store(OUT + out_offs, acc.to(OUT.dtype.element_ty), mask=mask_mn)


_TUNE_KEY = [
    "K", "N", "num_experts", "rows_bucket", "BLOCK_M", "ATOMIC", "LOAD_PREV", "HAS_GATES",
    "GATE_GRAD",
]  # fmt: skip

# Two autotuned entry points over one kernel. Write-once launches are idempotent, so tuning may
# rerun them freely. Accumulating launches (atomics, in-place passes) are not: tuning restores
# OUT after every trial, which costs a copy of OUT, so it is only paid where needed.
_cvmm_gemm_store = triton.autotune(
    configs=gemm_configs(), key=_TUNE_KEY, prune_configs_by={"early_config_prune": prune_gemm}
)(_cvmm_gemm_kernel)
_cvmm_gemm_accumulate = triton.autotune(
    configs=gemm_configs(),
    key=_TUNE_KEY,
    prune_configs_by={"early_config_prune": prune_gemm},
    restore_value=["OUT"],
)(_cvmm_gemm_kernel)


def gather_gemm(
    a: torch.Tensor,
    a_div: int,
    b_EKN: torch.Tensor,
    order: torch.Tensor,
    offsets: torch.Tensor,
    num_rows: int,
    *,
    out: torch.Tensor,
    out_div: int,
    gates: torch.Tensor | None = None,
    atomic: bool = False,
    prev: torch.Tensor | None = None,
    write_out: bool = True,
    x: torch.Tensor | None = None,
    gate_grad_part: torch.Tensor | None = None,
    allow_tf32: bool = False,
) -> None:
    """Launch the gather-GEMM kernel over `num_rows` sorted positions `offsets[0]:offsets[-1]`.

    `b_EKN` may be any strided view (the input gradient passes `W.transpose(1, 2)`). With
    `gate_grad_part` ([cdiv(N, 16), M] fp32, zeroed) set, the gate-gradient partials of this
    launch's slots are written into it against `x` ([rows_out, N]).
    """
    num_experts, k_dim, n_dim = b_EKN.shape
    assert a.dim() == 2 and a.shape[1] == k_dim, f"A {tuple(a.shape)} vs B {tuple(b_EKN.shape)}"
    assert a.dtype == b_EKN.dtype and a.dtype in _DTYPES, f"dtypes {a.dtype} and {b_EKN.dtype}"
    assert out.dim() == 2 and out.shape[1] == n_dim, f"OUT {tuple(out.shape)}, N={n_dim}"
    assert not atomic or out.dtype == torch.float32, "atomic accumulation needs an fp32 OUT"
    assert order.dtype == torch.int64 and order.dim() == 1, "order must be int64 [M]"
    assert offsets.dtype == torch.int64 and offsets.shape == (num_experts + 1,), "offsets [E+1]"
    assert order.numel() < 2**31, "sorted positions are int32 inside the kernel"
    if prev is not None:
        assert prev.dtype == torch.float32 and prev.shape == out.shape
        assert prev.stride() == out.stride(), "PREV shares OUT's strides"
    if gates is not None:
        assert gates.dim() == 1 and gates.numel() == order.numel(), "gates must be flat [M]"
    if gate_grad_part is not None:
        assert x is not None and x.shape == out.shape, "gate gradient needs x rows like OUT"
        assert gate_grad_part.dtype == torch.float32 and gate_grad_part.stride(1) == 1
        assert gate_grad_part.shape[0] >= triton.cdiv(n_dim, 16)
    if num_rows == 0:
        return
    dummy = out
    x_strides = x.stride() if x is not None else (0, 0)
    block_m = choose_block_m(num_rows, num_experts)
    schedule, max_tiles = tile_schedule(offsets, num_rows, block_m)

    def grid(meta):
        return (max_tiles * triton.cdiv(n_dim, meta["BLOCK_N"]),)

    kernel = _cvmm_gemm_accumulate if atomic or prev is out else _cvmm_gemm_store
    kernel[grid](
        a, *a.stride(),
        b_EKN, *b_EKN.stride(),
        out, *out.stride(),
        prev if prev is not None else dummy,
        gates if gates is not None else dummy,
        x if x is not None else dummy, *x_strides,
        gate_grad_part if gate_grad_part is not None else dummy,
        gate_grad_part.stride(0) if gate_grad_part is not None else 0,
        order, offsets, schedule, max_tiles, rows_bucket(num_rows),
        num_experts, k_dim, n_dim, a_div, out_div,
        WRITE_OUT=write_out,
        ATOMIC=atomic,
        LOAD_PREV=prev is not None,
        HAS_GATES=gates is not None,
        GATE_GRAD=gate_grad_part is not None,
        INPUT_PRECISION="tf32" if allow_tf32 else "ieee",
        DOT_IN_FP32=interpreter_dot_in_fp32(a.dtype),
        BLOCK_M=block_m,
    )  # fmt: skip
