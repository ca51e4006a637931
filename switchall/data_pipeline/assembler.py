"""Building one rank's rows of any global batch from verified shards (see `order` for which
tokens), and the DataLoader dataset through which worker processes do it.

Naming: `_B` rows of this rank's batch, `_G` batches of a worker's group, `_R` stream ranges.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator

import numpy as np
import torch

from switchall.data_pipeline.manifest import DataError, Manifest
from switchall.data_pipeline.order import GlobalOrder
from switchall.data_pipeline.shards import load_shard

log = logging.getLogger("switchall.data")


class BatchAssembler:
    """Builds rows [lo, hi) of any global batch; owns this process's shard cache."""

    def __init__(
        self,
        manifest: Manifest,
        split: str,
        order: GlobalOrder,
        lo: int,
        hi: int,
        skip_bad_shards: bool,
        retries: int,
        retry_delay: float,
    ):
        self.manifest, self.shards, self.order = manifest, manifest.shards(split), order
        self.lo, self.hi = lo, hi
        self.skip_bad, self.retries, self.retry_delay = skip_bad_shards, retries, retry_delay
        self.cache: dict[tuple[int, int], np.ndarray] = {}  # (shard id, epoch or -1) -> tokens
        self.bad: set[int] = set()
        self.shard_loads = 0  # fetches so far: lets tests see that a resume reads no backlog
        self._epoch: tuple | None = None  # (epoch, shard order, offsets as lists, offsets array)

    def __getstate__(self) -> dict:
        # Sent to DataLoader workers: they start with an empty cache (spawn would pickle it).
        return {**self.__dict__, "cache": {}, "_epoch": None}

    def _stream(self, epoch: int) -> tuple[list[int], list[int], np.ndarray]:
        """The epoch's shard order and stream offsets (lists: cheap scalar indexing per row)."""
        if self._epoch is None or self._epoch[0] != epoch:
            order_S, offsets = self.order.stream_map(epoch)
            self._epoch = (epoch, order_S.tolist(), offsets.tolist(), offsets)
        return self._epoch[1], self._epoch[2], self._epoch[3]

    def _load(self, sid: int) -> np.ndarray | None:
        if sid in self.bad:
            return None
        info = self.shards[sid]
        self.shard_loads += 1
        try:
            return load_shard(
                self.manifest.url(info.name),
                info,
                self.manifest.dtype,
                retries=self.retries,
                retry_delay=self.retry_delay,
            )
        except DataError as e:
            if not self.skip_bad:
                raise
            self.bad.add(sid)
            log.warning("skipping bad shard %s: %s", info.name, e)
            return None

    def _tokens(self, epoch: int, pos: int) -> np.ndarray:
        """Tokens at stream position `pos` of `epoch`. A bad shard (with skip_bad_shards) is
        stood in for by the next readable shard of the epoch's order, cut or repeated to the bad
        one's length, so every other token keeps its place on every rank."""
        order_S = self._stream(epoch)[0]
        sid = order_S[pos]
        hit = self.cache.get((sid, -1)) if sid not in self.bad else self.cache.get((sid, epoch))
        if hit is not None:
            return hit
        tokens = self._load(sid)
        if tokens is not None:
            self.cache[(sid, -1)] = tokens
            return tokens
        for step in range(1, len(order_S)):
            alt = order_S[(pos + step) % len(order_S)]
            alt_tokens = self.cache.get((alt, -1))
            alt_tokens = alt_tokens if alt_tokens is not None else self._load(alt)
            if alt_tokens is not None:
                log.warning(
                    "shard %s replaced by %s in epoch %d",
                    self.shards[sid].name,
                    self.shards[alt].name,
                    epoch,
                )
                tokens = np.resize(alt_tokens, self.shards[sid].tokens)
                self.cache[(sid, epoch)] = tokens
                return tokens
        raise DataError(f"{self.manifest.manifest_url}: every shard of the split is unreadable")

    def _retain(self, epoch: int, lo_R: np.ndarray, hi_R: np.ndarray) -> None:
        """Drop cached shards that overlap none of the stream ranges [lo, hi)."""
        order_S, _, offsets = self._stream(epoch)
        first_R = np.searchsorted(offsets, lo_R, side="right") - 1
        last_R = np.searchsorted(offsets, hi_R - 1, side="right") - 1
        if np.all(last_R - first_R <= 1):
            positions = np.unique(np.concatenate([first_R, last_R])).tolist()
        else:
            spans = zip(first_R.tolist(), last_R.tolist(), strict=True)
            positions = sorted({p for f, last in spans for p in range(f, last + 1)})
        keep = {(order_S[p], e) for p in positions for e in (-1, epoch)}
        for key in [k for k in self.cache if k not in keep]:
            del self.cache[key]

    def batch(self, index: int, out_BT1: np.ndarray | None = None) -> np.ndarray:
        """Rows [lo, hi) of global batch `index`, as int64 [hi - lo, seq_len + 1]."""
        epoch, starts_B = self.order.row_starts(index, self.lo, self.hi)
        _, offsets, offsets_arr = self._stream(epoch)
        self._retain(epoch, *self.order.keep_ranges(index, starts_B))
        T1 = self.order.seq_len + 1
        if out_BT1 is None:
            out_BT1 = np.empty((len(starts_B), T1), dtype=np.int64)
        pos_B = np.searchsorted(offsets_arr, starts_B, side="right") - 1
        for i, (start, pos) in enumerate(zip(starts_B.tolist(), pos_B.tolist(), strict=True)):
            filled = 0
            while filled < T1:  # a row spans two shards at most once per shard boundary
                tokens = self._tokens(epoch, pos)
                a = start + filled - offsets[pos]
                n = min(T1 - filled, len(tokens) - a)
                out_BT1[i, filled : filled + n] = tokens[a : a + n]
                filled += n
                pos += 1
        return out_BT1


class WorkerBatches(torch.utils.data.IterableDataset):
    """Worker w of W builds groups w, w + W, ... of `group` consecutive batches each; the
    DataLoader hands groups back round-robin, i.e. in order. Whole groups, because passing a
    tensor between processes costs about a millisecond however small it is."""

    def __init__(self, assembler: BatchAssembler, start: int, stop: int | None, group: int):
        self.assembler, self.start, self.stop, self.group = assembler, start, stop, group

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = torch.utils.data.get_worker_info()
        w, n = (info.id, info.num_workers) if info is not None else (0, 1)
        rows, T1 = self.assembler.hi - self.assembler.lo, self.assembler.order.seq_len + 1
        for j in itertools.count(w, n):
            first = self.start + j * self.group
            last = first + self.group if self.stop is None else min(first + self.group, self.stop)
            if last <= first:
                return
            out_GBT1 = np.empty((last - first, rows, T1), dtype=np.int64)
            for g in range(last - first):
                self.assembler.batch(first + g, out_GBT1[g])
            yield torch.from_numpy(out_GBT1)
