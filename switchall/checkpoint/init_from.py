"""`model.init_from=DIR`: a new run starts from exported weights, under any layout.

Each rank takes exactly the boxes of every weight it holds (its TP/EP shard, at ZeRO-3 its
partition of it) from the export's full single-device tensors: safetensors maps the files and
a slice reads only its own bytes, so no rank loads the whole model. ZeRO's master copies are
then set from them; the optimiser, the data position and the XL memory start fresh (step 0).

The export is read with `switchall.models.pretrained.open_pretrained` (format, sizes, index;
rank 0 also checks every file's sha256 first). Its model config must equal the run's
(`model.init_from` and nothing else may differ).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from switchall.checkpoint.entries import model_key
from switchall.configtools import ConfigError, to_dict

if TYPE_CHECKING:
    from switchall.pretrain.trainer import Trainer


def _architecture(cfg) -> dict:
    d = to_dict(cfg)
    d.pop("init_from", None)
    return d


def _check_config(exported, run, path: Path) -> None:
    want, got = _architecture(run), _architecture(exported)
    if want != got:
        keys = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
        diffs = ", ".join(f"{k}: export {got.get(k)!r}, run {want.get(k)!r}" for k in keys[:4])
        raise ConfigError("model.init_from", f"{path} holds another model ({diffs})")


def load_init_from(trainer: Trainer) -> dict:
    """Fill the trainer's weights from `model.init_from` (collective under torchrun)."""
    from switchall.models.pretrained import open_pretrained  # the export reader

    path = Path(trainer.cfg.model.init_from)
    if not path.is_dir():
        raise ConfigError("model.init_from", f"{path}: no such export directory")
    rt, engine = trainer.runtime, trainer.engine
    if rt.rank == 0:
        open_pretrained(path, verify=True).close()  # every file's sha256, once
    rt.barrier()
    entries = engine.checkpoint_entries(optimizer=False)
    read = 0
    with open_pretrained(path) as reader, torch.no_grad():
        _check_config(reader.config, trainer.cfg.model, path)
        names = {key.removeprefix("model/") for key in entries}
        extra = sorted(set(reader.names()) - names)
        if extra:
            raise ConfigError(
                "model.init_from",
                f"{reader.where(extra[0])}: {extra[0]!r} is not a weight of this model",
            )
        for name in sorted(names):
            g = entries[model_key(name)]
            if reader.shape(name) != tuple(g.global_size):
                raise ConfigError(
                    "model.init_from",
                    f"{reader.where(name)}: {name!r} is {list(reader.shape(name))}, the model "
                    f"has {list(g.global_size)}",
                )
            for box in g.boxes:
                if box.tensor.dim() == 0:
                    value = reader.get_tensor(name)
                else:
                    index = tuple(
                        slice(o, o + s) for o, s in zip(box.offsets, box.tensor.shape, strict=True)
                    )
                    value = reader.get_slice(name)[index]
                box.tensor.copy_(value.reshape(box.tensor.shape))
                read += value.numel() * value.element_size()
    engine.after_checkpoint_load(optimizer=False)
    return {"event": "init_from", "path": str(path), "bytes_read": read}
