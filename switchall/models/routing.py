"""Sigmoid, non-competitive top-k routing with expert dropout, and the σ-MoE entropy regulariser.

Legend: X routed rows (tokens, or tokens of one head), E experts, K selected experts.

Expert-dropout draws come from a counter-based hash of (seed, global row, expert) rather than
from the torch RNG. A token's draw is then the same whichever rank, micro-batch or tensor- or
expert-parallel layout processes it, so a parallel run drops the same experts as a
single-process run with the same seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK32 = 0xFFFFFFFF
_MUL = 0x45D9F3B  # < 2**31, so products of 32-bit values never overflow int64


def _mix32_int(x: int) -> int:
    x &= _MASK32
    x ^= x >> 16
    x = (x * _MUL) & _MASK32
    x ^= x >> 16
    x = (x * _MUL) & _MASK32
    return x ^ (x >> 16)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * _MUL) & _MASK32
    x = x ^ (x >> 16)
    x = (x * _MUL) & _MASK32
    return x ^ (x >> 16)


def derive_seed(*parts: int) -> int:
    """A 32-bit seed from integer parts (e.g. run seed, step, layer, routing side)."""
    h = 0x9E3779B9
    for p in parts:
        h = _mix32_int(h ^ _mix32_int(p & _MASK32) ^ ((p >> 32) & _MASK32))
    return h


def hashed_uniform(seed: int, index: torch.Tensor) -> torch.Tensor:
    """Uniform [0, 1) floats, a pure function of (seed, index) for int64 `index` tensors."""
    x = _mix32(_mix32(index) ^ (seed & _MASK32))
    return (x >> 8).to(torch.float32) * (1.0 / (1 << 24))


@dataclass(frozen=True)
class NoiseContext:
    """Where a forward pass's expert-dropout draws come from.

    seed: per-step seed (the trainer derives it from the run seed and the step).
    row_offset: global index of the first batch row this process holds (its data-parallel
        rank's lane offset plus the micro-batch offset), so rows are named globally.
    """

    seed: int
    row_offset: int = 0


def expert_dropout_mask(
    p: float,
    shape_XE: tuple[int, ...],
    device: torch.device,
    noise: NoiseContext | None,
    salt: int,
    rows_per_batch_row: int,
    expert_offset: int = 0,
    total_experts: int | None = None,
) -> torch.Tensor:
    """Boolean mask of dropped (row, expert) pairs for a `[X, E]` routing tensor.

    Rows are laid out batch-major with `rows_per_batch_row` rows per batch row (e.g. the
    sequence positions), so global row = (row_offset + b) * rows_per_batch_row + position.
    `expert_offset` names the first expert of this tensor in the global expert numbering
    (a tensor-parallel rank holding heads 2..3 of 4 passes 2 * E).
    """
    num_x, num_e = shape_XE
    if noise is None:
        return torch.rand(shape_XE, device=device) < p
    total = total_experts if total_experts is not None else num_e
    row_X = torch.arange(num_x, device=device, dtype=torch.int64)
    row_X = row_X + noise.row_offset * rows_per_batch_row
    expert_E = torch.arange(num_e, device=device, dtype=torch.int64) + expert_offset
    index_XE = row_X[:, None] * total + expert_E[None, :]
    return hashed_uniform(derive_seed(noise.seed, salt), index_XE) < p


def routing_logits(x_XD: torch.Tensor, w_ED: torch.Tensor) -> torch.Tensor:
    """x @ w.T in at least fp32, even under autocast: top-k on bf16 logits would tie and flip."""
    dtype = torch.promote_types(x_XD.dtype, torch.float32)
    with torch.autocast(device_type=x_XD.device.type, enabled=False):
        return torch.nn.functional.linear(x_XD.to(dtype), w_ED.to(dtype))


def sigmoid_topk(
    logits_XE: torch.Tensor, k: int, drop_XE: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Select the k largest sigmoid scores per row; gates are the raw (unnormalised) sigmoids.

    Dropped experts are excluded from the choice; if fewer than k survive, the dropped ones that
    still get picked carry a zero gate. Top-k runs on logits (σ is monotone) under no_grad:
    only the gate values are differentiable.
    """
    with torch.no_grad():
        choice_XE = logits_XE if drop_XE is None else logits_XE.masked_fill(drop_XE, float("-inf"))
        idx_XK = choice_XE.topk(k, dim=-1, sorted=False).indices
    gates_XK = torch.sigmoid(logits_XE).gather(-1, idx_XK)
    if drop_XE is not None:
        gates_XK = gates_XK.masked_fill(drop_XE.gather(-1, idx_XK), 0.0)
    return gates_XK, idx_XK
