"""Inputs of `switchall prepare`, and the one deterministic order in which they are tokenized.

An input is `@stdlib` (the embedded default: the `.py` files of this interpreter's standard
library), a text file, a directory (every non-hidden file under it), a glob, or JSON Lines
(`.jsonl`/`.ndjson`, plain or `.gz`/`.zst`: one document per line, text in `--text-field`).
`INPUT:WEIGHT` sets a sampling rate: each training document of the input is taken
floor(WEIGHT) times, plus once more with probability frac(WEIGHT) (decided by a hash of the
document's name, so it is reproducible). Validation documents are taken once whatever the weight.

A document is named by its path relative to the input root (JSON Lines: `path#line`); the
validation split holds the documents whose sha256(name) falls in the lowest `val_fraction` of
the hash range, so the split is the same on every machine that has the same files. Files are
visited in the order of another hash of their names (a fixed shuffle), and inputs are
interleaved by how much of each has been read, so a mix is mixed all along the token stream.

The documents are cut into work units of about `UNIT_BYTES` of text; unit i is the same on
every run whatever the number of workers, which is what makes `prepare` deterministic and
resumable by unit index.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import math
import os
import re
import sysconfig
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

from switchall.data_pipeline.manifest import DataError

STDLIB = "@stdlib"
UNIT_BYTES = 1 << 20
PIECE_BYTES = 4 << 20  # big text files are read in pieces this size, cut at a newline
JSONL_SUFFIXES = (".jsonl", ".ndjson")
COMPRESSED = (".gz", ".zst")
_WEIGHT = re.compile(r"^(.+):(\d+(?:\.\d*)?|\.\d+)$")


@dataclass(frozen=True)
class InputSpec:
    spec: str
    """The input as given, without its weight."""
    weight: float = 1.0
    split: str = "auto"
    """auto: hash split; train or val: all of the input goes to that split."""


@dataclass(frozen=True)
class SourceFile:
    key: str
    """The path relative to the input root (posix): names the file's documents."""
    path: str
    size: int
    jsonl: bool


@dataclass
class Unit:
    """A slice of the document stream, tokenized as one task."""

    index: int
    parts: list[tuple[str, str, bytes, bool, str]] = field(default_factory=list)
    """(split, kind "text"|"source"|"jsonl", payload, ends a document, origin for messages)."""
    text_bytes: int = 0
    disk_bytes: int = 0


def parse_input(text: str, split: str = "auto") -> InputSpec:
    """`PATH`, `PATH:WEIGHT`, `@stdlib` or `@stdlib:WEIGHT`; a path that exists is never split."""
    m = _WEIGHT.match(text)
    if m and not os.path.exists(text):
        weight = float(m.group(2))
        if not weight > 0:
            raise DataError(f"input {text!r}: the weight must be > 0")
        return InputSpec(m.group(1), weight, split)
    base, sep, weight = text.rpartition(":")
    if sep and not os.path.exists(text) and (base == STDLIB or os.path.exists(base)):
        raise DataError(
            f"input {text!r}: {weight!r} is not a weight (a number > 0, e.g. {base}:0.5)"
        )
    return InputSpec(text, 1.0, split)


def _u64(data: str) -> int:
    return int.from_bytes(hashlib.sha256(data.encode()).digest()[:8], "big")


def split_of(key: str, val_fraction: float) -> str:
    """'val' for about `val_fraction` of document names, chosen by sha256 of the name."""
    return "val" if _u64(key) < val_fraction * 2.0**64 else "train"


def _taken(key: str, pass_index: int, weight: float) -> bool:
    whole = math.floor(weight)
    if pass_index < whole:
        return True
    return _u64(f"{pass_index}:{key}") < (weight - whole) * 2.0**64


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _is_jsonl(name: str) -> bool:
    for suffix in COMPRESSED:
        name = name.removesuffix(suffix)
    return name.endswith(JSONL_SUFFIXES)


def _walk(root: Path, only_py: bool) -> list[tuple[str, Path]]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Installed packages are not the standard library; hidden and cache folders are noise.
        skip = {"site-packages", "dist-packages", "__pycache__"} if only_py else {"__pycache__"}
        dirnames[:] = [d for d in dirnames if d not in skip and not d.startswith(".")]
        for name in filenames:
            if name.startswith(".") or (only_py and not name.endswith(".py")):
                continue
            path = Path(dirpath) / name
            if path.is_file():
                found.append((path.relative_to(root).as_posix(), path))
    return found


