"""Turning a work unit into token arrays; runs in `prepare`'s worker processes.

Kept free of torch and webdataset imports so that spawned workers start in a fraction of a
second. A unit's result depends on the unit alone, never on which worker ran it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import chain

import numpy as np

from switchall.data_pipeline.corpus import Unit
from switchall.data_pipeline.manifest import DataError
from switchall.data_pipeline.tokenizer import (
    ByteTokenizer,
    SentencePieceTokenizer,
    token_dtype,
)

SPLITS = ("train", "val")


@dataclass(frozen=True)
class TextOptions:
    text_field: str = "text"
    encoding_errors: str = "strict"
    """strict: undecodable UTF-8 is an error naming the file; replace: U+FFFD is substituted."""


@dataclass
class UnitResult:
    index: int
    tokens: dict[str, np.ndarray]
    documents: dict[str, int]
    text_bytes: int
    disk_bytes: int


def part_text(kind: str, payload: bytes, origin: str, opts: TextOptions) -> str:
    """The text of one document part: decoded file bytes, or the text field of a JSON line."""
    if kind != "jsonl":
        errors = "replace" if kind == "source" else opts.encoding_errors
        try:
            return payload.decode("utf-8", errors=errors)
        except UnicodeDecodeError as e:
            raise DataError(
                f"{origin}: not UTF-8 text (byte {e.start} of a piece); "
                "pass --encoding-errors replace to substitute U+FFFD"
            ) from None
    try:
        record = json.loads(payload)
    except ValueError as e:
        raise DataError(f"{origin}: not a valid JSON line ({e})") from None
    value = record.get(opts.text_field) if isinstance(record, dict) else None
    if not isinstance(value, str):
        what = "missing" if value is None else f"a {type(value).__name__}, not a string"
        raise DataError(f"{origin}: field {opts.text_field!r} is {what}")
    return value


def make_tokenizer(spec: tuple) -> ByteTokenizer | SentencePieceTokenizer:
    """("byte",) or ("sentencepiece", model bytes, model type): picklable, cheap to send."""
    if spec[0] == "byte":
        return ByteTokenizer()
    return SentencePieceTokenizer(spec[1], "tokenizer", spec[2])


_WORKER: dict = {}


def init_worker(tokenizer_spec: tuple, opts: TextOptions) -> None:
    _WORKER["tok"], _WORKER["opts"] = make_tokenizer(tokenizer_spec), opts


def encode_unit(unit: Unit) -> UnitResult:
    """Tokens of every document part of the unit, per split, each document followed by EOD."""
    tok, opts = _WORKER["tok"], _WORKER["opts"]
    return encode_with(tok, opts, unit)


def _refuse_nul(bytes_B: np.ndarray, origin: str) -> None:
    """Byte 0 is the byte tokenizer's end-of-document token, so it cannot also be text."""
    at = np.flatnonzero(bytes_B == 0)
    if at.size:
        raise DataError(
            f"{origin}: holds a NUL byte (byte {int(at[0])} of a piece), which the byte "
            "tokenizer uses as its end-of-document token; remove NULs or use a sentencepiece "
            "tokenizer"
        )


def encode_with(tok, opts: TextOptions, unit: Unit) -> UnitResult:
    dtype = token_dtype(tok.vocab_size)
    byte_level = isinstance(tok, ByteTokenizer)
    pieces: list = []
    kept = []
    for split, kind, payload, final, origin in unit.parts:
        if byte_level and kind != "jsonl":
            pieces.append(np.frombuffer(payload, dtype=np.uint8))  # raw bytes, as they are
        else:
            text = part_text(kind, payload, origin, opts)
            if kind == "jsonl" and not text:
                continue  # an empty document gets no end-of-document token either
            pieces.append(np.frombuffer(text.encode(), dtype=np.uint8) if byte_level else text)
        if byte_level:
            _refuse_nul(pieces[-1], origin)
        kept.append((split, final))
    if not byte_level:
        # One batched call per unit: sentencepiece's per-call overhead dominates short documents.
        pieces = tok.encode_batch(pieces)
    tokens, documents = {}, {}
    eod = np.array([tok.eod_id], dtype=dtype) if byte_level else [tok.eod_id]
    for split in SPLITS:
        seqs = []
        for (s, final), p in zip(kept, pieces, strict=True):
            if s == split:
                seqs.append(p)
                if final:
                    seqs.append(eod)
        if byte_level:
            tokens[split] = np.concatenate([np.zeros(0, dtype), *seqs]).astype(dtype)
        else:
            count = sum(len(x) for x in seqs)
            tokens[split] = np.fromiter(chain.from_iterable(seqs), dtype=dtype, count=count)
        documents[split] = sum(1 for s, final in kept if s == split and final)
    return UnitResult(unit.index, tokens, documents, unit.text_bytes, unit.disk_bytes)
