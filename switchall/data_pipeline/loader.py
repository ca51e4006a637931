"""`TokenLoader`: this rank's slice of every global batch, in the global order of `order`.

The loader's state is one global counter (batches consumed) plus what it was computed from
(seed, mode, sizes, manifest fingerprint), so a checkpoint taken at any data-parallel size
resumes at any other, and resuming jumps straight to the shards of the next batch.

Worker processes (num_workers > 0) build whole batches, in groups of consecutive batches:
worker w of W builds groups w, w + W, ..., and torch's DataLoader hands them back round-robin,
so the stream is the same batch for batch as with num_workers=0. Every process keeps its own
small cache of verified shards (about one shuffle block, or the shards under the rank's
lanes); each worker reads all of them, the price of any worker being able to build any batch.

Naming: `_BT1` a batch of rows of seq_len + 1 tokens, `_S` shards in manifest order.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from typing import Any

import torch

from switchall.data_pipeline.assembler import BatchAssembler, WorkerBatches
from switchall.data_pipeline.manifest import DataError, read_manifest
from switchall.data_pipeline.order import DEFAULT_BLOCK_TOKENS, GlobalOrder

STATE_FORMAT = 1
GROUP_TOKENS = 1 << 18  # tokens per item passed from a DataLoader worker (several batches)
MAX_GROUP = 32  # ...but not so many batches that tiny ones are built far ahead of their use


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGINT/SIGTERM/SIGUSR1 to the trainer: Slurm and a terminal
    signal the whole process group, and a worker killed by them would crash the run that is
    trying to stop cleanly (the trainer shuts its workers down itself)."""
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


