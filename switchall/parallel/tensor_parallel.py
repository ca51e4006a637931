"""Tensor parallelism for the attention and dense MLP sub-layers, applied in place.

Legend: H heads, h = H / T heads on this rank, E experts per head, Dh head width, D model width,
F dense MLP width, T tensor-parallel size, t this rank's tensor-parallel rank.

Each function takes a single-device module holding the full weights (identical on every rank)
and keeps this rank's share, so parameter names stay those of the single-device model:
- Dense attention: q, k, v (and XL's pos) become megatron `ColumnParallelLinear`s over this
  rank's heads, o a `RowParallelLinear` (its forward all-reduce sums the heads' outputs).
- SwitchHead: heads [t*h, (t+1)*h) with their Q, K, routing rows and V/O expert banks (rows
  h'*E + e of every bank, contiguous per head) stay on this rank; the module's own forward runs
  on them, and its output, a partial sum over heads, is all-reduced with megatron's
  `reduce_from_tensor_model_parallel_region` (backward: identity).
- Dense MLP: up is column-parallel, down row-parallel (bias added once, after the reduction).
- σ-MoE: each expert's width is cut (`expert_parallel.shard_sigma_moe_width`, next to the
  forward that uses it).

Gradients: activations outside these regions are replicated over the tensor-parallel group and
carry full, identical gradients on every rank. The inputs of an attention layer enter through
`copy_to_tensor_model_parallel_region` (forward: identity; backward: all-reduce of the
per-head partial input gradients) once per input, instead of once per projection, so the
column-parallel projections skip their own reduction (`disable_grad_reduce`). A parameter
replicated inside a region (XL's learnable softmax `scale`) is read through the same copy, so
its gradient, partial per rank, is summed over the group. Sharded parameters carry megatron's
`tensor_model_parallel` attribute, which is how DeepSpeed counts them on every rank, and the
replicated ones once, in the global gradient norm.
"""

from __future__ import annotations

import torch
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)
from torch import nn
from torch.nn.utils import parametrize

from switchall.models.attention import DenseAttention
from switchall.models.mlp import DenseMLP
from switchall.models.routing import derive_seed
from switchall.models.switchhead import SwitchHeadAttention
from switchall.parallel.layout import ParallelLayout
from switchall.parallel.sharded_state import mark_shard


def shard_parameter(p: torch.Tensor, dim: int, start: int, stop: int) -> nn.Parameter:
    """A new parameter holding `p[start:stop]` along `dim`, marked as tensor-parallel."""
    shard = nn.Parameter(
        p.detach().narrow(dim, start, stop - start).clone(memory_format=torch.contiguous_format)
    )
    set_tensor_model_parallel_attributes(shard, True, dim, 1)
    mark_shard(shard, dim, start, p.shape[dim])
    return shard


class ColumnLinear(ColumnParallelLinear):
    """`ColumnParallelLinear` standing in for an `nn.Linear`: returns the output only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[0]


class RowLinear(RowParallelLinear):
    """`RowParallelLinear` standing in for an `nn.Linear`: returns the reduced output only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[0]


def _megatron_config(layout: ParallelLayout, dtype: torch.dtype) -> ModelParallelConfig:
    # Weights are copied in from the single-device model, so megatron allocates on the CPU
    # without initialising (CUDA-free), and the module is moved to the model's device after.
    return ModelParallelConfig(
        tensor_model_parallel_size=layout.tp_size,
        use_cpu_initialization=True,
        perform_initialization=False,
        params_dtype=dtype,
    )


def _no_init(weight: torch.Tensor) -> None:
    pass


def column_linear(lin: nn.Linear, layout: ParallelLayout, *, reduce_input_grad: bool):
    """This rank's output rows [t*F/T, (t+1)*F/T) of `lin` as a `ColumnLinear`."""
    w = lin.weight
    m = ColumnLinear(
        lin.in_features,
        lin.out_features,
        config=_megatron_config(layout, w.dtype),
        init_method=_no_init,
        bias=lin.bias is not None,
        gather_output=False,
        tp_group=layout.tp_group,
        disable_grad_reduce=not reduce_input_grad,
    ).to(w.device)
    rows = m.output_size_per_partition
    start = layout.tp_rank * rows
    with torch.no_grad():
        m.weight.copy_(w[start : start + rows])
        if lin.bias is not None:
            m.bias.copy_(lin.bias[start : start + rows])
            mark_shard(m.bias, 0, start, lin.out_features)  # megatron marked it parallel
    set_tensor_model_parallel_attributes(m.weight, True, 0, 1)
    mark_shard(m.weight, 0, start, lin.out_features)
    return m


