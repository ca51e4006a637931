"""DeepSpeed ZeRO (stages 0-3) behind the trainer's `Engine` interface.

The optimiser is the project's own recipe (spec §8): torch AdamW with the decay / no-decay
groups of `LocalEngine`, global-norm clipping, and the warmup + cosine schedule written into
the parameter groups before every step. DeepSpeed owns gradient reduction, partitioning (ZeRO)
and the clipped optimiser step.

How the layout reaches DeepSpeed:
- `LayoutMPU` answers DeepSpeed's `mpu` queries (model parallel = tensor parallel; the
  data-parallel group reduces and partitions every non-expert gradient).
- σ-MoE expert parameters (EP > 1) carry `allreduce = False` and `group_name`; DeepSpeed puts
  them in their own optimiser groups and reduces and partitions them over the expert-data-parallel
  group registered under that name. DeepSpeed only turns its MoE path on when it finds one of
  its own `MoE` modules, so each σ-MoE layer gets a parameter-free `DeepSpeedMoEMarker`; its
  `set_deepspeed_parallelism` hook (DeepSpeed calls it while building the engine) registers the
  layout's EP and EDP groups instead of letting DeepSpeed build look-alikes.
- Gradient accumulation is the trainer's (`managed_gradient_accumulation: false`): backward
  accumulates, `step` reduces (stages 0-1) or finalises (stages 2-3) and updates.
- Clipping: stages 1-3 clip inside the ZeRO optimiser, whose norm sums squares over the DP and
  TP groups (TP-replicated parameters once, via megatron's `tensor_model_parallel` marks). At
  stage 0 DeepSpeed's fp32 clip averages per-rank norms, which is wrong when ranks hold
  different experts, so `layout_grad_norm` clips in an optimiser step pre-hook instead.
"""

from __future__ import annotations

import logging
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from deepspeed.runtime.utils import register_output_backward_hooks
from deepspeed.utils import groups as ds_groups
from torch import nn

from switchall.checkpoint.entries import has_state, per_parameter_entries
from switchall.pretrain.config import OptimConfig
from switchall.pretrain.engine import adamw_kernel, param_groups
from switchall.pretrain.schedule import lr_at

from .expert_parallel import ParallelSigmaMoE
from .layout import ParallelLayout
from .sharded_state import global_name
from .zero_state import zero3_after_load, zero3_entries, zero12_after_load, zero12_entries


class LayoutMPU:
    """DeepSpeed's `mpu` interface over a `ParallelLayout` (no pipeline parallelism)."""

    def __init__(self, layout: ParallelLayout):
        self.layout = layout

    def get_model_parallel_group(self):
        return self.layout.tp_group

    def get_model_parallel_rank(self) -> int:
        return self.layout.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.layout.tp_size

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_data_parallel_group(self):
        return self.layout.dp_group

    def get_data_parallel_rank(self) -> int:
        return self.layout.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.layout.dp_size

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.layout.dp_group)

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1


def register_expert_groups(layout: ParallelLayout) -> None:
    """Make the layout's EP / EDP groups the ones DeepSpeed uses for `layout.expert_group_name`."""
    name = layout.expert_group_name
    ds_groups._EXPERT_PARALLEL_GROUP[name] = layout.ep_group
    ds_groups._EXPERT_PARALLEL_GROUP_RANKS[name] = dist.get_process_group_ranks(layout.ep_group)
    ds_groups._EXPERT_DATA_PARALLEL_GROUP[name] = layout.edp_group
    ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = dist.get_process_group_ranks(
        layout.edp_group
    )


def unregister_expert_groups(layout: ParallelLayout) -> None:
    name = layout.expert_group_name
    for table in (
        ds_groups._EXPERT_PARALLEL_GROUP,
        ds_groups._EXPERT_PARALLEL_GROUP_RANKS,
        ds_groups._EXPERT_DATA_PARALLEL_GROUP,
        ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS,
    ):
        table.pop(name, None)
    ds_groups.mpu = None


