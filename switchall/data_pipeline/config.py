"""Configuration of the training data source."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from switchall.configtools import check, join


@dataclass(kw_only=True)
class DataConfig:
    path: str = "data/stdlib"
    """A prepared dataset: a directory or URL holding manifest.json (see `switchall prepare`)."""
    mode: Literal["auto", "shuffled", "contiguous"] = "auto"
    """auto: contiguous per-lane streams for XL memory models, shuffled windows otherwise."""
    num_workers: int = 0
    """DataLoader worker processes per rank."""
    skip_bad_shards: bool = False
    """Skip corrupt or unreachable shards with a warning instead of failing."""

    def validate(self, prefix: str = "") -> None:
        check(bool(self.path), join(prefix, "path"), "must name a prepared dataset")
        check(self.num_workers >= 0, join(prefix, "num_workers"), "must be >= 0")
