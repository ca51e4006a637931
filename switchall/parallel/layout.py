"""The process layout: tensor, expert and data parallel sizes, ranks and groups, in one object.

The groups are built once by megatron-core's `parallel_state.initialize_model_parallel` and read
into explicit fields; modules, collectives and the DeepSpeed engine receive this object (or a
group from it) and never look process groups up in module globals.

Rank order is megatron's "tp-cp-ep-dp-pp" with expert tensor parallelism equal to tensor
parallelism, so for world size W, tensor size T and expert size E:
- tensor-parallel (TP) groups are T consecutive ranks; they hold one model replica between them;
- data-parallel (DP) groups are the W/T ranks with the same TP rank: one per model shard, each
  member fed different data (`dp_rank` names the data replica, shared by the TP ranks of it);
- expert-parallel (EP) groups are E members of a DP group; they split the σ-MoE experts and
  exchange tokens by all-to-all;
- expert-data-parallel (EDP) groups are the W/(T*E) ranks holding the same experts (same TP
  rank, same EP rank); expert gradients are reduced over them and nowhere else.

Example, W=8, T=2, E=2: TP [0,1] [2,3] [4,5] [6,7]; DP [0,2,4,6] [1,3,5,7];
EP [0,2] [4,6] [1,3] [5,7]; EDP [0,4] [2,6] [1,5] [3,7].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch.distributed as dist

from switchall.configtools import ConfigError
from switchall.parallel.config import ParallelConfig

if TYPE_CHECKING:
    from switchall.config import RunConfig


@dataclass(frozen=True)
class ParallelLayout:
    """Sizes, this process's ranks and its process groups along every parallel axis."""

    world_size: int
    rank: int
    tp_size: int
    tp_rank: int
    tp_group: dist.ProcessGroup
    dp_size: int
    """Data replicas: W / T. Each consumes its own slice of every global batch."""
    dp_rank: int
    dp_group: dist.ProcessGroup
    ep_size: int
    ep_rank: int
    ep_group: dist.ProcessGroup
    edp_size: int
    """Ranks holding the same expert shard: W / (T * E)."""
    edp_rank: int
    edp_group: dist.ProcessGroup
    zero_stage: int

    @property
    def name(self) -> str:
        """Stored in checkpoint metadata: a checkpoint loads only under the same layout."""
        return f"tp{self.tp_size}-ep{self.ep_size}-dp{self.dp_size}-zero{self.zero_stage}"

    @property
    def expert_group_name(self) -> str:
        """DeepSpeed's name for the expert groups of this EP size (`param.group_name`)."""
        return f"ep_size_{self.ep_size}"

    def describe(self) -> str:
        return (
            f"rank {self.rank}/{self.world_size}: tp {self.tp_rank}/{self.tp_size}, "
            f"dp {self.dp_rank}/{self.dp_size}, ep {self.ep_rank}/{self.ep_size}, "
            f"edp {self.edp_rank}/{self.edp_size}, zero {self.zero_stage}"
        )


