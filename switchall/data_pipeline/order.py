"""The global token order: a pure function of the split's shard sizes, the seed, the mode, the
global batch size and the sequence length (plus the shuffle block size, a fixed default).

Every epoch e first permutes the shards (key: seed, e) and concatenates them into one stream of
N tokens. Row windows are T+1 tokens long (T = seq_len), so inputs and shifted targets come
from one row.

- shuffled: window w is stream[w*T : w*T + T + 1], w < (N-1) // T. Windows are grouped in
  blocks of `block_tokens // T` consecutive windows and permuted inside each block (key: seed,
  e, block), so a loader needs only about one block of shards in memory at a time, yet rows of
  a batch come from all over a ~32M-token stretch. Global batch g of the epoch is the windows at
  epoch positions [g*B, (g+1)*B) (B = global batch size).
- contiguous: the stream is cut into B lanes of L = N // B tokens; batch g gives lane l the
  window stream[l*L + g*T : l*L + g*T + T + 1], so consecutive batches continue every lane
  (overlapping by the one target token), as Transformer-XL memory needs.

Batch index k (counted from the start of training) is batch k % batches_per_epoch of epoch
k // batches_per_epoch; data-parallel rank r takes rows [r*b, (r+1)*b) of every global batch
(b = B / dp_size). Nothing here depends on the rank, the worker or what was read before, so a
loader can start at any batch index without reading the batches before it.

Naming: `_B` a row of the global batch, `_S` a shard, `_W` a window in a block.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

DEFAULT_BLOCK_TOKENS = 1 << 25
_M64 = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on uint64 arrays: a fixed bijection, identical on every platform and
    numpy version (unlike numpy's generators, whose streams are not guaranteed stable)."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def keyed_permutation(n: int, *key: int) -> np.ndarray:
    """A permutation of range(n) that depends only on the integers `key`.

    Each index is mapped through a bijection of 64-bit integers keyed by `key`, and the indices
    are sorted by their images; the images are distinct, so there are no ties to break.
    """
    h = np.zeros(1, dtype=np.uint64)
    for k in key:
        h = _splitmix64(h ^ np.uint64(k & _M64))
    images = _splitmix64(np.arange(n, dtype=np.uint64) ^ h[0])
    return np.argsort(images, kind="stable")


@dataclass(frozen=True)
class GlobalOrder:
    """Where every row of every global batch comes from (see the module docstring)."""

    counts_S: tuple[int, ...]
    seed: int
    mode: str
    global_batch_size: int
    seq_len: int
    block_tokens: int = DEFAULT_BLOCK_TOKENS
    total_tokens: int = field(init=False)
    batches_per_epoch: int = field(init=False)

    def __post_init__(self) -> None:
        if self.mode not in ("shuffled", "contiguous"):
            raise ValueError(f"mode must be 'shuffled' or 'contiguous', got {self.mode!r}")
        total = sum(self.counts_S)
        T, B = self.seq_len, self.global_batch_size
        if self.mode == "shuffled":
            bpe = ((total - 1) // T) // B if total > 1 else 0
        else:
            bpe = (total // B - 1) // T if total // B > 1 else 0
        object.__setattr__(self, "total_tokens", total)
        object.__setattr__(self, "batches_per_epoch", bpe)

    @property
    def num_windows(self) -> int:
        return (self.total_tokens - 1) // self.seq_len

    @property
    def block_windows(self) -> int:
        return max(1, self.block_tokens // self.seq_len)

    @property
    def lane_tokens(self) -> int:
        return self.total_tokens // self.global_batch_size

    def epoch_of(self, batch_index: int) -> tuple[int, int]:
        return divmod(batch_index, self.batches_per_epoch)

    def stream_map(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard id at each stream position, start offset of each position + the total)."""
        return _stream_map(self.counts_S, self.seed, epoch)

    def _block_perm(self, epoch: int, block: int) -> np.ndarray:
        size = min(self.block_windows, self.num_windows - block * self.block_windows)
        return _cached_perm(size, self.seed, epoch, block)

    def row_starts(self, batch_index: int, lo: int, hi: int) -> tuple[int, np.ndarray]:
        """(epoch, stream offsets of rows [lo, hi) of global batch `batch_index`)."""
        epoch, g = self.epoch_of(batch_index)
        T = self.seq_len
        if self.mode == "contiguous":
            lanes_B = np.arange(lo, hi, dtype=np.int64)
            return epoch, lanes_B * self.lane_tokens + g * T
        pos_B = np.arange(g * self.global_batch_size + lo, g * self.global_batch_size + hi)
        m = self.block_windows
        windows_B = np.empty(hi - lo, dtype=np.int64)
        for block in np.unique(pos_B // m).tolist():
            sel_B = pos_B // m == block
            windows_B[sel_B] = block * m + self._block_perm(epoch, block)[pos_B[sel_B] - block * m]
        return epoch, windows_B * T

    def keep_ranges(self, batch_index: int, starts_B: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stream ranges [lo, hi) whose shards a reader should keep cached after this batch:
        the batch's own windows (contiguous: lanes only move forward), or its whole blocks
        (shuffled: the next batches draw from the same block)."""
        if self.mode == "contiguous":
            return starts_B, starts_B + self.seq_len + 1
        m, T = self.block_windows, self.seq_len
        blocks = np.unique(starts_B // T // m)
        return blocks * m * T, np.minimum((blocks + 1) * m, self.num_windows) * T + 1


@lru_cache(maxsize=8)
def _stream_map(counts_S: tuple[int, ...], seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    order_S = keyed_permutation(len(counts_S), seed, epoch, 0x5348)  # "SH": the shard order
    starts = np.zeros(len(counts_S) + 1, dtype=np.int64)
    np.cumsum(np.asarray(counts_S, dtype=np.int64)[order_S], out=starts[1:])
    return order_S, starts


@lru_cache(maxsize=8)
def _cached_perm(size: int, seed: int, epoch: int, block: int) -> np.ndarray:
    return keyed_permutation(size, seed, epoch, 0x424C, block)  # "BL": windows in a block
