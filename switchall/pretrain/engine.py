"""The optimiser step behind the training loop.

The loop only calls `backward`, `step` and the state-dict methods, so a data-parallel
engine (DeepSpeed ZeRO, in `switchall.parallel`) can replace `LocalEngine` without a second
training loop.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from switchall.checkpoint.entries import has_state, per_parameter_entries
from switchall.parallel.sharded_state import global_name
from switchall.pretrain.config import OptimConfig
from switchall.pretrain.schedule import lr_at


class Engine(Protocol):
    model: nn.Module

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self, step: int) -> float:
        """Apply the accumulated gradients as optimiser step `step`; returns the grad norm."""
        ...

    # Checkpoints (`switchall.checkpoint`): the weights and AdamW state by global name, as
    # views of this rank's live state, plus what is not a tensor.
    def has_optimizer_state(self) -> bool: ...

    def checkpoint_entries(self, *, optimizer: bool = True, for_load: bool = False) -> dict:
        """`switchall.checkpoint.entries` keys -> `GlobalTensor`; `for_load` creates missing
        optimizer state for a load to fill in."""
        ...

    def after_checkpoint_load(self, optimizer: bool = True) -> None: ...

    def json_state(self) -> dict[str, Any]: ...

    def load_json_state(self, state: dict[str, Any]) -> None: ...


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

    def has_optimizer_state(self) -> bool:
        return has_state(self.optimizer)

    def checkpoint_entries(self, *, optimizer: bool = True, for_load: bool = False) -> dict:
        named = [(global_name(n), p) for n, p in self.model.named_parameters()]
        return per_parameter_entries(named, self.optimizer if optimizer else None)

    def after_checkpoint_load(self, optimizer: bool = True) -> None:
        pass

    def json_state(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict()} if self.scaler else {}

    def load_json_state(self, state: dict[str, Any]) -> None:
        if self.scaler and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
