"""Cutting each split's token stream into shards, and the state that makes `prepare` resumable.

`prepare_state.json` (replaced atomically) holds the input/option fingerprint, the tokenizer
hash, the index of the next unit to tokenize and, per split, the shards completed and the name
of a `pending-<split>-<unit>.npy` file with the tokens not yet in a shard. It is saved after
every unit that completed a shard, so a crash loses at most the units since the last shard.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict
from pathlib import Path

import numpy as np

from switchall.data_pipeline.manifest import ShardInfo, canonical_json
from switchall.data_pipeline.shards import npy_bytes, write_shard
from switchall.fileio import write_atomic

STATE_NAME = "prepare_state.json"


class SplitWriter:
    """Cuts one split's token stream into shards of exactly `shard_tokens` tokens."""

    def __init__(self, out: Path, split: str, shard_tokens: int, eod: int, state: dict):
        self.out, self.split, self.size, self.eod = out, split, shard_tokens, eod
        self.shards = [ShardInfo(**s) for s in state.get("shards", [])]
        self.buffer: deque[np.ndarray] = deque()
        self.buffered = 0
        if state.get("pending"):
            self.add(np.load(out / state["pending"], allow_pickle=False))

    def add(self, tokens: np.ndarray) -> bool:
        """Buffer tokens; True if a shard was completed."""
        if len(tokens):
            self.buffer.append(tokens)
            self.buffered += len(tokens)
        wrote = False
        while self.buffered >= self.size:
            self._cut(self.size)
            wrote = True
        return wrote

    def finish(self) -> None:
        if self.buffered:
            self._cut(self.buffered)

    def _cut(self, n: int) -> None:
        parts, need = [], n
        while need:
            tokens = self.buffer.popleft()
            if len(tokens) > need:
                self.buffer.appendleft(tokens[need:])
                tokens = tokens[:need]
            parts.append(tokens)
            need -= len(tokens)
        self.buffered -= n
        shard = np.concatenate(parts)
        info = write_shard(self.out, self.split, len(self.shards), shard)
        documents = int(np.count_nonzero(shard == self.eod))
        self.shards.append(ShardInfo(**{**asdict(info), "documents": documents}))

    def save(self, next_unit: int) -> dict:
        """Persist the tokens not yet in a shard; returns this split's part of the state."""
        pending = None
        if self.buffered:
            pending = f"pending-{self.split}-{next_unit:08d}.npy"
            write_atomic(self.out / pending, npy_bytes(np.concatenate(list(self.buffer))))
        return {"shards": [asdict(s) for s in self.shards], "pending": pending}


def save_state(out: Path, state: dict, writers: dict, next_unit: int) -> None:
    """Pending tokens go to files named by `next_unit` first, then the state that names them
    replaces the old one atomically, then older pending files go: a crash at any point leaves a
    state whose files all exist."""
    state["splits"] = {s: w.save(next_unit) for s, w in writers.items()}
    state["next_unit"] = next_unit
    write_atomic(out / STATE_NAME, canonical_json(state))
    keep = {v["pending"] for v in state["splits"].values()}
    for old in out.glob("pending-*.npy"):
        if old.name not in keep:
            old.unlink()