class TokenLoader:
    """Token batches `[global_batch_size // dp_size, seq_len + 1]` (int64) from a prepared dataset.

    Args:
        location: directory or URL holding `manifest.json`, or a `{}` template (see `manifest`).
        split: "train" or "val".
        global_batch_size: rows per global batch, over all data-parallel ranks.
        seq_len: T; each row holds T + 1 tokens (inputs row[:-1], targets row[1:]).
        dp_rank, dp_size: this rank takes rows [dp_rank * b, (dp_rank + 1) * b), b = gbs / dp_size.
        seed: the global order's seed (shard order per epoch, windows within shuffle blocks).
        mode: "shuffled" (independent windows) or "contiguous" (per-lane streams, XL memory).
        loop: iterate epoch after epoch forever; False: one pass over epoch 0 (validation).
        num_workers: DataLoader worker processes; the stream does not depend on it.
        skip_bad_shards: replace a corrupt/missing/unreachable shard by the next readable one
            (logged) instead of raising DataError.
        expected_tokenizer_sha256: the model's tokenizer hash; a different dataset tokenizer
            raises DataError naming the manifest.
        retries, retry_delay: per remote file, attempts after the first, and the first backoff.
        shuffle_block_tokens: tokens per shuffle block (part of the order; keep the default).
    """

    def __init__(
        self,
        location: str | os.PathLike,
        *,
        split: str = "train",
        global_batch_size: int,
        seq_len: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        mode: str = "shuffled",
        loop: bool = True,
        num_workers: int = 0,
        skip_bad_shards: bool = False,
        expected_tokenizer_sha256: str | None = None,
        retries: int = 3,
        retry_delay: float = 0.5,
        shuffle_block_tokens: int = DEFAULT_BLOCK_TOKENS,
    ):
        if global_batch_size < 1 or seq_len < 1 or num_workers < 0:
            raise ValueError("global_batch_size and seq_len must be >= 1, num_workers >= 0")
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} is not a rank of dp_size={dp_size}")
        if global_batch_size % dp_size:
            raise ValueError(
                f"global_batch_size={global_batch_size} is not divisible by dp_size={dp_size}"
            )
        self.manifest = read_manifest(location, retries=retries)
        where = self.manifest.manifest_url
        theirs = self.manifest.tokenizer.get("sha256")
        if expected_tokenizer_sha256 is not None and theirs != expected_tokenizer_sha256:
            raise DataError(
                f"{where}: the dataset's tokenizer (sha256 {theirs}) is not the model's "
                f"({expected_tokenizer_sha256}); prepare the data with the model's tokenizer"
            )
        counts_S = tuple(s.tokens for s in self.manifest.shards(split))
        if not counts_S:
            raise DataError(f"{where}: split {split!r} has no shards")
        self.order = GlobalOrder(
            counts_S, seed, mode, global_batch_size, seq_len, shuffle_block_tokens
        )
        if self.order.batches_per_epoch == 0:
            raise DataError(
                f"{where}: split {split!r} has {self.order.total_tokens:,} tokens, too few for "
                f"one {mode} batch of {global_batch_size} x {seq_len + 1}"
            )
        self.split, self.loop, self.num_workers = split, loop, num_workers
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.local_batch_size = global_batch_size // dp_size
        lo = dp_rank * self.local_batch_size
        self._assembler = BatchAssembler(
            self.manifest,
            split,
            self.order,
            lo,
            lo + self.local_batch_size,
            skip_bad_shards,
            retries,
            retry_delay,
        )
        self._position = 0

    @property
    def batches_per_epoch(self) -> int:
        """Global batches in one epoch (the same in every epoch)."""
        return self.order.batches_per_epoch

    @property
    def shard_loads(self) -> int:
        """Shards fetched by this process (workers count their own)."""
        return self._assembler.shard_loads

    def is_lane_start(self, batch_index: int) -> bool:
        """True if global batch `batch_index` starts fresh lanes, so XL memory must be reset:
        the first batch of each epoch in contiguous mode, every batch in shuffled mode."""
        return self.order.mode == "shuffled" or batch_index % self.batches_per_epoch == 0

    def batch(self, index: int) -> torch.Tensor:
        """This rank's rows of global batch `index` (random access; the state is unchanged)."""
        return torch.from_numpy(self._assembler.batch(index))

    def __iter__(self) -> Iterator[torch.Tensor]:
        """Batches from the current position on. With loop=False: to the end of the epoch, after
        which the position returns to 0 (so the next iteration is a full pass again)."""
        bpe = self.batches_per_epoch
        if not self.loop and self._position >= bpe:
            self._position = 0
        start, stop = self._position, (None if self.loop else bpe)
        if self.num_workers == 0:
            indices = itertools.count(start) if stop is None else range(start, stop)
            source: Any = (self.batch(k) for k in indices)
        else:
            tokens_per_batch = self.local_batch_size * (self.order.seq_len + 1)
            group = min(MAX_GROUP, max(1, GROUP_TOKENS // tokens_per_batch))
            groups = torch.utils.data.DataLoader(
                WorkerBatches(self._assembler, start, stop, group),
                batch_size=None,
                num_workers=self.num_workers,
                prefetch_factor=2,
                worker_init_fn=_ignore_stop_signals,
            )
            source = (batch_BT1 for group_GBT1 in groups for batch_BT1 in group_GBT1)
        for batch_BT1 in source:
            self._position += 1  # counted when handed over: a checkpoint after it skips it
            yield batch_BT1
        if not self.loop:
            self._position = 0

    def state_dict(self) -> dict[str, Any]:
        """The global position and what it means; no rank or worker information."""
        o = self.order
        return {
            "format": STATE_FORMAT,
            "batches": self._position,
            "samples": self._position * o.global_batch_size,
            "epoch": self._position // o.batches_per_epoch,
            "split": self.split,
            "seed": o.seed,
            "mode": o.mode,
            "global_batch_size": o.global_batch_size,
            "seq_len": o.seq_len,
            "shuffle_block_tokens": o.block_tokens,
            "manifest": self.manifest.fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict()` saved at any data-parallel size or worker count."""
        if state.get("format") != STATE_FORMAT:
            raise DataError(f"loader state: unknown format {state.get('format')!r}")
        mine = self.state_dict()
        for key in (
            "manifest",
            "split",
            "seed",
            "mode",
            "global_batch_size",
            "seq_len",
            "shuffle_block_tokens",
        ):
            if state.get(key) != mine[key]:
                hint = " (the dataset changed since the checkpoint)" if key == "manifest" else ""
                raise DataError(
                    f"loader state: {key} is {state.get(key)!r} in the checkpoint but "
                    f"{mine[key]!r} for {self.manifest.manifest_url}{hint}"
                )
        batches = state.get("batches")
        if not isinstance(batches, int) or batches < 0:
            raise DataError(f"loader state: bad batch count {batches!r}")
        self._position = batches
