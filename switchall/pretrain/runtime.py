"""What the training loop needs to know about the process layout, behind one small seam.

`LocalRuntime` is one process on one device. `switchall.parallel` provides a runtime for
torchrun jobs (tensor / expert / data parallel, DeepSpeed ZeRO) with the same interface, so
there is exactly one training loop.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from switchall.pretrain.config import OptimConfig
from switchall.pretrain.engine import Engine, LocalEngine


class Runtime(Protocol):
    rank: int
    world_size: int
    dp_rank: int
    dp_size: int
    device: torch.device
    uses_process_group: bool
    """Whether checkpoints are written collectively over torch.distributed's default group."""

    @property
    def is_logging_rank(self) -> bool: ...

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the data-parallel ranks (for metrics and validation)."""
        ...

    def barrier(self) -> None: ...

    def parallelize(self, model: nn.Module) -> nn.Module:
        """Apply tensor / expert parallelism to the plain single-device model."""
        ...

    def build_engine(
        self, model: nn.Module, cfg: OptimConfig, total_steps: int, fp16: bool
    ) -> Engine: ...

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order (small, picklable values)."""
        ...

    def layout_record(self) -> dict[str, Any]:
        """The layout, as checkpoint metadata records it (world size, nodes, sizes, stage)."""
        ...

    def shutdown(self) -> None: ...


class LocalRuntime:
    rank = 0
    world_size = 1
    dp_rank = 0
    dp_size = 1
    uses_process_group = False

    def __init__(self, device: torch.device):
        self.device = device

    @property
    def is_logging_rank(self) -> bool:
        return True

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def barrier(self) -> None:
        pass

    def parallelize(self, model: nn.Module) -> nn.Module:
        return model

    def build_engine(
        self, model: nn.Module, cfg: OptimConfig, total_steps: int, fp16: bool
    ) -> Engine:
        return LocalEngine(model, cfg, total_steps, fp16=fp16)

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def layout_record(self) -> dict[str, Any]:
        return single_process_layout()

    def shutdown(self) -> None:
        pass


def resolve_device(spec: str) -> torch.device:
    """`train.device`: auto (CUDA when present), cpu, cuda, cuda:N; ConfigError if unusable."""
    from switchall.configtools import ConfigError

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ConfigError(
            "train.device", f"{spec!r} is not a device (auto, cpu, cuda, cuda:N)"
        ) from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(
                "train.device", f"{spec!r}, but this machine has no usable CUDA device"
            )
        if device.index is not None and device.index >= count:
            raise ConfigError("train.device", f"{spec!r}, but this machine has {count} GPU(s)")
    return device


def single_process_layout() -> dict[str, Any]:
    return {
        "name": "single",
        "world_size": 1,
        "nodes": 1,
        "tensor": 1,
        "expert": 1,
        "data": 1,
        "zero_stage": 0,
    }
