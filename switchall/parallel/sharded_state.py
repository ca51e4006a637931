"""Global identity of a parallel run's parameters: the single-device name and the slice.

A parameter is identified by its single-device name (the parallel modules keep them, and
`global_name` undoes parametrizations) and the slices of the full tensor this rank holds
(`switchall_shards`: (dim, start, full size) per sharded dim; tensor parallelism cuts heads,
MLP columns or expert widths, expert parallelism cuts σ-MoE experts). Checkpoints
(`switchall.checkpoint`) store every tensor under these global names and slices, so every
expert and every shard is saved exactly once and loads under any layout.
"""

from __future__ import annotations

import torch

_PARAMETRIZED = ".parametrizations."


def mark_shard(p: torch.Tensor, dim: int, start: int, full: int) -> None:
    """Record that `p` holds [start, start + p.shape[dim]) of a dim of global size `full`."""
    p.switchall_shards = (*getattr(p, "switchall_shards", ()), (dim, start, full))


def global_name(name: str) -> str:
    """The single-device name: `attn.parametrizations.scale.original` -> `attn.scale`; the
    `_orig_mod.` of a `torch.compile`d module is dropped too."""
    name = name.replace("_orig_mod.", "")
    if _PARAMETRIZED in name and name.endswith(".original"):
        head, tail = name.split(_PARAMETRIZED, 1)
        return f"{head}.{tail[: -len('.original')]}"
    return name


def is_expert_param(p: torch.Tensor) -> bool:
    return getattr(p, "allreduce", True) is False
