"""torch.distributed.checkpoint (DCP) with JSON metadata and nothing unpickled.

DCP plans which rank writes which chunk of every tensor (duplicates of replicated chunks are
written once, by the least loaded holder), checks that the saved chunks of each tensor tile it
exactly (no overlap, no gap), and on load reads into each rank's boxes whatever saved chunks
overlap them. Tensor data is stored by `torch.save` per chunk and read back with
`torch.load(weights_only=True)`.

What is changed here, and why:
- DCP's own `.metadata` file is a pickle, read back with `pickle.load`; a checkpoint must never
  run code when loaded. `JsonFileSystemWriter` writes the same metadata as JSON
  (`dcp_metadata.json`) and `JsonFileSystemReader` reads only that.
- DCP stores non-tensor values with `torch.save` and loads them with `weights_only=False`;
  these planners accept tensors only (non-tensor state goes into JSON files beside the DCP
  data), and look up `GlobalTensor` boxes, which DCP's default lookup does not understand.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import queue
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.distributed.checkpoint.utils import _create_file_view
from torch.futures import Future

from switchall.checkpoint.boxes import GlobalTensor
from switchall.checkpoint.errors import CheckpointError
from switchall.fileio import write_atomic

METADATA_FILE = "dcp_metadata.json"
METADATA_FORMAT = "switchall.dcp_metadata"
DATA_SUFFIX = ".distcp"
_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float64,
        torch.float32,
        torch.bfloat16,
        torch.float16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    )
}


def dtype_named(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise CheckpointError(f"unknown tensor dtype {name!r} in checkpoint metadata")
    return _DTYPES[name]


def _dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise CheckpointError(f"cannot checkpoint tensors of dtype {dtype}")
    return name


def encode_metadata(metadata: Metadata, storage: dict[MetadataIndex, _StorageInfo]) -> bytes:
    tensors: dict[str, Any] = {}
    for fqn, md in metadata.state_dict_metadata.items():
        if not isinstance(md, TensorStorageMetadata):
            raise CheckpointError(f"{fqn}: only tensors go into the DCP data (got {type(md)})")
        tensors[fqn] = {
            "dtype": _dtype_name(md.properties.dtype),
            "size": list(md.size),
            "chunks": [[list(c.offsets), list(c.sizes)] for c in md.chunks],
        }
    items = [
        [idx.fqn, list(idx.offset or ()), info.relative_path, info.offset, info.length]
        + ([list(info.transform_descriptors)] if info.transform_descriptors else [])
        for idx, info in storage.items()
    ]
    doc = {"format": METADATA_FORMAT, "version": 1, "tensors": tensors, "storage": items}
    return json.dumps(doc, separators=(",", ":")).encode()


def decode_metadata(data: bytes, source: Path) -> Metadata:
    try:
        doc = json.loads(data)
        if doc.get("format") != METADATA_FORMAT:
            raise ValueError(f"format is {doc.get('format')!r}, expected {METADATA_FORMAT!r}")
        tensors = {
            fqn: TensorStorageMetadata(
                properties=TensorProperties(dtype=_DTYPES[t["dtype"]]),
                size=torch.Size(t["size"]),
                chunks=[
                    ChunkStorageMetadata(offsets=torch.Size(o), sizes=torch.Size(s))
                    for o, s in t["chunks"]
                ],
            )
            for fqn, t in doc["tensors"].items()
        }
        storage = {}
        for fqn, offset, path, start, length, *rest in doc["storage"]:
            if "/" in path or "\\" in path or path.startswith("."):
                raise ValueError(f"data file name {path!r} is not a plain file name")
            storage[MetadataIndex(fqn, offset)] = _StorageInfo(
                path, int(start), int(length), rest[0] if rest else None
            )
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"{source}: unreadable DCP metadata: {type(e).__name__}: {e}"
        ) from None
    return Metadata(state_dict_metadata=tensors, storage_data=storage)


def read_metadata(directory: Path) -> Metadata:
    path = Path(directory) / METADATA_FILE
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: missing DCP metadata: {e.strerror}") from None
    return decode_metadata(data, path)


class JsonFileSystemWriter(FileSystemWriter):
    """DCP's file writer (one data file per rank, fsynced) with JSON metadata, streaming.

    DCP's own write loop copies every view into a tensor of its own (torch.save of a view
    would store its whole base) and keeps all of them until the file is closed, so a rank's
    memory grows by everything it writes. Here each chunk is copied, written and dropped in
    turn: the extra memory of a save is one chunk.
    """

    def __init__(self, path: str | Path):
        super().__init__(path, single_file_per_rank=True, sync_files=True, thread_count=1)

    def _write_data(self, planner, file_queue: queue.Queue) -> Future:
        results = []
        while not file_queue.empty():
            path, storage_key, items = file_queue.get_nowait()
            try:
                with open(path, "wb") as stream:
                    for item in items:
                        results.append(_write_chunk(stream, planner, item, storage_key))
                    stream.flush()
                    os.fsync(stream.fileno())
            except OSError as e:  # name the file (a full disk reports none)
                raise OSError(e.errno, e.strerror, str(path)) from None
        done: Future = Future()
        done.set_result(results)
        return done

    def finish(self, metadata: Metadata, results) -> None:
        storage = {wr.index: wr.storage_data for wrs in results for wr in wrs}
        write_atomic(Path(self.path) / METADATA_FILE, encode_metadata(metadata, storage))


def _write_chunk(stream, planner, item, storage_key: str) -> WriteResult:
    if item.type == WriteItemType.BYTE_IO:
        raise CheckpointError(f"{item.index.fqn}: only tensors are checkpointed")
    tensor = planner.resolve_data(item).detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    elif tensor.untyped_storage().nbytes() != tensor.nbytes:
        tensor = tensor.clone()  # a view: store its own elements only
    # Serialised in memory first: torch.save into a file turns a failed write (a full disk)
    # into an unrelated zip-writer error; stream.write raises the OSError itself.
    buf = io.BytesIO()
    torch.save(tensor, buf)
    del tensor
    offset = stream.tell()
    stream.write(buf.getbuffer())
    info = _StorageInfo(storage_key, offset, buf.tell())
    return WriteResult(index=item.index, size_in_bytes=buf.tell(), storage_data=info)


class JsonFileSystemReader(FileSystemReader):
    """DCP's file reader with JSON metadata, loading each saved chunk once.

    A saved chunk is one `torch.save` record, read whole; DCP's own loop reads it again for
    every destination box it overlaps (a ZeRO partition of a parameter is up to 2 * ndim - 1
    boxes). Here the requests are taken in file order and the last chunk is kept for the next
    request, so a rank reads each chunk it needs once, holding one chunk at a time.
    """

    bytes_read = 0
    """Bytes of saved chunks this rank's load read (what resharding costs it)."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        return read_metadata(Path(self.path))

    def read_data(self, plan, planner) -> Future:
        per_file: dict[str, list] = {}
        for item in plan.items:
            if item.type == LoadItemType.BYTE_IO:
                raise CheckpointError(f"{item.dest_index.fqn}: refusing a non-tensor item")
            info = self.storage_data[item.storage_index]
            if info.transform_descriptors:
                raise CheckpointError(f"{info.relative_path}: stream transforms are not read")
            per_file.setdefault(info.relative_path, []).append(item)
        for name, items in per_file.items():
            items.sort(key=lambda it: self.storage_data[it.storage_index].offset)
            with open(Path(self.path) / name, "rb") as stream:
                held, chunk = None, None
                for item in items:
                    info = self.storage_data[item.storage_index]
                    if held != info.offset:
                        chunk = None  # drop the previous chunk before reading the next
                        view = _create_file_view(stream, info.offset, info.length)
                        chunk = torch.load(view, map_location="cpu", weights_only=True)
                        held = info.offset
                        self.bytes_read += info.length
                    src = narrow_tensor_by_index(chunk, item.storage_offsets, item.lengths)
                    dst = planner.resolve_tensor(item).detach()
                    if dst.size() != src.size():
                        raise CheckpointError(
                            f"{name}: {item.storage_index.fqn} chunk is {tuple(src.size())}, "
                            f"expected {tuple(dst.size())}"
                        )
                    dst.copy_(src)
                    planner.commit_tensor(item, dst)
        done: Future = Future()
        done.set_result(None)
        return done


