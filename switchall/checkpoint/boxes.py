"""Pieces of global tensors: what one rank holds of a parameter or an optimiser moment.

A `GlobalTensor` names a tensor of the single-device model by its global size and lists the
rectangular boxes of it this rank holds, each a view of live memory (a parameter, a ZeRO flat
partition, an optimiser moment) with its global offsets. torch.distributed.checkpoint (DCP)
writes each box as one chunk and, on load, reads into each box whatever saved chunks overlap
it, so a tensor saved under one layout comes back under any other.

Where the boxes come from:
- tensor / expert parallelism cut a parameter into one box per rank, whose offsets are the
  `switchall_shards` marks of `switchall.parallel.sharded_state` ((dim, start, full) per cut);
- ZeRO-1/2/3 keep a contiguous range of the flattened (local) parameter; `flat_range_boxes`
  cuts such a range of a row-major tensor into at most 2 * ndim - 1 boxes (partial first row,
  whole rows, partial last row, recursively per dim), each itself contiguous, so each box is a
  plain view of the flat partition and no rank ever materialises a whole tensor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType


def flat_range_boxes(
    shape: Sequence[int], start: int, numel: int
) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The boxes (offsets, sizes) that tile flat elements [start, start + numel) of `shape`.

    Boxes come in flat order; each covers a contiguous flat range, the next starting where the
    previous one ends.
    """
    shape = tuple(int(s) for s in shape)
    total = math.prod(shape)
    if start < 0 or numel < 0 or start + numel > total:
        raise ValueError(f"flat range [{start}, {start + numel}) is outside a tensor of {shape}")
    if numel == 0:
        return []
    if not shape:
        return [((), ())]
    return _boxes(shape, start, start + numel)


def _boxes(shape: tuple[int, ...], lo: int, hi: int) -> list:
    """Boxes of flat [lo, hi) within `shape` (offsets relative to the tensor's origin)."""
    if len(shape) == 1:
        return [((lo,), (hi - lo,))]
    row = math.prod(shape[1:])  # elements per index of dim 0
    first, last = lo // row, (hi - 1) // row
    if first == last:  # inside one index of dim 0: recurse into the sub-tensor
        return [
            ((first, *o), (1, *s)) for o, s in _boxes(shape[1:], lo - first * row, hi - first * row)
        ]
    out = []
    if lo % row:  # partial first row
        out += [((first, *o), (1, *s)) for o, s in _boxes(shape[1:], lo % row, row)]
        first += 1
    full_end = hi // row  # rows [first, full_end) are whole
    if full_end > first:
        out.append(((first, *([0] * (len(shape) - 1))), (full_end - first, *shape[1:])))
    if hi % row:  # partial last row
        out += [((full_end, *o), (1, *s)) for o, s in _boxes(shape[1:], 0, hi % row)]
    return out


def shard_offsets(
    p: torch.Tensor, local_shape: Sequence[int] | None = None
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(global offsets, global size) of local parameter shard `p` from its `switchall_shards`.

    `local_shape` stands in for `p.shape` where ZeRO-3 left an empty placeholder in `p`.
    """
    shape = p.shape if local_shape is None else local_shape
    offsets, size = [0] * len(shape), [int(s) for s in shape]
    for dim, start, full in getattr(p, "switchall_shards", ()):
        offsets[dim], size[dim] = int(start), int(full)
    return tuple(offsets), tuple(size)


@dataclass
class Box:
    offsets: tuple[int, ...]
    """Global offsets of the box's first element."""
    tensor: torch.Tensor
    """A view of live memory with the box's sizes (written to on load)."""


class GlobalTensor:
    """This rank's boxes of one global tensor, as DCP's `_Checkpointable` protocol wants them.

    DCP's planners look these up through `switchall.checkpoint.dcp_io`'s planners (its default
    lookup only understands torch tensors). `dtype` is the dtype stored in the checkpoint.
    """

    def __init__(self, size: Sequence[int], dtype: torch.dtype, boxes: Sequence[Box] = ()):
        self.global_size = torch.Size(size)
        self.dtype = dtype
        self.boxes: list[Box] = []
        for b in boxes:
            self.add(b.offsets, b.tensor)

    def add(self, offsets: Sequence[int], tensor: torch.Tensor) -> None:
        offsets = tuple(int(o) for o in offsets)
        if len(offsets) != len(self.global_size) or tensor.dim() != len(offsets):
            raise ValueError(
                f"box {offsets} {tuple(tensor.shape)} in a tensor of {self.global_size}"
            )
        for o, s, full in zip(offsets, tensor.shape, self.global_size, strict=True):
            if o < 0 or o + s > full:
                raise ValueError(f"box {offsets} {tuple(tensor.shape)} exceeds {self.global_size}")
        if tensor.numel() or not offsets:
            self.boxes.append(Box(offsets, tensor))

    @classmethod
    def of_shard(cls, p: torch.Tensor, value: torch.Tensor | None = None) -> GlobalTensor:
        """The whole local shard of parameter `p` (its TP/EP slice), or `value` laid out like it."""
        offsets, size = shard_offsets(p)
        t = p if value is None else value
        return cls(size, t.dtype, [Box(offsets, t.view(p.shape))])

    @classmethod
    def of_flat_range(
        cls, p: torch.Tensor, start: int, flat: torch.Tensor, local_shape: Sequence[int]
    ) -> GlobalTensor:
        """Flat elements [start, start + flat.numel()) of the local shard `p` (shape
        `local_shape`), held in the 1-d view `flat` (a ZeRO fragment or partition)."""
        base, size = shard_offsets(p, local_shape)
        g = cls(size, flat.dtype)
        pos = 0
        for offsets, sizes in flat_range_boxes(local_shape, start, flat.numel()):
            n = math.prod(sizes)
            view = flat.narrow(0, pos, n).view(sizes)
            g.add(tuple(b + o for b, o in zip(base, offsets, strict=True)), view)
            pos += n
        return g

    def size(self) -> torch.Size:  # DCP's load planner compares `obj.size()` with the saved size
        return self.global_size

    def chunks(self) -> list[ChunkStorageMetadata]:
        return [
            ChunkStorageMetadata(offsets=torch.Size(b.offsets), sizes=b.tensor.shape)
            for b in self.boxes
        ]

    # ---- DCP's _Checkpointable protocol
    def __create_write_items__(self, fqn: str, obj: object) -> list[WriteItem]:
        props = TensorProperties(dtype=self.dtype)
        return [
            WriteItem(
                index=MetadataIndex(fqn, chunk.offsets),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(chunk=chunk, properties=props, size=self.global_size),
            )
            for chunk in self.chunks()
        ]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return self.chunks()

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        if index.index is not None and index.index < len(self.boxes):
            box = self.boxes[index.index]
            if torch.Size(box.offsets) == index.offset:
                return box.tensor
        for box in self.boxes:
            if torch.Size(box.offsets) == index.offset:
                return box.tensor
        raise KeyError(f"{index.fqn}: this rank holds no box at {tuple(index.offset or ())}")
