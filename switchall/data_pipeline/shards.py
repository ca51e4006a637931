"""Token shards: webdataset tar files of `.npy` token chunks.

A shard holds a fixed number of tokens (the manifest's `shard_tokens`; the last shard of a split
may hold fewer), stored as samples of at most `CHUNK_TOKENS` tokens each: member
`<split>-<shard>-<chunk>.tokens.npy`, a 1-D uint16 (or uint32) array written without pickle.
Any webdataset reader can iterate them; `load_shard` reads one whole shard and checks it
against the manifest (size, sha256, member names, dtype, token count).

Writing goes to `<name>.tmp` and is renamed only when the file is complete and flushed to disk,
so an interrupted `prepare` never leaves a shard that looks valid.
"""

from __future__ import annotations

import hashlib
import io
import os
import time
from pathlib import Path

import numpy as np

from switchall.data_pipeline.manifest import SHARD_NAME, DataError, ShardInfo, fetch, is_local
from switchall.fileio import fsync_dir

CHUNK_TOKENS = 1 << 16


class _HashingWriter:
    """A write-only file wrapper that hashes and counts what goes through it."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def npy_bytes(tokens: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(tokens), allow_pickle=False)
    return buf.getvalue()


def write_shard(directory: Path, split: str, index: int, tokens: np.ndarray) -> ShardInfo:
    """Write `tokens` as shard `index` of `split`; returns its manifest entry.

    The tar bytes depend only on the tokens (fixed mtime, owner and mode), so a shard rewritten
    after a resume, or by a run with another number of workers, is byte-identical.
    """
    from webdataset import TarWriter

    name = SHARD_NAME.format(split=split, index=index)
    final, tmp = directory / name, directory / f"{name}.tmp"
    with open(tmp, "wb") as f:
        hashing = _HashingWriter(f)
        with TarWriter(hashing, encoder=False, mtime=0, user="switchall", group="switchall") as tw:
            for c, start in enumerate(range(0, len(tokens), CHUNK_TOKENS)):
                chunk = tokens[start : start + CHUNK_TOKENS]
                tw.write(
                    {"__key__": f"{split}-{index:06d}-{c:04d}", "tokens.npy": npy_bytes(chunk)}
                )
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    fsync_dir(directory)
    return ShardInfo(
        name=name,
        tokens=int(len(tokens)),
        documents=0,  # filled in by the caller, which knows the end-of-document id
        bytes=hashing.size,
        sha256=hashing.sha.hexdigest(),
    )


def verify_shard(data: bytes, info: ShardInfo, dtype: str) -> np.ndarray:
    """Check `data` against its manifest entry and return its tokens; DataError names the shard."""
    where = f"shard {info.name}"
    if len(data) != info.bytes:
        kind = "truncated" if len(data) < info.bytes else "too long"
        raise DataError(f"{where}: {kind}: {len(data)} bytes, the manifest says {info.bytes}")
    digest = hashlib.sha256(data).hexdigest()
    if digest != info.sha256:
        raise DataError(
            f"{where}: sha256 mismatch (manifest {info.sha256[:16]}..., file {digest[:16]}...): "
            "the file is corrupt or was changed after `switchall prepare`"
        )
    from webdataset.tariterators import tar_file_iterator

    chunks = []
    try:
        for member in tar_file_iterator(io.BytesIO(data)):
            if not member["fname"].endswith(".tokens.npy"):
                raise DataError(f"{where}: unexpected member {member['fname']!r}")
            chunk = np.lib.format.read_array(io.BytesIO(member["data"]), allow_pickle=False)
            if chunk.dtype != np.dtype(dtype) or chunk.ndim != 1:
                raise DataError(f"{where}: member {member['fname']} is {chunk.dtype}{chunk.shape}")
            chunks.append(chunk)
    except DataError:
        raise
    except Exception as e:  # tarfile/npy parse errors: the checksum matched, so the manifest lies
        raise DataError(f"{where}: unreadable tar/npy content: {e}") from None
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, dtype=dtype)
    if len(tokens) != info.tokens:
        raise DataError(f"{where}: {len(tokens)} tokens, the manifest says {info.tokens}")
    return tokens


def load_shard(
    url: str, info: ShardInfo, dtype: str, *, retries: int = 3, retry_delay: float = 0.5
) -> np.ndarray:
    """Fetch and verify one shard.

    A remote shard that arrives short or corrupt (a connection dropped mid-transfer) is fetched
    again, up to `retries` times; a bad local file fails at once.
    """
    attempts = 1 if is_local(url) else 1 + max(0, retries)
    problem: DataError | None = None
    for attempt in range(attempts):
        if attempt:
            time.sleep(retry_delay * 2 ** (attempt - 1))
        data = fetch(url, f"shard {info.name}", retries=retries, retry_delay=retry_delay)
        try:
            return verify_shard(data, info, dtype)
        except DataError as e:
            problem = e
    assert problem is not None
    if attempts > 1:
        raise DataError(f"{problem} ({url}, after {attempts} attempts)") from None
    raise DataError(f"{problem} ({url})") from None