class DeepSpeedMoEMarker(MoE):
    """Parameter-free stand-in through which DeepSpeed recognises a σ-MoE layer.

    DeepSpeed enables its expert-parameter handling only when `isinstance(module, MoE)` for
    some module. `MoE.__init__` would build DeepSpeed's own gate and experts, so only
    `nn.Module.__init__` runs; the σ-MoE layer does the compute.
    """

    def __init__(self, layout: ParallelLayout, num_experts: int):
        nn.Module.__init__(self)  # deliberately not MoE.__init__ (see the class docstring)
        self.layout, self.num_experts = layout, num_experts
        self.ep_size, self.expert_group_name = layout.ep_size, layout.expert_group_name

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        register_expert_groups(self.layout)

    def forward(self, *args, **kwargs):
        raise RuntimeError("DeepSpeedMoEMarker only marks a σ-MoE layer; it has no forward")


def layout_grad_norm(params: list[nn.Parameter], layout: ParallelLayout) -> torch.Tensor:
    """The global L2 norm of gradients already reduced over DP (non-expert) and EDP (expert).

    Squares are counted once per distinct value: TP-replicated parameters on TP rank 0 only,
    expert shards summed over the EP group, everything summed over the TP group.
    """
    device = params[0].device
    dense, expert = torch.zeros((), device=device), torch.zeros((), device=device)
    for p in params:
        if p.grad is None:
            continue
        if not (getattr(p, "tensor_model_parallel", False) or layout.tp_rank == 0):
            continue
        sq = p.grad.detach().float().square().sum()
        if getattr(p, "allreduce", True) is False:
            expert += sq
        else:
            dense += sq
    if layout.ep_size > 1:
        dist.all_reduce(expert, group=layout.ep_group)
    total = dense + expert
    if layout.tp_size > 1:
        dist.all_reduce(total, group=layout.tp_group)
    return total.sqrt()


class DeepSpeedModule(nn.Module):
    """What the trainer calls: the engine's forward, plus DeepSpeed's backward-prologue hooks.

    DeepSpeed hooks the tensors of a forward's output to prepare ZeRO's gradient hooks at the
    start of backward, but looks for them only in tensors, tuples, lists and dicts; the
    model's `LMOutput` is a dataclass, so its differentiable tensors are hooked here.
    """

    def __init__(self, engine):
        super().__init__()
        self.engine = engine

    def forward(self, *args, **kwargs):
        out = self.engine(*args, **kwargs)
        register_output_backward_hooks(
            [out.logits_BTV, out.aux_loss],
            preprocess_once_fn=self.engine._backward_prologue,
            preprocess_per_tensor_fn=self.engine._backward_prologue_per_tensor,
        )
        return out


def deepspeed_config(layout: ParallelLayout, optim: OptimConfig, cfg) -> dict:
    """The DeepSpeed JSON config for run config `cfg` under `layout`."""
    batch, accum = cfg.train.batch_size, cfg.train.grad_accum
    stage = layout.zero_stage
    on_gpu = torch.cuda.is_available()
    return {
        "train_batch_size": batch,
        "train_micro_batch_size_per_gpu": batch // layout.dp_size // accum,
        "gradient_accumulation_steps": accum,
        "managed_gradient_accumulation": False,
        "gradient_clipping": optim.grad_clip if stage > 0 else 0.0,
        "zero_optimization": {
            "stage": stage,
            # Overlapping reduction with backward needs side streams: GPU only, stages 2-3.
            "overlap_comm": on_gpu and stage >= 2,
            "contiguous_gradients": True,
            "reduce_scatter": True,
        },
        "steps_per_print": 2**31 - 1,
    }


