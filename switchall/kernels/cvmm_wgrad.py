"""Triton weight gradient of CVMM: dW[e] = sum over e's assignments of x_row^T (g * grad_out_row).

Legend: M assignments sorted by expert, E experts, I = d_in, O = d_out. For sorted position p
with slot s = ORDER[p]: x row s // X_DIV, grad row s // G_DIV, scaled by GATES[s] when gated.
The gated gradient rows are formed tile by tile in registers; the official kernel instead
materialises gates * grad_out as [..., k, O] before the matmul.

Two modes, both reducing over the sorted list with an fp32 accumulator:
- fast (split-K): programs own CHUNK rows of one expert (numbered expert by expert, see
  cvmm_tiles.py) and one (I, O) tile, and fp32-atomically add into a zeroed fp32 dW. More
  programs than experts keeps all SMs busy when E is small; the atomics make the summation
  order, and so the last bits, vary run to run.
- deterministic: one program per (expert, (I, O) tile) loops over the expert's whole range in
  a fixed order and stores its tile once, in the weight dtype. No atomics: bitwise
  reproducible. An expert with no rows stores zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from switchall.kernels.cvmm_configs import interpreter_dot_in_fp32, prune_wgrad, wgrad_configs
from switchall.kernels.cvmm_tiles import _expert_major_chunk, grid_upper_bound, rows_bucket


@triton.autotune(
    configs=wgrad_configs(),
    key=["D_I", "D_O", "num_experts", "rows_bucket", "DETERMINISTIC", "HAS_GATES"],
    prune_configs_by={"early_config_prune": prune_wgrad},
    restore_value=["DW"],  # split-K atomics accumulate: every tuning trial starts from zeros
)
@triton.jit(do_not_specialize=["rows_bucket"])
def _cvmm_wgrad_kernel(
    X,  # pointer to input rows [rows_x, D_I]
    stride_x_row,
    stride_x_col,
    G,  # pointer to output-gradient rows [rows_g, D_O]
    stride_g_row,
    stride_g_col,
    GATES,  # pointer to flat gates [M], indexed by slot (HAS_GATES)
    ORDER,  # pointer to int64 [M]: flat slot of each sorted position
    OFFSETS,  # pointer to int64 [E + 1]: expert ranges in ORDER
    DW,  # pointer to [E, D_I, D_O]: fp32 and zeroed unless DETERMINISTIC
    stride_dw_e,
    stride_dw_i,
    stride_dw_o,
    num_experts,
    D_I,
    D_O,
    X_DIV,  # slots per x row
    G_DIV,  # slots per grad row
    rows_bucket,  # log2 bucket of the row count: only an autotune key
    E_POW2: tl.constexpr,
    DETERMINISTIC: tl.constexpr,
    HAS_GATES: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,  # interpreter only: see interpreter_dot_in_fp32
    BLOCK_I: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_R: tl.constexpr,  # sorted rows per step of the reduction
    CHUNK: tl.constexpr,  # rows per program in fast mode
):
    pid = tl.program_id(0)
    num_o_tiles = (D_O + BLOCK_O - 1) // BLOCK_O
    num_w_tiles = (D_I + BLOCK_I - 1) // BLOCK_I * num_o_tiles
    # The (I, O) tiles of one row range are adjacent in launch order: they share the gathered
    # rows through L2.
    pid_w = pid % num_w_tiles
    pid_r = pid // num_w_tiles
    if DETERMINISTIC:
        expert = pid_r
        valid = expert < num_experts
        start = tl.load(OFFSETS + expert).to(tl.int32)
        end = tl.load(OFFSETS + expert + 1).to(tl.int32)
    else:
        valid, expert, start, end = _expert_major_chunk(pid_r, OFFSETS, num_experts, E_POW2, CHUNK)
    if not valid:
        return

    offs_i = (pid_w // num_o_tiles) * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_o = (pid_w % num_o_tiles) * BLOCK_O + tl.arange(0, BLOCK_O)
    mask_i = offs_i < D_I
    mask_o = offs_o < D_O
    acc = tl.zeros((BLOCK_I, BLOCK_O), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < end
        slot = tl.load(ORDER + offs_r, mask=mask_r, other=0)  # int64
        # x^T tile [BLOCK_I, BLOCK_R], loaded transposed so tl.dot needs no shuffle.
        x_t = tl.load(
            X + (slot // X_DIV)[None, :] * stride_x_row + offs_i[:, None] * stride_x_col,
            mask=mask_i[:, None] & mask_r[None, :],
            other=0.0,
        )
        g = tl.load(
            G + (slot // G_DIV)[:, None] * stride_g_row + offs_o[None, :] * stride_g_col,
            mask=mask_r[:, None] & mask_o[None, :],
            other=0.0,
        )
        if HAS_GATES:
            # One rounding of g * grad to the input dtype so the tensor cores take it.
            gate = tl.load(GATES + slot, mask=mask_r, other=0.0).to(tl.float32)
            g = (g.to(tl.float32) * gate[:, None]).to(G.dtype.element_ty)
        if DOT_IN_FP32:
            x_t, g = x_t.to(tl.float32), g.to(tl.float32)
        acc = tl.dot(x_t, g, acc, input_precision=INPUT_PRECISION)

    dw_ptrs = (
        DW
        + expert.to(tl.int64) * stride_dw_e
        + offs_i[:, None] * stride_dw_i
        + offs_o[None, :] * stride_dw_o
    )
    mask_w = mask_i[:, None] & mask_o[None, :]
    if DETERMINISTIC:
        tl.store(dw_ptrs, acc.to(DW.dtype.element_ty), mask=mask_w)
    else:
        tl.atomic_add(dw_ptrs, acc, mask=mask_w, sem="relaxed")


def cvmm_weight_grad(
    x: torch.Tensor,
    x_div: int,
    grad: torch.Tensor,
    grad_div: int,
    order: torch.Tensor,
    offsets: torch.Tensor,
    *,
    gates: torch.Tensor | None,
    out_dtype: torch.dtype,
    deterministic: bool,
    allow_tf32: bool = False,
) -> torch.Tensor:
    """dW `[E, I, O]` in `out_dtype` from x rows `[*, I]` and gradient rows `[*, O]`."""
    num_experts = offsets.numel() - 1
    d_in, d_out = x.shape[1], grad.shape[1]
    assert x.dim() == 2 and grad.dim() == 2, "x and grad are 2-D rows"
    assert x.dtype == grad.dtype, f"x {x.dtype} vs grad {grad.dtype}"
    assert order.dtype == torch.int64 and offsets.dtype == torch.int64
    assert order.numel() < 2**31, "sorted positions are int32 inside the kernel"
    assert gates is None or gates.shape == order.shape, "gates must be flat [M]"
    num_rows = order.numel()
    if deterministic:
        # Every element is stored exactly once (zeros for experts without rows).
        dw = torch.empty(num_experts, d_in, d_out, dtype=out_dtype, device=x.device)
    else:
        dw = torch.zeros(num_experts, d_in, d_out, dtype=torch.float32, device=x.device)
        if num_rows == 0:
            return dw.to(out_dtype)

    def grid(meta):
        w_tiles = triton.cdiv(d_in, meta["BLOCK_I"]) * triton.cdiv(d_out, meta["BLOCK_O"])
        if deterministic:
            return (num_experts * w_tiles,)
        return (grid_upper_bound(num_rows, meta["CHUNK"], num_experts) * w_tiles,)

    _cvmm_wgrad_kernel[grid](
        x, *x.stride(),
        grad, *grad.stride(),
        gates if gates is not None else grad,
        order, offsets,
        dw, *dw.stride(),
        num_experts, d_in, d_out, x_div, grad_div, rows_bucket(num_rows),
        E_POW2=max(2, triton.next_power_of_2(num_experts)),
        DETERMINISTIC=deterministic,
        HAS_GATES=gates is not None,
        INPUT_PRECISION="tf32" if allow_tf32 else "ieee",
        DOT_IN_FP32=interpreter_dot_in_fp32(x.dtype),
    )  # fmt: skip
    return dw if dw.dtype == out_dtype else dw.to(out_dtype)