def row_linear(lin: nn.Linear, layout: ParallelLayout) -> RowLinear:
    """This rank's input columns of `lin` as a `RowLinear` (output all-reduced, bias once)."""
    w = lin.weight
    m = RowLinear(
        lin.in_features,
        lin.out_features,
        config=_megatron_config(layout, w.dtype),
        init_method=_no_init,
        bias=lin.bias is not None,
        input_is_parallel=True,
        skip_bias_add=False,
        tp_group=layout.tp_group,
    ).to(w.device)
    cols = m.input_size_per_partition
    start = layout.tp_rank * cols
    with torch.no_grad():
        m.weight.copy_(w[:, start : start + cols])
        if lin.bias is not None:
            m.bias.copy_(lin.bias)
    set_tensor_model_parallel_attributes(m.weight, True, 1, 1)
    mark_shard(m.weight, 1, start, lin.in_features)
    return m


class _CopyToRegion(nn.Module):
    """Parametrization: read a replicated parameter through megatron's copy-to-region."""

    def __init__(self, group):
        super().__init__()
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return copy_to_tensor_model_parallel_region(x, group=self.group)


def _copy_attention_inputs(group):
    def hook(module, args):
        q_src_BTD, kv_src_BLD, *rest = args
        return (
            copy_to_tensor_model_parallel_region(q_src_BTD, group=group),
            copy_to_tensor_model_parallel_region(kv_src_BLD, group=group),
            *rest,
        )

    return hook


def _reduce_output(group):
    def hook(module, args, out_BTD):
        return reduce_from_tensor_model_parallel_region(out_BTD.contiguous(), group=group)

    return hook


def shard_dense_attention(attn: DenseAttention, layout: ParallelLayout) -> None:
    """Keep this rank's heads of a dense (XL or RoPE) attention layer, megatron linears."""
    t, h = layout.tp_rank, attn.num_heads // layout.tp_size
    for name in ("q", "k", "v", "pos") if attn.xl else ("q", "k", "v"):
        setattr(attn, name, column_linear(getattr(attn, name), layout, reduce_input_grad=False))
    attn.o = row_linear(attn.o, layout)
    if attn.xl:
        attn.u_HD = shard_parameter(attn.u_HD, 0, t * h, (t + 1) * h)
        attn.v_HD = shard_parameter(attn.v_HD, 0, t * h, (t + 1) * h)
        parametrize.register_parametrization(attn, "scale", _CopyToRegion(layout.tp_group))
    attn.num_heads = h
    attn.register_forward_pre_hook(_copy_attention_inputs(layout.tp_group))


def shard_switchhead(attn: SwitchHeadAttention, layout: ParallelLayout) -> None:
    """Keep this rank's heads of a SwitchHead layer, with everything each head owns."""
    t, h, e = layout.tp_rank, attn.num_heads // layout.tp_size, attn.num_experts
    rows = (t * h * e, (t + 1) * h * e)  # this rank's (head, expert) rows of banks and routers
    for name in "qkv":
        if name in attn.moe:
            bank = f"{name}_experts"
            setattr(attn, bank, shard_parameter(getattr(attn, bank), 0, *rows))
        else:
            setattr(attn, name, column_linear(getattr(attn, name), layout, reduce_input_grad=False))
    if "o" in attn.moe:
        attn.o_experts = shard_parameter(attn.o_experts, 0, *rows)
        attn.register_forward_hook(_reduce_output(layout.tp_group))
    else:
        attn.o = row_linear(attn.o, layout)
    for name in ("sel_src", "sel_dst"):
        if hasattr(attn, name):
            setattr(attn, name, shard_parameter(getattr(attn, name), 0, *rows))
    if attn.xl:
        attn.pos = column_linear(attn.pos, layout, reduce_input_grad=False)
    attn.num_heads, attn.head_offset = h, t * h
    attn.register_forward_pre_hook(_copy_attention_inputs(layout.tp_group))


class TensorParallelDropout(nn.Module):
    """Dropout on an activation sharded over the tensor-parallel group.

    The global RNG must stay in lockstep over the group (replicated activations need identical
    masks), but each shard needs its own mask. So each call draws one seed from the global RNG,
    the same draw on every rank, and masks with a private generator seeded by (seed, tp_rank):
    nothing extra to checkpoint, and a resumed run draws the same masks.
    """

    def __init__(self, p: float, tp_rank: int):
        super().__init__()
        self.p, self.tp_rank = p, tp_rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        seed = int(torch.randint(0, 2**31 - 1, (1,)))
        gen = torch.Generator(device=x.device)
        gen.manual_seed(derive_seed(seed, self.tp_rank))
        keep = torch.empty_like(x).bernoulli_(1.0 - self.p, generator=gen)
        return x * keep / (1.0 - self.p)


def shard_dense_mlp(mlp: DenseMLP, layout: ParallelLayout) -> None:
    """Keep this rank's columns of the dense MLP (its inner dropout per shard)."""
    # up's own backward all-reduce sums the input gradient: it is the only consumer of x.
    mlp.up = column_linear(mlp.up, layout, reduce_input_grad=True)
    mlp.down = row_linear(mlp.down, layout)
    mlp.drop = TensorParallelDropout(mlp.drop.p, layout.tp_rank)
