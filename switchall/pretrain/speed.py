"""The training-speed switches of `train.*` applied to the built model: torch.compile and
activation checkpointing.

Both act on the plain `LanguageModel` in place, after `parallelize` (tensor / expert parallel
change its modules, and torch.compile traces on the first call, so it sees the final ones):
- `train.compile`: `nn.Module.compile`, which keeps the module and so its `state_dict` names
  (checkpoints load into compiled and eager runs alike). The CVMM custom ops trace as single
  nodes, so a block compiles without graph breaks; the first steps pay the compilation.
- `train.activation_checkpointing`: each block runs under non-reentrant checkpointing and is
  recomputed in backward (see `LanguageModel.forward`).
"""

from __future__ import annotations

from switchall.models.lm import LanguageModel
from switchall.pretrain.config import TrainConfig


def apply_speed_options(model: LanguageModel, train: TrainConfig) -> None:
    model.activation_checkpointing = train.activation_checkpointing
    if train.compile:
        model.compile(backend=train.compile_backend)
