"""Dense MLP of the baselines and SwitchHead models: Linear -> ReLU -> Dropout -> Linear."""

from __future__ import annotations

import torch
from torch import nn

from switchall.models.config import ModelConfig
from switchall.models.init import dense_std, trunc_normal_
from switchall.models.routing import NoiseContext


class DenseMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.cfg = cfg
        self.up = nn.Linear(cfg.d_model, cfg.mlp.d_ff)
        self.down = nn.Linear(cfg.mlp.d_ff, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # Dense layers in pre-LN blocks: std sqrt(2 / (n_layers * fan_in)) = scale / sqrt(fan_in).
        s = self.cfg.resolved_init_scale
        for lin in (self.up, self.down):
            trunc_normal_(lin.weight, dense_std(s, lin.in_features))
            lin.bias.zero_()

    def forward(
        self, x_BTD: torch.Tensor, noise: NoiseContext | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.down(self.drop(torch.relu(self.up(x_BTD)))), None
