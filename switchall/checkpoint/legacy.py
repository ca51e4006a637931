"""The per-rank checkpoint format of earlier versions: detected, refused, converted once.

Those directories hold `model_rank0.pt` + `train_state_rank0.pt` (one process) or
`model_tp*.pt`, `experts_tp*_ep*.pt`, `train_state_rank*.pt` (torchrun), with `files_rank*.json`
hashes and a `meta.json` without a `format`. `convert` rewrites a one-process one as a
layout-free checkpoint (weights, AdamW state, XL memory, data position, RNG, step), after
checking its hashes; the old directory is kept beside it as `step_*.old-format`. A torchrun one
cannot be converted: its ZeRO partitions are laid out by the DeepSpeed engine that wrote them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from switchall.checkpoint import dcp_io
from switchall.checkpoint.boxes import Box, GlobalTensor
from switchall.checkpoint.entries import MOMENTS, model_key, optim_key
from switchall.checkpoint.errors import CheckpointError
from switchall.checkpoint.training_state import STATE_FILE, _b64, rng_file
from switchall.configtools import ConfigError, from_dict, to_dict
from switchall.fileio import fsync_dir, write_atomic
from switchall.models.config import ModelConfig
from switchall.pretrain.checkpoint import CheckpointManager, is_legacy
from switchall.pretrain.runtime import single_process_layout


def _load_verified(ckpt: Path, name: str) -> Any:
    listing = ckpt / "files_rank0.json"
    try:
        expected = json.loads(listing.read_text())[name]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{listing}: no valid entry for {name}: {e}") from None
    path = ckpt / name
    if not path.is_file():
        raise CheckpointError(f"{path}: missing checkpoint file")
    if hashlib.sha256(path.read_bytes()).hexdigest() != expected:
        raise CheckpointError(f"{path}: checksum mismatch, the file is corrupt")
    return torch.load(path, map_location="cpu", weights_only=True)


def _whole(t: torch.Tensor) -> GlobalTensor:
    return GlobalTensor(t.shape, t.dtype, [Box((0,) * t.dim(), t)])


def _optimizer_entries(sd: dict, named: list[tuple[str, torch.Tensor]]) -> dict:
    """AdamW's state_dict (state keyed by position in its groups) by parameter name.

    The trainer's groups were [matrices (if weight decay), the rest] in model order."""
    groups = sd["param_groups"]
    if len(groups) == 2:
        order = [n for n, p in named if p.dim() >= 2] + [n for n, p in named if p.dim() < 2]
    else:
        order = [n for n, _ in named]
    ids = [i for g in groups for i in g["params"]]
    if len(ids) != len(order):
        raise CheckpointError(f"optimizer state has {len(ids)} parameters, the model {len(order)}")
    out = {}
    for i, name in zip(ids, order, strict=True):
        state = sd["state"].get(i)
        if not state:
            continue
        for key in MOMENTS:
            out[optim_key(name, key)] = _whole(state[key])
        out[optim_key(name, "step")] = _whole(torch.as_tensor(state["step"], dtype=torch.float32))
    return out


def convert(ckpt: str | Path, out_root: str | Path | None = None) -> Path:
    """Rewrite old one-process checkpoint `ckpt` in the current format; returns the new one
    (in `out_root`, else in place of the old one, which moves to `step_*.old-format`)."""
    ckpt = Path(ckpt)
    if not is_legacy(ckpt):
        raise CheckpointError(f"{ckpt} is not a checkpoint of the old per-rank format")
    if not (ckpt / "model_rank0.pt").is_file():
        raise CheckpointError(
            f"{ckpt} was written by a torchrun job (model_tp*.pt / experts_tp*_ep*.pt): its "
            "ZeRO optimizer partitions cannot be mapped back to parameters, so it cannot be "
            "converted; finish or resume that run with the switchall version and layout that "
            "wrote it, or start a new run from its weights with model.init_from"
        )
    old_meta = json.loads((ckpt / "meta.json").read_text())
    try:
        model_cfg = from_dict(ModelConfig, old_meta["model"], prefix="model")
    except (KeyError, ConfigError) as e:
        raise CheckpointError(f"{ckpt / 'meta.json'}: unreadable model config: {e}") from None
    weights = _load_verified(ckpt, "model_rank0.pt")
    state = _load_verified(ckpt, "train_state_rank0.pt")
    with torch.device("meta"):
        from switchall.models import build_model

        named = list(build_model(model_cfg).named_parameters())
    missing = {n for n, _ in named} - set(weights)
    if missing:
        raise CheckpointError(f"{ckpt / 'model_rank0.pt'}: lacks {sorted(missing)[:3]}")
    entries = {model_key(n): _whole(weights[n]) for n, _ in named}
    entries.update(_optimizer_entries(state["engine"]["optimizer"], named))
    memory = state.get("memory") or [None]
    memory_spec = None
    if memory[0] is not None:
        for layer in range(len(memory[0])):
            entries[f"memory/{layer}"] = _whole(torch.cat([m[layer] for m in memory]))
        first = entries["memory/0"]
        memory_spec = {
            "layers": len(memory[0]),
            "size": list(first.global_size),
            "dtype": str(first.dtype).removeprefix("torch."),
        }
    rng = state["rng"]
    version, internal, gauss = rng["python"]
    train_state = {
        "step": state["step"],
        "loader": state["loader"],
        "optimizer": any(k.startswith("optim/") for k in entries),
        "memory": memory_spec,
        "engine": {"scaler": state["engine"]["scaler"]} if "scaler" in state["engine"] else {},
    }
    rng_json = {
        "torch": _b64(rng["torch"]),
        "cuda": [_b64(s) for s in rng.get("cuda", [])],
        "python": [version, list(internal), gauss],
    }

    def write(tmp: Path) -> list[str]:
        dcp_io.save(entries, tmp, no_dist=True)
        write_atomic(tmp / STATE_FILE, json.dumps(train_state, indent=1).encode())
        write_atomic(tmp / rng_file(0), json.dumps(rng_json).encode())
        names = sorted(p.name for p in tmp.glob(f"__0_*{dcp_io.DATA_SUFFIX}"))
        return [*names, STATE_FILE, rng_file(0), dcp_io.METADATA_FILE]

    config_yaml = ckpt.parent.parent / "config.yaml"
    meta = {
        "layout": single_process_layout(),
        "model": to_dict(model_cfg),
        "tokenizer_sha256": old_meta.get("tokenizer_sha256"),
        "converted_from": str(ckpt),
    }
    if config_yaml.is_file():
        from switchall.config import load_run_config

        meta["config"] = to_dict(load_run_config(config_yaml))
    staging = Path(out_root) if out_root else ckpt.parent / f".convert-{ckpt.name}"
    new = CheckpointManager(staging, keep=1_000_000).save(state["step"], write, meta)
    if out_root:
        return new
    os.replace(ckpt, ckpt.with_name(f"{ckpt.name}.old-format"))
    os.replace(new, ckpt)
    fsync_dir(ckpt.parent)
    shutil.rmtree(staging, ignore_errors=True)
    return ckpt
