"""A checkpoint of any layout as the single-device state dict (one process).

`consolidate(ckpt)` reads every `model/<name>` entry whole: what `switchall evaluate` loads
into a one-process model and what `switchall export` hands to the safetensors writer. The files
it reads are verified against `meta.json` first; optimiser state is neither read nor verified.
"""

from __future__ import annotations

from pathlib import Path

import torch

from switchall.checkpoint import dcp_io
from switchall.checkpoint.boxes import Box, GlobalTensor
from switchall.checkpoint.errors import CheckpointError
from switchall.pretrain.checkpoint import CheckpointManager

MODEL_PREFIX = "model/"


def files_of(ckpt: Path, prefix: str) -> set[str]:
    """The DCP data files holding chunks of the entries under `prefix`."""
    md = dcp_io.read_metadata(ckpt)
    return {
        info.relative_path for idx, info in md.storage_data.items() if idx.fqn.startswith(prefix)
    }


def verify_files(ckpt: Path, names: set[str]) -> None:
    meta = CheckpointManager.read_meta(ckpt)
    for name in sorted(names):
        if name not in meta["files"]:
            raise CheckpointError(f"{ckpt / name}: not listed in {ckpt / 'meta.json'}")
        if why := CheckpointManager.check_file(ckpt, name, meta["files"][name]):
            raise CheckpointError(why)


def consolidate(ckpt: str | Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """name -> full tensor of every model weight of checkpoint `ckpt` (CPU; `dtype` casts)."""
    weights = read_entries(ckpt, MODEL_PREFIX)
    if not weights:
        raise CheckpointError(f"{ckpt}: the checkpoint holds no model weights")
    return {k: t if dtype is None else t.to(dtype) for k, t in weights.items()}


def read_entries(ckpt: str | Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every entry under `prefix` (all: "") whole, keyed without the prefix (one process)."""
    ckpt = Path(ckpt)
    CheckpointManager.read_meta(ckpt)  # format (old per-rank checkpoints are refused) and listing
    verify_files(ckpt, {dcp_io.METADATA_FILE} | files_of(ckpt, prefix))
    saved = dcp_io.read_metadata(ckpt).state_dict_metadata
    entries = {}
    for key, md in saved.items():
        if key.startswith(prefix):
            full = torch.empty(md.size, dtype=md.properties.dtype)
            entries[key] = GlobalTensor(
                md.size, md.properties.dtype, [Box((0,) * len(md.size), full)]
            )
    if entries:
        dcp_io.load(entries, ckpt, no_dist=True)
    return {key.removeprefix(prefix): g.boxes[0].tensor for key, g in entries.items()}
