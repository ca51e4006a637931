"""Model checkpoint files of a parallel run, with global names: every expert and every
tensor-parallel shard saved exactly once; tensors that TP does not split (LayerNorms,
embeddings) are saved in each `model_tp*.pt`, which keeps loading a single-file read per rank.

A parameter is identified by its single-device name (the parallel modules keep them) and the
slices of the full tensor this rank holds (`switchall_shards`: (dim, start, full size) per
sharded dim; tensor parallelism cuts heads, MLP columns or expert widths, expert parallelism
cuts σ-MoE experts). Files:
- `model_tp{t}.pt`: every non-expert parameter of tensor-parallel shard t, written by the
  first data-parallel replica (dp_rank 0) of that shard;
- `experts_tp{t}_ep{e}.pt`: the σ-MoE experts [e * El, (e+1) * El) (width shard t), written by
  the first expert-data-parallel replica (edp_rank 0) holding them.
Each file records its global slices so that a later resharding step can reassemble full tensors.
Loading reads each file on its writer and broadcasts it to the replicas that share it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from switchall.parallel.layout import ParallelLayout

_PARAMETRIZED = ".parametrizations."


def mark_shard(p: torch.Tensor, dim: int, start: int, full: int) -> None:
    """Record that `p` holds [start, start + p.shape[dim]) of a dim of global size `full`."""
    p.switchall_shards = (*getattr(p, "switchall_shards", ()), (dim, start, full))


def global_name(name: str) -> str:
    """The single-device name: `attn.parametrizations.scale.original` -> `attn.scale`."""
    if _PARAMETRIZED in name and name.endswith(".original"):
        head, tail = name.split(_PARAMETRIZED, 1)
        return f"{head}.{tail[: -len('.original')]}"
    return name


def is_expert_param(p: torch.Tensor) -> bool:
    return getattr(p, "allreduce", True) is False


def model_file_names(layout: ParallelLayout) -> tuple[str, str]:
    return f"model_tp{layout.tp_rank}.pt", f"experts_tp{layout.tp_rank}_ep{layout.ep_rank}.pt"


def _file(layout: ParallelLayout, params: dict[str, nn.Parameter], kind: str) -> dict[str, Any]:
    """A plain, weights-only-loadable record: CPU tensor copies and their global slices."""
    return {
        "kind": kind,
        "layout": {
            "tp_size": layout.tp_size,
            "tp_rank": layout.tp_rank,
            "ep_size": layout.ep_size,
            "ep_rank": layout.ep_rank,
        },
        "params": {name: p.detach().cpu().clone() for name, p in params.items()},
        "shards": {
            name: [list(s) for s in getattr(p, "switchall_shards", ())]
            for name, p in params.items()
        },
    }


def _named(model: nn.Module) -> tuple[dict[str, nn.Parameter], dict[str, nn.Parameter]]:
    dense, experts = {}, {}
    for name, p in model.named_parameters():
        (experts if is_expert_param(p) else dense)[global_name(name)] = p
    return dense, experts


def sharded_model_files(
    model: nn.Module, layout: ParallelLayout, gathered: Callable[..., Any]
) -> dict[str, Any]:
    """This rank's share of the model files.

    `gathered(params, modifier_rank)` is a context in which `params` hold their full
    data-parallel values (ZeRO-3 gathers them, collectively; other stages need nothing).
    """
    dense, experts = _named(model)
    dense_name, expert_name = model_file_names(layout)
    files: dict[str, Any] = {}
    with gathered(list(dense.values()), None):
        if layout.dp_rank == 0:
            files[dense_name] = _file(layout, dense, "dense")
    if experts and layout.edp_rank == 0:
        files[expert_name] = _file(layout, experts, "experts")
    return files


def _check(data: dict[str, Any], params: dict[str, nn.Parameter], layout, name: str) -> None:
    want = {
        "tp_size": layout.tp_size,
        "tp_rank": layout.tp_rank,
        "ep_size": layout.ep_size,
        "ep_rank": layout.ep_rank,
    }
    if data["layout"] != want:
        raise ValueError(f"{name} was written for {data['layout']}, this rank is {want}")
    saved = data["params"]
    if set(saved) != set(params):
        missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        raise ValueError(f"{name}: missing {missing[:5]}, unexpected {extra[:5]}")
    for n, p in params.items():
        shards = [tuple(s) for s in data["shards"][n]]
        if tuple(saved[n].shape) != tuple(p.shape) or shards != list(
            getattr(p, "switchall_shards", ())
        ):
            raise ValueError(
                f"{name}: {n} is {tuple(saved[n].shape)} {shards}, expected "
                f"{tuple(p.shape)} {list(getattr(p, 'switchall_shards', ()))}"
            )


def _load_and_broadcast(
    params: dict[str, nn.Parameter],
    name: str,
    group,
    is_writer: bool,
    load: Callable[[str], Any],
    layout: ParallelLayout,
) -> None:
    """The writer reads `name`; all members of `group` receive its tensors into `params`."""
    error = None
    if is_writer:
        try:
            data = load(name)
            _check(data, params, layout, name)
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(data["params"][n])
        except Exception as e:  # reported to the whole group, so nobody hangs in broadcast
            error = f"{type(e).__name__}: {e}"
    src = dist.get_global_rank(group, 0)
    status = [error]
    dist.broadcast_object_list(status, src=src, group=group)
    if status[0] is not None:
        raise RuntimeError(f"loading {name} failed on rank {src}: {status[0]}")
    with torch.no_grad():
        for n in sorted(params):
            dist.broadcast(params[n].data, src=src, group=group)


def load_sharded_model_files(
    model: nn.Module,
    layout: ParallelLayout,
    load: Callable[[str], Any],
    gathered: Callable[..., Any],
) -> None:
    """Inverse of `sharded_model_files` under the same layout (collective)."""
    dense, experts = _named(model)
    dense_name, expert_name = model_file_names(layout)
    # Under ZeRO-3 the data-parallel rank 0's full values are re-partitioned on exit.
    with gathered(list(dense.values()), 0):
        _load_and_broadcast(dense, dense_name, layout.dp_group, layout.dp_rank == 0, load, layout)
    if experts:
        _load_and_broadcast(
            experts, expert_name, layout.edp_group, layout.edp_rank == 0, load, layout
        )