class BoxSavePlanner(DefaultSavePlanner):
    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def lookup_object(self, index: MetadataIndex) -> Any:
        obj = self.state_dict[index.fqn]
        if isinstance(obj, GlobalTensor):
            return obj.__get_tensor_shard__(index)
        return super().lookup_object(index)


class BoxLoadPlanner(DefaultLoadPlanner):
    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        # DefaultLoadPlanner's set-up walks the state dict to materialise meta tensors and
        # replaces every value it does not know (a GlobalTensor) with None: skip it.
        self.original_state_dict = self.state_dict = state_dict
        self.metadata, self.is_coordinator = metadata, is_coordinator

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        obj = self.state_dict[index.fqn]
        if isinstance(obj, GlobalTensor):
            return obj.__get_tensor_shard__(index)
        return super().lookup_tensor(index)

    def load_bytes(self, read_item, value) -> None:
        raise CheckpointError(f"{read_item.dest_index.fqn}: refusing to unpickle a non-tensor item")


def _reraise(e: CheckpointException, what: str, directory: Path):
    """One line naming the rank, the directory and the first underlying error."""
    rank, (exc, _trace) = next(iter(sorted(e.failures.items())))
    if isinstance(exc, OSError):
        raise CheckpointError(
            f"{exc.filename or directory}: {exc.strerror} (rank {rank})"
        ) from None
    if isinstance(exc, CheckpointError):
        raise CheckpointError(f"{what} {directory} failed on rank {rank}: {exc}") from None
    detail = f"{type(exc).__name__}: {exc}"
    raise CheckpointError(f"{what} {directory} failed on rank {rank}: {detail}") from None


@contextlib.contextmanager
def _quiet():
    """DCP warns that a one-process save 'assumes the intent' of one process: it is ours."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save(entries: dict[str, GlobalTensor], directory: Path, process_group=None, no_dist=False):
    """Write this rank's boxes of `entries` into `directory` (collective unless `no_dist`)."""
    try:
        with _quiet():
            dcp_save(
                entries,
                storage_writer=JsonFileSystemWriter(directory),
                planner=BoxSavePlanner(),
                process_group=process_group,
                no_dist=no_dist,
            )
    except CheckpointException as e:
        _reraise(e, "saving", directory)


def load(
    entries: dict[str, GlobalTensor], directory: Path, process_group=None, no_dist=False
) -> int:
    """Fill this rank's boxes of `entries` from `directory` (collective unless `no_dist`);
    returns the bytes of saved chunks this rank read."""
    reader = JsonFileSystemReader(directory)
    try:
        with _quiet():
            dcp_load(
                entries,
                storage_reader=reader,
                planner=BoxLoadPlanner(),
                process_group=process_group,
                no_dist=no_dist,
            )
    except CheckpointException as e:
        _reraise(e, "loading", directory)
    return reader.bytes_read
