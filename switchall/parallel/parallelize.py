"""Turn the plain single-device model into a parallel one: one function, one fixed order.

1. Tensor parallel: attention heads (dense and SwitchHead), dense MLP columns, σ-MoE expert
   widths are cut to this rank's tensor-parallel share.
2. Expert parallel: σ-MoE experts are cut to this rank's expert-parallel share and the layers
   switch to dispatching tokens by all-to-all; the regulariser's statistics span the global batch.
3. The DeepSpeed engine (ZeRO stage 0-3) takes the result, with the layout's groups.

Every rank must build the same full model first (same seed): the cuts then reproduce the
single-process initial weights exactly, and the model code never sees a process group.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from switchall.models.attention import DenseAttention
from switchall.models.lm import LanguageModel
from switchall.models.mlp import DenseMLP
from switchall.models.sigma_moe import SigmaMoE
from switchall.models.switchhead import SwitchHeadAttention
from switchall.parallel.deepspeed_engine import DeepSpeedEngine, DeepSpeedModule
from switchall.parallel.expert_parallel import (
    GlobalBatchStats,
    parallelize_sigma_moe,
    shard_sigma_moe_width,
)
from switchall.parallel.layout import ParallelLayout
from switchall.parallel.tensor_parallel import (
    shard_dense_attention,
    shard_dense_mlp,
    shard_switchhead,
)


@dataclass
class ParallelModel:
    """The result of `parallelize_model`."""

    module: DeepSpeedModule
    """What the training loop calls (the DeepSpeed engine's forward)."""
    engine: DeepSpeedEngine
    model: LanguageModel
    """The parallelised model itself (this rank's shards, single-device parameter names)."""


def apply_tensor_parallel(model: LanguageModel, layout: ParallelLayout) -> None:
    """Step 1: cut heads, MLP columns and expert widths to this rank's tensor-parallel share."""
    if layout.tp_size == 1:
        return
    for block in model.blocks:
        if isinstance(block.attn, SwitchHeadAttention):
            shard_switchhead(block.attn, layout)
        elif isinstance(block.attn, DenseAttention):
            shard_dense_attention(block.attn, layout)
        if isinstance(block.mlp, DenseMLP):
            shard_dense_mlp(block.mlp, layout)
        elif isinstance(block.mlp, SigmaMoE):
            shard_sigma_moe_width(block.mlp, layout)


def apply_expert_parallel(model: LanguageModel, layout: ParallelLayout) -> None:
    """Step 2: cut σ-MoE experts to this rank's share; global-batch regulariser statistics."""
    for block in model.blocks:
        if isinstance(block.mlp, SigmaMoE) and (layout.tp_size > 1 or layout.ep_size > 1):
            parallelize_sigma_moe(block.mlp, layout)
    if layout.dp_size > 1:
        # p̄ over the global batch (spec §4, sync_distributed): the data replicas' token
        # statistics are summed; tensor-parallel ranks compute identical ones. With gradient
        # accumulation, per micro-batch: the union of every replica's i-th one. All layers'
        # statistics go in one all-reduce per forward (and one in backward).
        model.set_stats_reducer(GlobalBatchStats(layout.dp_group))


def parallelize_model(model: nn.Module, layout: ParallelLayout, cfg) -> ParallelModel:
    """Apply tensor parallel, expert parallel, then the DeepSpeed engine to `model` (in place).

    `cfg` is the `RunConfig` (optimiser, batch and accumulation feed the engine).
    """
    if not isinstance(model, LanguageModel):
        raise TypeError(f"expected a LanguageModel, got {type(model).__name__}")
    apply_tensor_parallel(model, layout)
    apply_expert_parallel(model, layout)
    engine = DeepSpeedEngine(model, layout, cfg)
    return ParallelModel(module=engine.wrapped, engine=engine, model=model)