def list_files(spec: InputSpec) -> list[SourceFile]:
    """The files of an input, in its fixed shuffled order; empty files are left out."""
    text = spec.spec
    if text == STDLIB:
        pairs = _walk(stdlib_root(), only_py=True)
    elif os.path.isdir(text):
        pairs = _walk(Path(text), only_py=False)
    elif os.path.isfile(text):
        pairs = [(Path(text).name, Path(text))]
    elif glob.has_magic(text):
        prefix = re.split(r"[*?\[]", text, maxsplit=1)[0]
        root = Path(os.path.dirname(prefix) or ".")
        pairs = [
            (Path(p).relative_to(root).as_posix(), Path(p))
            for p in glob.glob(text, recursive=True)
            if os.path.isfile(p)
        ]
    else:
        raise DataError(f"input {text!r}: no such file or directory, and not a glob")
    files = [
        SourceFile(key, str(path), path.stat().st_size, _is_jsonl(path.name)) for key, path in pairs
    ]
    files = [f for f in files if f.size > 0]
    if not files:
        raise DataError(f"input {text!r}: no non-empty files")
    return sorted(files, key=lambda f: (_u64("order:" + f.key), f.key))


def _zstd_lines(raw) -> Iterator[bytes]:
    """Lines of a (possibly multi-frame) zstd file; a file cut inside a frame raises EOFError
    (zstandard's stream_reader would just stop there)."""
    dctx = zstandard.ZstdDecompressor()
    d, fed, tail = dctx.decompressobj(), False, b""
    while chunk := raw.read(1 << 20):
        while chunk:
            fed = True
            lines = (tail + d.decompress(chunk)).split(b"\n")
            tail = lines.pop()
            yield from (line + b"\n" for line in lines)
            if d.eof:  # end of a frame: the rest of the chunk starts the next one
                chunk, d, fed = d.unused_data, dctx.decompressobj(), False
            else:
                chunk = b""
    if fed:
        raise EOFError("the file ends inside a zstd frame")
    if tail:
        yield tail


def _jsonl_lines(f: SourceFile, raw) -> Iterator[bytes]:
    if f.path.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw)
    if f.path.endswith(".zst"):
        return _zstd_lines(raw)
    return raw


def _file_parts(f: SourceFile, kind: str) -> Iterator[tuple[str, bytes, bool, str, int]]:
    """(kind, payload, ends a document, origin, on-disk bytes read since the last part)."""
    try:
        with open(f.path, "rb") as raw:
            if not f.jsonl:
                piece = raw.read(PIECE_BYTES) + raw.readline()
                while piece:
                    nxt = raw.read(PIECE_BYTES) + raw.readline()
                    yield kind, piece, not nxt, f.path, len(piece)
                    piece = nxt
                return
            stream, last = _jsonl_lines(f, raw), 0
            for line_no, line in enumerate(stream, 1):
                if line.strip():
                    pos = raw.tell()
                    yield "jsonl", line, True, f"{f.path}:{line_no}", pos - last
                    last = pos
            if f.size > last:
                yield "jsonl", b"", True, f"{f.path}:end", f.size - last
    except (EOFError, gzip.BadGzipFile, zlib.error, zstandard.ZstdError) as e:
        raise DataError(f"{f.path}: corrupt or truncated compressed file ({e})") from None
    except OSError as e:
        raise DataError(f"{f.path}: cannot read it ({e})") from None


def _input_units(spec: InputSpec, files: list[SourceFile], val_fraction: float) -> Iterator[Unit]:
    """Units of one input, indices unset; all passes of its weight."""
    # Python sources may declare other encodings (PEP 263): the embedded corpus decodes them
    # with U+FFFD substitution ("source"); other text files follow --encoding-errors ("text").
    text_kind = "source" if spec.spec == STDLIB else "text"
    unit = Unit(-1)
    for p in range(math.ceil(spec.weight)):
        for f in files:
            for kind, payload, final, origin, disk in _file_parts(f, text_kind):
                unit.disk_bytes += disk
                key = f.key if kind != "jsonl" else f"{f.key}#{origin.rsplit(':', 1)[1]}"
                split = spec.split if spec.split != "auto" else split_of(key, val_fraction)
                if not payload or (p > 0 if split == "val" else not _taken(key, p, spec.weight)):
                    continue
                unit.parts.append((split, kind, payload, final, origin))
                unit.text_bytes += len(payload)
                if unit.text_bytes >= UNIT_BYTES:
                    yield unit
                    unit = Unit(-1)
    if unit.parts or unit.disk_bytes:
        yield unit


def iter_units(
    inputs: list[InputSpec], files: list[list[SourceFile]], val_fraction: float
) -> Iterator[Unit]:
    """The units of all inputs, interleaved: the next unit always comes from the input of which
    the smallest fraction has been read (ties: the earlier input)."""
    streams = [_input_units(s, f, val_fraction) for s, f in zip(inputs, files, strict=True)]
    totals = [
        max(1, sum(x.size for x in f) * math.ceil(s.weight))
        for s, f in zip(inputs, files, strict=True)
    ]
    read = [0] * len(inputs)
    pending = [next(s, None) for s in streams]
    index = 0
    while any(u is not None for u in pending):
        i = min((read[i] / totals[i], i) for i, u in enumerate(pending) if u is not None)[1]
        unit = pending[i]
        unit.index, index = index, index + 1
        read[i] += unit.disk_bytes
        pending[i] = next(streams[i], None)
        yield unit
