"""Data pipeline: `switchall prepare` (corpus -> tokenizer -> token shards + manifest) and
`TokenLoader` (shards -> deterministic, resumable `[batch, seq_len + 1]` token batches).

Names are imported on first use, so `import switchall` (and the config tree, which imports
`data_pipeline.config`) does not pull in torch, numpy or webdataset.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from switchall.data_pipeline.loader import TokenLoader
    from switchall.data_pipeline.manifest import DataError, Manifest, ShardInfo, read_manifest
    from switchall.data_pipeline.tokenizer import load_tokenizer

_EXPORTS = {
    "TokenLoader": "switchall.data_pipeline.loader",
    "DataError": "switchall.data_pipeline.manifest",
    "Manifest": "switchall.data_pipeline.manifest",
    "ShardInfo": "switchall.data_pipeline.manifest",
    "read_manifest": "switchall.data_pipeline.manifest",
    "load_tokenizer": "switchall.data_pipeline.tokenizer",
}
__all__ = [
    "DataError",
    "Manifest",
    "ShardInfo",
    "TokenLoader",
    "load_tokenizer",
    "read_manifest",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
