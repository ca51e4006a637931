"""What the trainer saves and restores: one layout-free checkpoint, readable under any layout.

Inside `step_XXXXXXXX/`:
- DCP data (`__<rank>_0.distcp`, `dcp_metadata.json`): the tensor entries of
  `switchall.checkpoint.entries` (weights, AdamW state per parameter, XL memory), each rank
  writing only the chunks it holds (replicated chunks once);
- `train_state.json` (rank 0): step, data position (the loader's global state), which entries
  exist, the engine's non-tensor state (fp16 loss scale);
- `rng_rank<r>.json`: each rank's torch / CUDA / Python RNG states;
- `meta.json`, last: layout, config, model, tokenizer, and the size and sha256 of every file.

RNG streams belong to ranks. Under the same number of ranks and tensor-parallel size every rank
restores its own; under any other layout they cannot continue (the data replicas are other
ones), so every rank reseeds from (train.seed, step, data-parallel rank), the same on the
tensor-parallel ranks of a replica. With dropout 0 nothing draws from them.
"""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from switchall.checkpoint import dcp_io
from switchall.checkpoint.entries import memory_entries
from switchall.checkpoint.errors import CheckpointError
from switchall.configtools import ConfigError
from switchall.fileio import write_atomic
from switchall.models.routing import derive_seed

if TYPE_CHECKING:
    from switchall.pretrain.trainer import Trainer

STATE_FILE = "train_state.json"


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.json"


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def rng_state(device: torch.device) -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    return {
        "torch": _b64(torch.get_rng_state()),
        "cuda": [_b64(s) for s in torch.cuda.get_rng_state_all()] if device.type == "cuda" else [],
        "python": [version, list(internal), gauss],
    }


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(_unb64(state["torch"]))
    if device.type == "cuda" and state["cuda"]:
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _dcp_args(runtime) -> dict[str, Any]:
    return {"no_dist": not getattr(runtime, "uses_process_group", False)}


def _lanes(trainer: Trainer) -> tuple[int, int]:
    """(global lanes, this rank's first lane) of the XL memory."""
    lanes = trainer.cfg.train.batch_size
    return lanes, trainer.runtime.dp_rank * (lanes // trainer.runtime.dp_size)


def save(trainer: Trainer) -> Path:
    """Write checkpoint `trainer.step` (collective)."""
    rt, engine = trainer.runtime, trainer.engine
    with_optimizer = engine.has_optimizer_state()
    entries = engine.checkpoint_entries(optimizer=with_optimizer)
    mem = memory_entries(trainer.memory, *_lanes(trainer))
    entries.update(mem)
    memory_spec = None
    if mem:
        first = mem["memory/0"]
        memory_spec = {
            "layers": len(mem),
            "size": list(first.global_size),
            "dtype": str(first.dtype).removeprefix("torch."),
        }
    state = {
        "step": trainer.step,
        "loader": trainer.loader.state_dict(),
        "optimizer": with_optimizer,
        "memory": memory_spec,
        "engine": engine.json_state(),
    }

    def write(tmp: Path) -> list[str]:
        dcp_io.save(entries, tmp, **_dcp_args(rt))
        names = sorted(p.name for p in tmp.glob(f"__{rt.rank}_*{dcp_io.DATA_SUFFIX}"))
        write_atomic(tmp / rng_file(rt.rank), json.dumps(rng_state(trainer.device)).encode())
        names.append(rng_file(rt.rank))
        if rt.rank == 0:
            write_atomic(tmp / STATE_FILE, json.dumps(state, indent=1).encode())
            names += [STATE_FILE, dcp_io.METADATA_FILE]
        return names

    return trainer.ckpt.save(trainer.step, write, trainer.setup.checkpoint_meta())


def _memory_destinations(trainer: Trainer, spec: dict[str, Any]) -> list[list[torch.Tensor]]:
    lanes, _m, _d = spec["size"]
    if lanes != trainer.cfg.train.batch_size:
        raise ConfigError(
            "train.batch_size",
            f"{trainer.cfg.train.batch_size}, but the checkpoint's XL memory has {lanes} lanes "
            "(the global batch it was trained with)",
        )
    rows = lanes // trainer.runtime.dp_size // trainer.accum
    dtype = dcp_io.dtype_named(spec["dtype"])
    return [
        [
            torch.zeros((rows, *spec["size"][1:]), dtype=dtype, device=trainer.device)
            for _ in range(spec["layers"])
        ]
        for _ in range(trainer.accum)
    ]


def restore(trainer: Trainer, path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Load checkpoint `path` into the trainer under its own layout (collective). Returns what
    the resume record reports: the RNG streams "restored" or "reseeded", bytes read."""
    rt, engine = trainer.runtime, trainer.engine
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / STATE_FILE}: unreadable training state: {e}") from None
    entries = engine.checkpoint_entries(optimizer=state["optimizer"], for_load=True)
    memory = None
    if state["memory"] is not None:
        memory = _memory_destinations(trainer, state["memory"])
        entries.update(memory_entries(memory, *_lanes(trainer)))
    saved = dcp_io.read_metadata(path).state_dict_metadata
    missing = sorted(set(entries) - set(saved))
    if missing:
        raise CheckpointError(
            f"{path}: the checkpoint lacks {len(missing)} entries this run needs, e.g. "
            f"{', '.join(missing[:3])}"
        )
    for key, g in entries.items():
        if tuple(saved[key].size) != tuple(g.global_size):
            raise CheckpointError(
                f"{path}: {key} is {tuple(saved[key].size)} in the checkpoint, this run has "
                f"{tuple(g.global_size)}"
            )
    bytes_read = dcp_io.load(entries, path, **_dcp_args(rt))
    engine.after_checkpoint_load(optimizer=state["optimizer"])
    engine.load_json_state(state["engine"])
    trainer.loader.load_state_dict(state["loader"])
    trainer.memory = memory if memory is not None else [None] * trainer.accum
    trainer.step = state["step"]
    saved_layout = meta.get("layout", {})
    here = rt.layout_record()
    if (saved_layout.get("world_size"), saved_layout.get("tensor")) == (
        here["world_size"],
        here["tensor"],
    ):
        try:
            rng = json.loads((path / rng_file(rt.rank)).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(
                f"{path / rng_file(rt.rank)}: unreadable RNG state: {e}"
            ) from None
        set_rng_state(rng, trainer.device)
        return {"rng": "restored", "bytes_read": bytes_read}
    seed = derive_seed(trainer.cfg.train.seed, trainer.step, rt.dp_rank)
    torch.manual_seed(seed)
    random.seed(seed)
    return {"rng": "reseeded", "bytes_read": bytes_read}