def init_layout(cfg: ParallelConfig) -> ParallelLayout:
    """Build the groups with megatron-core (collective: every rank calls it) and read them out.

    `torch.distributed` must be initialised and the layout validated (`check_layout`) first.
    """
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(
        tensor_model_parallel_size=cfg.tensor,
        expert_model_parallel_size=cfg.expert,
        # Experts keep the attention's tensor split (σ-MoE experts are cut along their width),
        # so EP groups are taken among ranks with the same TP rank: inside the DP groups.
        expert_tensor_parallel_size=cfg.tensor,
        create_gloo_process_groups=False,
        distributed_timeout_minutes=cfg.timeout_s / 60,  # a float works: it feeds timedelta
    )
    layout = ParallelLayout(
        world_size=dist.get_world_size(),
        rank=dist.get_rank(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_group=ps.get_tensor_model_parallel_group(),
        dp_size=ps.get_data_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(),
        dp_group=ps.get_data_parallel_group(),
        ep_size=ps.get_expert_model_parallel_world_size(),
        ep_rank=ps.get_expert_model_parallel_rank(),
        ep_group=ps.get_expert_model_parallel_group(),
        edp_size=ps.get_expert_data_parallel_world_size(),
        edp_rank=ps.get_expert_data_parallel_rank(),
        edp_group=ps.get_expert_data_parallel_group(),
        zero_stage=cfg.zero_stage,
    )
    expected = (cfg.tensor, cfg.expert, layout.world_size // cfg.tensor)
    if (layout.tp_size, layout.ep_size, layout.dp_size) != expected:
        raise RuntimeError(f"megatron built {layout.describe()}, expected (tp, ep, dp) {expected}")
    return layout


def destroy_layout() -> None:
    """Release megatron-core's groups (collective), e.g. before building another layout."""
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()


def check_layout(cfg: RunConfig, world_size: int, device_type: str | None = None) -> None:
    """Reject a layout that cannot run, naming the setting at fault (`ConfigError`).

    Runs before any process group or model is built. `device_type` ("cpu" or "cuda") defaults
    to the device `train.device` resolves to on this machine.
    """
    p, m, t = cfg.parallel, cfg.model, cfg.train
    if device_type is None:
        from switchall.pretrain.runtime import resolve_device

        device_type = resolve_device(t.device).type
    launch = "launch with torchrun --nproc_per_node N"
    if world_size == 1 and (p.tensor > 1 or p.expert > 1):
        key, size = ("parallel.tensor", p.tensor) if p.tensor > 1 else ("parallel.expert", p.expert)
        raise ConfigError(key, f"{size} needs several processes, but world size is 1 ({launch})")
    if world_size % p.tensor:
        raise ConfigError(
            "parallel.tensor", f"{p.tensor} does not divide the world size {world_size} ({launch})"
        )
    heads = m.attention.n_heads
    if p.tensor > heads:
        raise ConfigError(
            "parallel.tensor",
            f"{p.tensor} is larger than model.attention.n_heads={heads}: heads are the unit "
            "of the tensor-parallel split",
        )
    if heads % p.tensor:
        raise ConfigError(
            "parallel.tensor", f"{p.tensor} does not divide model.attention.n_heads={heads}"
        )
    if m.uses_sigma_moe and m.moe.expert_size % p.tensor:
        raise ConfigError(
            "parallel.tensor",
            f"{p.tensor} does not divide model.moe.expert_size={m.moe.expert_size} "
            "(σ-MoE experts are split along their width)",
        )
    if not m.uses_sigma_moe and m.mlp.d_ff % p.tensor:
        raise ConfigError(
            "parallel.tensor", f"{p.tensor} does not divide model.mlp.d_ff={m.mlp.d_ff}"
        )
    dp = world_size // p.tensor
    if p.expert > 1 and not m.uses_sigma_moe:
        raise ConfigError(
            "parallel.expert",
            f"{p.expert} > 1, but model variant {m.variant!r} has no σ-MoE experts to shard",
        )
    if dp % p.expert:
        raise ConfigError(
            "parallel.expert",
            f"{p.expert} does not divide the data-parallel size {dp} "
            f"(world size {world_size} / parallel.tensor {p.tensor})",
        )
    if m.uses_sigma_moe and m.moe.n_experts % p.expert:
        raise ConfigError(
            "parallel.expert",
            f"{p.expert} does not divide model.moe.n_experts={m.moe.n_experts}",
        )
    if p.zero_stage == 3 and m.uses_sigma_moe:
        raise ConfigError(
            "parallel.zero_stage",
            f"ZeRO-3 cannot shard the σ-MoE of variant {m.variant!r}: DeepSpeed does not "
            "support MoE with ZeRO stage 3; use parallel.zero_stage 0, 1 or 2",
        )
    if t.batch_size % dp:
        raise ConfigError(
            "train.batch_size",
            f"{t.batch_size} does not split evenly over {dp} data-parallel replicas",
        )
    if (t.batch_size // dp) % t.grad_accum:
        raise ConfigError(
            "train.grad_accum",
            f"{t.grad_accum} does not divide the per-replica batch {t.batch_size // dp}",
        )
    if t.precision == "fp16":
        raise ConfigError(
            "train.precision",
            "fp16 loss scaling is not wired into the DeepSpeed engine yet; use bf16 or fp32",
        )
    if p.tensor > 1 and t.precision == "bf16" and device_type != "cuda":
        # megatron-core's tensor-parallel autograd functions re-enter autocast as CUDA-only
        # custom_fwd/custom_bwd, which fails under CPU autocast in the backward pass.
        raise ConfigError(
            "train.precision",
            f"bf16 with parallel.tensor={p.tensor} needs CUDA devices (megatron-core's "
            f"tensor-parallel layers support autocast on CUDA only); use fp32 on {device_type}",
        )
