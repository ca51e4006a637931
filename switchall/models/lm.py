"""The language model: embedding, pre-LN blocks, final LayerNorm, untied output layer (spec §2.1).

Legend: B batch, T tokens in the current chunk, M memory tokens, D model width, V vocabulary.

XL memory is the detached *input* of each layer over the previous M tokens; the block
normalises memory and current chunk with the same LayerNorm and recomputes K/V from them
(spec §2.3). Variants: transformer (dense attention + dense MLP), switchhead (SwitchHead +
dense MLP), switchall (SwitchHead + σ-MoE), sigma_moe (dense attention + σ-MoE).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from switchall.models.attention import DenseAttention
from switchall.models.config import ModelConfig
from switchall.models.init import dense_std, normal_
from switchall.models.mlp import DenseMLP
from switchall.models.routing import NoiseContext
from switchall.models.sigma_moe import (
    RegulariserStats,
    SigmaMoE,
    StatsReducer,
    reduce_regularisers,
)
from switchall.models.switchhead import SwitchHeadAttention


@dataclass
class LMOutput:
    logits_BTV: torch.Tensor
    memory: list[torch.Tensor] | None
    """Per layer, the detached layer inputs to attend to in the next chunk (None without XL)."""
    aux_loss: torch.Tensor
    """Sum of the σ-MoE regularisers (already weighted); add it to the LM loss."""


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        attn_cls = SwitchHeadAttention if cfg.uses_switchhead else DenseAttention
        self.attn = attn_cls(cfg, layer_idx)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = SigmaMoE(cfg, layer_idx) if cfg.uses_sigma_moe else DenseMLP(cfg, layer_idx)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self, x_BTD: torch.Tensor, mem_BMD: torch.Tensor | None, noise: NoiseContext | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        t = x_BTD.shape[1]
        if mem_BMD is None:
            kv_src_BLD = self.ln1(x_BTD)
            mem_len = 0
        else:
            kv_src_BLD = self.ln1(torch.cat([mem_BMD.to(x_BTD.dtype), x_BTD], dim=1))
            mem_len = mem_BMD.shape[1]
        q_src_BTD = kv_src_BLD[:, mem_len : mem_len + t]
        x_BTD = x_BTD + self.drop(self.attn(q_src_BTD, kv_src_BLD, mem_len, noise))
        y_BTD, aux = self.mlp(self.ln2(x_BTD), noise)
        return x_BTD + self.drop(y_BTD), aux


class LanguageModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size)
        self.drop = nn.Dropout(cfg.dropout)
        self.activation_checkpointing = False
        """Recompute each block in backward instead of keeping its activations (the trainer's
        `train.activation_checkpointing`; not part of the model config or its checkpoints)."""
        self.stats_reducer: StatsReducer | None = None
        self.reset_parameters()

    def set_stats_reducer(self, reducer: StatsReducer | None) -> None:
        """Sum the σ-MoE regularisers' statistics with `reducer`, all layers in one call."""
        self.stats_reducer = reducer
        for m in self.modules():
            if isinstance(m, SigmaMoE):
                m.defer_regulariser = reducer is not None

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # Pre-LN models use no sqrt(D) embedding scale; both ends use fan-in std 1/sqrt(D).
        normal_(self.embedding.weight, dense_std(1.0, self.cfg.d_model))
        if self.cfg.output_init == "torch_default":
            self.output.reset_parameters()  # U(±1/sqrt(d)) weight and bias, as the authors'
        else:
            normal_(self.output.weight, dense_std(1.0, self.cfg.d_model))
            self.output.bias.zero_()

    def forward(
        self,
        tokens_BT: torch.Tensor,
        memory: list[torch.Tensor] | None = None,
        *,
        noise: NoiseContext | None = None,
    ) -> LMOutput:
        mem_len = self.cfg.mem_len
        x_BTD = self.drop(self.embedding(tokens_BT))
        new_memory: list[torch.Tensor] | None = [] if mem_len > 0 else None
        aux = x_BTD.new_zeros((), dtype=torch.float32)
        deferred: list[RegulariserStats] = []
        for i, block in enumerate(self.blocks):
            mem_BMD = memory[i] if memory is not None else None
            if new_memory is not None:
                ctx = x_BTD if mem_BMD is None else torch.cat([mem_BMD.to(x_BTD.dtype), x_BTD], 1)
                new_memory.append(ctx[:, -mem_len:].detach())
            if self.activation_checkpointing and torch.is_grad_enabled():
                # Non-reentrant: the recomputation replays the block under the same RNG state
                # (nn.Dropout), and expert dropout is a hash of (noise seed, row, expert), so
                # the routing it recomputes is the routing of the forward.
                x_BTD, block_aux = checkpoint(block, x_BTD, mem_BMD, noise, use_reentrant=False)
            else:
                x_BTD, block_aux = block(x_BTD, mem_BMD, noise)
            if isinstance(block_aux, RegulariserStats):
                deferred.append(block_aux)
            elif block_aux is not None:
                aux = aux + block_aux
        for reg in reduce_regularisers(deferred, self.stats_reducer) if deferred else []:
            aux = aux + reg  # layer order, as the per-layer sums above
        logits_BTV = self.output(self.drop(self.ln_f(x_BTD)))
        return LMOutput(logits_BTV, new_memory, aux)


def build_model(cfg: ModelConfig) -> LanguageModel:
    """The single-device model for `cfg` (parallelism is applied from outside)."""
    return LanguageModel(cfg)
