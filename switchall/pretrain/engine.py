"""The optimiser step behind the training loop.

The loop only calls `backward`, `step` and the state-dict methods, so a data-parallel
engine (DeepSpeed ZeRO, in `switchall.parallel`) can replace `LocalEngine` without a second
training loop.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from switchall.pretrain.config import OptimConfig
from switchall.pretrain.schedule import lr_at


class Engine(Protocol):
    model: nn.Module

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self, step: int) -> float:
        """Apply the accumulated gradients as optimiser step `step`; returns the grad norm."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices and expert banks; never biases, LayerNorms, or scalars like XL's scale."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 and weight_decay > 0 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}] if decay else []
    return groups + [{"params": no_decay, "weight_decay": 0.0}]


def adamw_kernel(model: nn.Module) -> dict[str, bool]:
    """AdamW's fused kernel (one pass over each tensor) on CPU and CUDA, else foreach.

    On CPU the foreach path is a loop of per-tensor ops: the fused step is 4-5x faster (16 ->
    4 ms for the demo model, 262 -> 53 ms at 47M; BENCHMARKS.md)."""
    devices = {p.device.type for p in model.parameters()}
    return {"fused": True} if devices <= {"cpu", "cuda"} else {"foreach": True}


class LocalEngine:
    """One process: AdamW, global-norm clipping, warmup + cosine, optional fp16 loss scaling."""

    def __init__(self, model: nn.Module, cfg: OptimConfig, total_steps: int, fp16: bool = False):
        self.model, self.cfg, self.total_steps = model, cfg, total_steps
        self.optimizer = torch.optim.AdamW(
            param_groups(model, cfg.weight_decay),
            lr=cfg.lr,
            betas=cfg.betas,
            eps=cfg.eps,
            **adamw_kernel(model),
        )
        self.scaler = torch.amp.GradScaler("cuda") if fp16 else None

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, step: int) -> float:
        lr = lr_at(step, self.cfg, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True))
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def state_dict(self) -> dict[str, Any]:
        state = {"optimizer": self.optimizer.state_dict()}
        if self.scaler:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
