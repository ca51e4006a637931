"""`DistributedRuntime`: the trainer's view of a torchrun job (tensor / expert / data parallel).

Implements `switchall.pretrain.runtime.Runtime`, so the one training loop runs unchanged:
- `dp_rank` / `dp_size` count data replicas (the TP ranks of one replica share a dp_rank and
  read the same data slice); metrics and validation sums are all-reduced over the DP group.
- `parallelize` applies tensor parallel, expert parallel and the DeepSpeed engine
  (`parallelize_model`); `build_engine` hands out that engine.
- checkpoints: the engine gives each rank's pieces under global names
  (`switchall.checkpoint`), written and read collectively over the default group, so a
  checkpoint of any layout loads under this one; `layout_record` goes into its metadata.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from switchall.models.routing import derive_seed
from switchall.parallel.layout import check_layout, destroy_layout, init_layout
from switchall.parallel.parallelize import ParallelModel, parallelize_model
from switchall.pretrain.runtime import resolve_device


class DistributedRuntime:
    """One rank of a torchrun job: its device, layout and DeepSpeed engine, for the trainer."""

    def __init__(self, cfg):
        """Join the torchrun job, validate and build the layout (collective)."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        device = resolve_device(cfg.train.device)
        check_layout(cfg, world_size, device.type)
        self.cfg = cfg
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        self.device = device
        backend = "nccl" if device.type == "cuda" else "gloo"
        # A caller that set up torch.distributed itself (a test running several layouts in one
        # job) keeps it; otherwise this runtime owns the process group and tears it down.
        self._owns_process_group = not dist.is_initialized()
        if self._owns_process_group:
            dist.init_process_group(
                backend,
                device_id=device if device.type == "cuda" else None,
                timeout=timedelta(seconds=cfg.parallel.timeout_s),
            )
        import deepspeed

        deepspeed.init_distributed(  # wraps the group initialised above
            dist_backend=backend, timeout=timedelta(seconds=cfg.parallel.timeout_s)
        )
        self.layout = init_layout(cfg.parallel)
        self.rank, self.world_size = self.layout.rank, self.layout.world_size
        self.uses_process_group = True
        self.dp_rank, self.dp_size = self.layout.dp_rank, self.layout.dp_size
        self.layout_name = self.layout.name
        self._parallel: ParallelModel | None = None

    @property
    def is_logging_rank(self) -> bool:
        return self.rank == 0

    @property
    def parallel_model(self) -> nn.Module:
        """This rank's parallelised model (single-device parameter names, local shards)."""
        if self._parallel is None:
            raise RuntimeError("parallelize has not been called")
        return self._parallel.model

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the data replicas (TP ranks of a replica hold the same value)."""
        t = t.clone()
        dist.all_reduce(t, group=self.layout.dp_group)
        return t

    def barrier(self) -> None:
        dist.barrier()

    def parallelize(self, model: nn.Module) -> nn.Module:
        if self.dp_size > 1:
            # Every rank built the model from the same seed; from here on each data replica
            # draws its own dropout masks (its TP ranks stay in lockstep, as they must).
            torch.manual_seed(derive_seed(self.cfg.train.seed, self.dp_rank))
        self._parallel = parallelize_model(model, self.layout, self.cfg)
        return self._parallel.module

    def build_engine(self, model: nn.Module, cfg, total_steps: int, fp16: bool):
        if self._parallel is None or model is not self._parallel.module:
            raise RuntimeError("build_engine expects the module returned by parallelize")
        return self._parallel.engine

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out

    def layout_record(self) -> dict[str, Any]:
        lay = self.layout
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", lay.world_size))
        return {
            "name": lay.name,
            "world_size": lay.world_size,
            "nodes": max(1, lay.world_size // max(per_node, 1)),
            "tensor": lay.tp_size,
            "expert": lay.ep_size,
            "data": lay.dp_size,
            "zero_stage": lay.zero_stage,
        }

    def shutdown(self) -> None:
        if self._parallel is not None:
            self._parallel.engine.close()
            self._parallel = None
        destroy_layout()
        if self._owns_process_group:
            dist.destroy_process_group()
