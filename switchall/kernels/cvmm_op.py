"""CVMM as `torch.library` custom ops, so `torch.compile(fullgraph=True)` sees one opaque node.

Two ops in the `switchall` namespace, both on 2-D input rows and the flat sorted selection:

- `switchall::cvmm_fwd(x_rows, weight, sorted_expert, order, offsets, gates?, k, num_out_rows,
  deterministic, allow_tf32, backend) -> out`: `[M, O]` per-slot outputs, or `[num_out_rows, O]`
  gated sums when flat `gates [M]` is given.
- `switchall::cvmm_bwd(grad_out, <the same inputs>, need_x, need_w, need_gates, ...) ->
  (grad_x, grad_w, grad_gates)`: the hand-written backward; gradients that were not asked for
  come back as empty tensors (an op returns tensors, not None).

`register_autograd` wires the second as the backward of the first; `register_fake` gives both
their output shapes from input shapes alone (nothing depends on the routing), so they trace
under fake tensors and dynamic shapes. The backend is an argument of the op: "triton" runs the
kernels of `cvmm_triton.py` (imported on first use, so `import switchall` never needs triton),
"torch" the expert loop of `cvmm_torch.py`.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch

from switchall.kernels.cvmm_torch import torch_backward, torch_forward

BACKENDS = ("torch", "triton")
BACKEND_ENV = "SWITCHALL_CVMM_BACKEND"
DETERMINISTIC_ENV = "SWITCHALL_CVMM_DETERMINISTIC"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """Per-call choice, else `$SWITCHALL_CVMM_BACKEND`, else triton on CUDA and torch elsewhere."""
    choice = backend if backend is not None else os.environ.get(BACKEND_ENV, "auto")
    choice = choice.strip().lower()
    if choice == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if choice not in BACKENDS:
        source = "backend" if backend is not None else f"${BACKEND_ENV}"
        raise ValueError(f"{source} must be 'auto', 'torch' or 'triton', got {choice!r}")
    if choice == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "the triton CVMM backend runs CPU tensors only under the Triton interpreter: set "
            "TRITON_INTERPRET=1 before triton is first imported"
        )
    return choice


def resolve_deterministic(deterministic: bool | None) -> bool:
    """Per-call choice, else `$SWITCHALL_CVMM_DETERMINISTIC`, else PyTorch's global flag."""
    if deterministic is not None:
        return bool(deterministic)
    env = os.environ.get(DETERMINISTIC_ENV, "").strip().lower()
    if env in _TRUE:
        return True
    if env in _FALSE:
        return False
    if env:
        raise ValueError(f"${DETERMINISTIC_ENV} must be 0 or 1, got {env!r}")
    return torch.are_deterministic_algorithms_enabled()


def _triton_impl() -> ModuleType:
    try:
        from switchall.kernels import cvmm_triton
    except Exception as e:  # ImportError, or triton finding no usable driver
        raise RuntimeError(f"the triton CVMM backend is unavailable: {e!r}") from e
    return cvmm_triton


@torch.library.custom_op("switchall::cvmm_fwd", mutates_args=())
def cvmm_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    sorted_expert: torch.Tensor,
    order: torch.Tensor,
    offsets: torch.Tensor,
    gates: torch.Tensor | None,
    k: int,
    num_out_rows: int,
    deterministic: bool,
    allow_tf32: bool,
    backend: str,
) -> torch.Tensor:
    if backend == "triton":
        return _triton_impl().cvmm_forward(
            x, weight, sorted_expert, order, offsets, gates, k, num_out_rows,
            deterministic, allow_tf32,
        )  # fmt: skip
    return torch_forward(x, weight, order, offsets, gates, k, num_out_rows, "auto", sorted_expert)


@cvmm_fwd.register_fake
def _cvmm_fwd_fake(x, weight, sorted_expert, order, offsets, gates, k, num_out_rows, *_):
    rows = num_out_rows if gates is not None else order.shape[0]
    return x.new_empty(rows, weight.shape[2])


@torch.library.custom_op("switchall::cvmm_bwd", mutates_args=())
def cvmm_bwd(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    sorted_expert: torch.Tensor,
    order: torch.Tensor,
    offsets: torch.Tensor,
    gates: torch.Tensor | None,
    k: int,
    num_out_rows: int,
    need_x: bool,
    need_w: bool,
    need_gates: bool,
    deterministic: bool,
    allow_tf32: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    need_gates = need_gates and gates is not None
    if backend == "triton":
        grads = _triton_impl().cvmm_backward(
            grad_out, x, weight, sorted_expert, order, offsets, gates, k, num_out_rows,
            need_x, need_w, need_gates, deterministic, allow_tf32,
        )  # fmt: skip
    else:
        grads = torch_backward(
            grad_out, x, weight, order, offsets, gates, k, num_out_rows,
            need_x, need_w, need_gates, "auto", sorted_expert,
        )  # fmt: skip
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@cvmm_bwd.register_fake
def _cvmm_bwd_fake(grad_out, x, weight, sorted_expert, order, offsets, gates, k, num_out_rows,
                   need_x, need_w, need_gates, *_):  # fmt: skip
    need_gates = need_gates and gates is not None
    return (
        x.new_empty(x.shape) if need_x else x.new_empty(0),
        weight.new_empty(weight.shape) if need_w else x.new_empty(0),
        gates.new_empty(gates.shape) if need_gates else x.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    x, weight, sorted_expert, order, offsets, gates, *options = inputs
    ctx.save_for_backward(x, weight, sorted_expert, order, offsets, gates)
    ctx.options = options  # k, num_out_rows, deterministic, allow_tf32, backend


def _backward(ctx, grad_out):
    x, weight, sorted_expert, order, offsets, gates = ctx.saved_tensors
    k, num_out_rows, deterministic, allow_tf32, backend = ctx.options
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_gates = gates is not None and ctx.needs_input_grad[5]
    grad_x, grad_w, grad_g = cvmm_bwd(
        grad_out, x, weight, sorted_expert, order, offsets, gates, k, num_out_rows,
        need_x, need_w, need_gates, deterministic, allow_tf32, backend,
    )  # fmt: skip
    return (
        grad_x if need_x else None,
        grad_w if need_w else None,
        None,
        None,
        None,
        grad_g if need_gates else None,
        None,
        None,
        None,
        None,
        None,
    )


cvmm_fwd.register_autograd(_backward, setup_context=_setup_context)
