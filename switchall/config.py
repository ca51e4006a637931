"""The run configuration: one tree composed of each component's own config.

`load_run_config("configs/x.yaml", ["train.steps=10"])` merges the YAML and the overrides,
builds the typed tree, and validates it (fields, then cross-section rules) before any work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from switchall.configtools import (
    ConfigError,
    apply_override,
    check,
    from_dict,
    load_yaml,
    parse_override,
    to_dict,
    validate_tree,
)
from switchall.data_pipeline.config import DataConfig
from switchall.models.config import ModelConfig
from switchall.parallel.config import ParallelConfig
from switchall.pretrain.config import LoggingConfig, OptimConfig, TrainConfig


@dataclass(kw_only=True)
class RunConfig:
    model: ModelConfig
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def validate(self, prefix: str = "") -> None:
        t = self.train
        check(
            t.batch_size % t.grad_accum == 0,
            "train.grad_accum",
            f"must divide train.batch_size={t.batch_size}, got {t.grad_accum}",
        )


def build_run_config(tree: dict[str, Any], source: str | None = None) -> RunConfig:
    try:
        cfg = from_dict(RunConfig, tree)
        validate_tree(cfg)
    except ConfigError as e:
        if source and not e.source:
            raise ConfigError(e.key, e.message, source=source) from None
        raise
    return cfg


def load_run_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Load a YAML run config, apply `section.key=value` overrides, validate."""
    tree = load_yaml(path)
    try:
        for text in overrides:
            parts, value = parse_override(text)
            apply_override(tree, parts, value)
    except ConfigError as e:
        raise ConfigError(e.key, e.message, source=str(path)) from None
    return build_run_config(tree, source=str(path))


def export_run_config(model_dir: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """The run config that evaluates or analyses an export directory: the export's model
    (`config.json`), everything else from the defaults and `section.key=value` overrides; the
    dataset must be named (`data.path=DIR`)."""
    from switchall.models.pretrained_reader import CONFIG_NAME, read_config

    source = str(Path(model_dir) / CONFIG_NAME)
    if not any(o.startswith("data.path=") for o in overrides):
        raise ConfigError("data.path", "an export names no dataset: add data.path=DIR")
    tree = {"model": read_config(model_dir)["model"]}  # format and version checked
    try:
        for text in overrides:
            parts, value = parse_override(text)
            apply_override(tree, parts, value)
    except ConfigError as e:
        raise ConfigError(e.key, e.message, source=source) from None
    return build_run_config(tree, source=source)


def dump_run_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config; atomic, so a crash never leaves a torn config.yaml."""
    from switchall.fileio import write_atomic

    write_atomic(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False).encode())