def _optimizer(model: nn.Module, optim: OptimConfig, has_experts: bool) -> torch.optim.AdamW:
    groups = param_groups(model, optim.weight_decay)
    for i, group in enumerate(groups):
        group["name"] = f"group{i}"
    if has_experts:
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    kernel = adamw_kernel(model)
    return torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps, **kernel)


class DeepSpeedEngine:
    """The `Engine` of distributed runs: a DeepSpeed engine with ZeRO stage 0-3."""

    def __init__(self, model: nn.Module, layout: ParallelLayout, cfg):
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        self.layout, self.optim, self.total_steps = layout, cfg.optim, cfg.train.steps
        moe_layers = [m for m in model.modules() if isinstance(m, ParallelSigmaMoE)]
        has_experts = layout.ep_size > 1 and bool(moe_layers)
        if has_experts:
            for m in moe_layers:
                m.ds_moe = DeepSpeedMoEMarker(layout, m.num_experts)
        self.optimizer = _optimizer(model, cfg.optim, has_experts)
        self._norm = torch.zeros(())
        if layout.zero_stage == 0:
            self.optimizer.register_step_pre_hook(self._clip_before_step)
        self.ds, *_ = deepspeed.initialize(
            model=model,
            optimizer=self.optimizer,
            config=deepspeed_config(layout, cfg.optim, cfg),
            mpu=LayoutMPU(layout),
        )
        self.model = model
        self.wrapped = DeepSpeedModule(self.ds)

    def _clip_before_step(self, optimizer, args, kwargs) -> None:
        # Stage 0: runs inside DeepSpeed's step, after its gradient all-reduce.
        params = [p for g in optimizer.param_groups for p in g["params"]]
        self._norm = layout_grad_norm(params, self.layout)
        if self.optim.grad_clip > 0:
            coef = torch.clamp(self.optim.grad_clip / (self._norm + 1e-6), max=1.0)
            torch._foreach_mul_([p.grad for p in params if p.grad is not None], coef)

    def backward(self, loss: torch.Tensor) -> None:
        # The trainer already divides by the number of micro-batches.
        self.ds.backward(loss, scale_wrt_gas=False)

    def step(self, step: int) -> float:
        lr = lr_at(step, self.optim, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.ds.step()
        if self.layout.zero_stage == 0:
            return float(self._norm)
        return float(self.ds.get_global_grad_norm())

    # ----------------------------------------------------------------- checkpoints
    def _named(self) -> list[tuple[str, nn.Parameter]]:
        return [(global_name(n), p) for n, p in self.model.named_parameters()]

    def has_optimizer_state(self) -> bool:
        if self.layout.zero_stage == 0:
            return has_state(self.optimizer)
        return has_state(self.ds.optimizer.optimizer)

    def checkpoint_entries(self, *, optimizer: bool = True, for_load: bool = False) -> dict:
        """This rank's share of the weights and AdamW state, by global name (see
        `switchall.checkpoint.entries`): views of the live state, for saving or loading."""
        stage, named = self.layout.zero_stage, self._named()
        if stage == 0:
            return per_parameter_entries(named, self.optimizer if optimizer else None)
        if stage in (1, 2):
            return zero12_entries(self.ds.optimizer, named, optimizer, for_load)
        return zero3_entries(self.ds.optimizer, named, optimizer, for_load)

    def after_checkpoint_load(self, optimizer: bool = True) -> None:
        """Bring ZeRO's copies in line with the weights a load wrote (collective at stage 3)."""
        params = [p for _, p in self._named()]
        if self.layout.zero_stage in (1, 2):
            zero12_after_load(self.ds.optimizer, params)
        elif self.layout.zero_stage == 3:
            zero3_after_load(self.ds.optimizer, params)

    def json_state(self) -> dict[str, Any]:
        return {}  # fp32 parameters: no loss scale (fp16 is refused by check_layout)

    def load_json_state(self, state: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        """Drop this engine's DeepSpeed group registrations (before another layout)."""
        unregister_expert_groups(self.layout)
