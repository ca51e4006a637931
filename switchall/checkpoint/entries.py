"""The checkpoint's tensor entries: global names, one `GlobalTensor` each, whatever the layout.

Keys (the layout-free contents of every checkpoint):
- `model/<name>`: the fp32 weight of parameter `<name>` of the single-device model;
- `optim/<name>/exp_avg`, `optim/<name>/exp_avg_sq`: AdamW's moments, shaped like the weight;
- `optim/<name>/step`: AdamW's step count of that parameter (a 0-d tensor);
- `memory/<layer>`: XL memory, [global batch lanes, memory tokens, d_model]: lane j is row j of
  every global batch, so data-parallel rank r holds lanes [r * b, (r + 1) * b), as the loader
  assigns them.

This module builds the entries for a torch AdamW that keeps per-parameter state (one process,
or DeepSpeed at ZeRO-0); `switchall.parallel.zero_state` builds them from ZeRO's flat partitions.
Every entry is a set of views of live memory: saving reads them, loading writes into them.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from switchall.checkpoint.boxes import Box, GlobalTensor
from switchall.checkpoint.errors import CheckpointError

MOMENTS = ("exp_avg", "exp_avg_sq")


def model_key(name: str) -> str:
    return f"model/{name}"


def optim_key(name: str, what: str) -> str:
    return f"optim/{name}/{what}"


def scalar(t: torch.Tensor) -> GlobalTensor:
    return GlobalTensor((), t.dtype, [Box((), t)])


def adamw_state(optimizer: torch.optim.Optimizer, p: torch.Tensor, like: torch.Tensor) -> dict:
    """AdamW's state of `p`, created as AdamW's first step would (for a load to fill in)."""
    state = optimizer.state[p]
    if not state:
        # torch.optim.AdamW's own initialisation (non-capturable, non-fused): step is a
        # float32 scalar on the CPU, the moments are zeros shaped like the parameter.
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        for key in MOMENTS:
            state[key] = torch.zeros_like(like, memory_format=torch.preserve_format)
    if optimizer.defaults.get("amsgrad"):
        raise CheckpointError("AdamW with amsgrad=True is not checkpointed")
    return state


def has_state(optimizer: torch.optim.Optimizer) -> bool:
    return any(optimizer.state.values())


def per_parameter_entries(
    named: Iterable[tuple[str, nn.Parameter]],
    optimizer: torch.optim.Optimizer | None,
) -> dict[str, GlobalTensor]:
    """Weights (the local shard of each parameter) and, with `optimizer`, its AdamW state.

    `optimizer` must hold its state per parameter (torch AdamW over the model's own parameters);
    missing state is created, so the same entries serve saving and loading.
    """
    out: dict[str, GlobalTensor] = {}
    for name, p in named:
        out[model_key(name)] = GlobalTensor.of_shard(p, p.data)
        if optimizer is None:
            continue
        state = adamw_state(optimizer, p, p.data)
        for key in MOMENTS:
            out[optim_key(name, key)] = GlobalTensor.of_shard(p, state[key])
        out[optim_key(name, "step")] = scalar(state["step"])
    return out


def memory_entries(
    memory: list[list[torch.Tensor] | None],
    lanes: int,
    first_lane: int,
) -> dict[str, GlobalTensor]:
    """XL memory of this rank's micro-batches as boxes of [lanes, M, D] per layer.

    Micro-batch i holds the rows of this rank's batch slice after the previous ones, starting at
    global lane `first_lane` (data-parallel rank * rows per rank).
    """
    if not memory or memory[0] is None:
        return {}
    out: dict[str, GlobalTensor] = {}
    for layer in range(len(memory[0])):
        first = memory[0][layer]
        g = GlobalTensor((lanes, *first.shape[1:]), first.dtype)
        lane = first_lane
        for micro in memory:
            if micro is None:
                raise CheckpointError("XL memory is set for some micro-batches and not others")
            g.add((lane, 0, 0), micro[layer])
            lane += micro[layer].shape[0]
        out[f"memory/{layer}"] = g
    return out
