"""Checkpoint entries of DeepSpeed ZeRO-1/2/3: each rank's own fragments, as global boxes.

ZeRO keeps each parameter group's fp32 master weights and Adam moments flattened and split
over the data-parallel (for experts: expert-data-parallel) ranks. A rank holds, per parameter,
a contiguous range of the flattened local shard (its TP/EP slice); `GlobalTensor.of_flat_range`
turns that range into rectangular boxes of the global tensor, views of the flat partition, so
saving and loading touch only the rank's own fragments: nothing is gathered.

- ZeRO-1/2 (`DeepSpeedZeroOptimizer`): each model parameter's `_hp_mapping` says which range of
  it this rank owns (`lp_fragment_address`) and where in the group's flat fp32 partition it
  lies (`hp_fragment_address`); the moments are laid out like the partition. Every rank also
  holds the whole (fp32) model parameter, whose value equals the master copy after each step;
  the weights are saved from it (replicas write it once) and, after a load, copied into the
  master fragments.
- ZeRO-3 (`DeepSpeedZeroOptimizer_Stage3`): the parameter itself is partitioned: rank r of the
  group holds flat elements [r * P, min((r + 1) * P, numel)) (P = the padded partition size);
  `grad_position` locates them in the sub-group's flat fp32 partition and moments. The weights
  are saved from the fp32 master; after a load they are copied into the parameter partitions
  (`ds_tensor`) and the persistent (never-partitioned small) parameters are re-gathered.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from switchall.checkpoint.boxes import GlobalTensor, shard_offsets
from switchall.checkpoint.entries import MOMENTS, adamw_state, model_key, optim_key, scalar
from switchall.checkpoint.errors import CheckpointError


def _flat_states(base: torch.optim.Optimizer, flats: list[torch.Tensor], create: bool):
    if create:
        for flat in flats:
            adamw_state(base, flat, flat)
    return [base.state[flat] for flat in flats]


def zero12_entries(
    zero, named: Iterable[tuple[str, nn.Parameter]], optimizer: bool, for_load: bool
) -> dict[str, GlobalTensor]:
    """Entries of a ZeRO-1/2 optimizer `zero` (a `DeepSpeedZeroOptimizer`)."""
    flats = zero.single_partition_of_fp32_groups
    states = _flat_states(zero.optimizer, flats, for_load and optimizer) if optimizer else []
    group_of = {id(p): i for i, group in enumerate(zero.bit16_groups) for p in group}
    out: dict[str, GlobalTensor] = {}
    for name, p in named:
        out[model_key(name)] = GlobalTensor.of_shard(p, p.data)
        if not optimizer:
            continue
        state = states[group_of[id(p)]]
        out[optim_key(name, "step")] = scalar(state["step"])
        mapping = getattr(p, "_hp_mapping", None)
        for key in MOMENTS:
            if mapping is None:  # no fragment of this parameter in this rank's partition
                _, size = shard_offsets(p)
                out[optim_key(name, key)] = GlobalTensor(size, state[key].dtype)
                continue
            lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
            frag = state[key].narrow(0, hp.start, hp.numel)
            out[optim_key(name, key)] = GlobalTensor.of_flat_range(p, lp.start, frag, p.shape)
    return out


def zero12_after_load(zero, params: Iterable[nn.Parameter]) -> None:
    """The master fragments take the loaded (fp32) weights."""
    with torch.no_grad():
        for p in params:
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is not None:
                lp = mapping.lp_fragment_address
                mapping.hp_fragment.copy_(p.data.reshape(-1).narrow(0, lp.start, lp.numel))


def _zero3_range(zero, p: nn.Parameter) -> tuple[int, int, int, int]:
    """(sub-group, offset in its flat partition, first flat element held, elements held)."""
    group, offset, _padded = zero.grad_position[zero.get_param_id(p)]
    part = p.partition_numel()
    # A parameter smaller than the group leaves the last ranks padding only (start >= numel).
    start = min(zero._get_param_partition_rank(p) * part, p.ds_numel)
    return group, offset, start, min(part, p.ds_numel - start)


def zero3_entries(
    zero, named: Iterable[tuple[str, nn.Parameter]], optimizer: bool, for_load: bool
) -> dict[str, GlobalTensor]:
    """Entries of a ZeRO-3 optimizer `zero` (a `DeepSpeedZeroOptimizer_Stage3`)."""
    if getattr(zero, "offload_optimizer", False) or getattr(zero, "swap_optimizer", False):
        raise CheckpointError("checkpoints of ZeRO-3 with optimizer offload are not supported")
    flats = zero.fp32_partitioned_groups_flat
    states = _flat_states(zero.optimizer, flats, for_load and optimizer) if optimizer else []
    out: dict[str, GlobalTensor] = {}
    for name, p in named:
        group, offset, start, held = _zero3_range(zero, p)
        shape = tuple(p.ds_shape)
        master = flats[group].narrow(0, offset, held)
        out[model_key(name)] = GlobalTensor.of_flat_range(p, start, master, shape)
        if not optimizer:
            continue
        state = states[group]
        out[optim_key(name, "step")] = scalar(state["step"])
        for key in MOMENTS:
            moment = state[key].narrow(0, offset, held)
            out[optim_key(name, key)] = GlobalTensor.of_flat_range(p, start, moment, shape)
    return out


def zero3_after_load(zero, params: Iterable[nn.Parameter]) -> None:
    """Parameter partitions take the loaded master weights; persistent ones are re-gathered
    (collective over the data-parallel group)."""
    flats = zero.fp32_partitioned_groups_flat
    with torch.no_grad():
        for p in params:
            group, offset, _start, held = _zero3_range(zero, p)
            p.ds_tensor.data.view(-1).narrow(0, 0, held).copy_(flats[group].narrow(0, offset, held))
    zero.checkpoint_event_epilogue()
