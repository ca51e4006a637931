"""Tokenizers: a trained (or reused) sentencepiece model, or plain bytes.

sentencepiece models trained here are lossless on any text: identity normalisation, spaces and
indentation kept as they are (`remove_extra_whitespaces=False`, whitespace-only pieces allowed),
digits split (spec §8), and byte fallback so that newlines and characters outside the vocabulary
become byte tokens instead of `<unk>`. The end-of-document token is the model's `</s>`.

The byte tokenizer maps each byte to its value (vocabulary 256) and separates documents with
byte 0 (NUL), which text does not contain; evaluation on it reports bits per byte/character.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Iterator
from typing import Any

from switchall.data_pipeline.manifest import (
    TOKENIZER_NAME,
    DataError,
    Manifest,
    fetch,
    read_manifest,
)

BYTE_VOCAB = 256
BYTE_EOD = 0
# The byte tokenizer has no model file; this stands in for its hash in manifests and checkpoints.
BYTE_SHA256 = hashlib.sha256(b"switchall byte tokenizer v1: token = byte, eod = 0").hexdigest()


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


class ByteTokenizer:
    """Bytes as tokens (vocabulary 256, end of document = 0)."""

    vocab_size = BYTE_VOCAB
    eod_id = BYTE_EOD
    sha256 = BYTE_SHA256

    def encode(self, text: str | bytes) -> list[int]:
        return list(text.encode() if isinstance(text, str) else text)

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def info(self) -> dict[str, Any]:
        return {"type": "byte", "sha256": self.sha256, "vocab_size": BYTE_VOCAB}


class SentencePieceTokenizer:
    """A sentencepiece model held as its serialized bytes (so it can be shipped to workers)."""

    def __init__(self, model: bytes, origin: str = "tokenizer", model_type: str | None = None):
        import sentencepiece as spm

        try:
            self.sp = spm.SentencePieceProcessor(model_proto=model)
        except Exception as e:
            raise DataError(f"{origin}: not a sentencepiece model ({e})") from None
        self.model, self.model_type = model, model_type
        self.sha256 = hashlib.sha256(model).hexdigest()
        self.vocab_size = int(self.sp.vocab_size())
        self.eod_id = int(self.sp.eos_id())
        if self.eod_id < 0:
            raise DataError(
                f"{origin}: the model has no end-of-sentence piece (eos_id=-1); "
                "documents are separated with it, so train one with eos_id >= 0"
            )

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # One thread: prepare's parallelism is its worker processes.
        return self.sp.encode(texts, num_threads=1)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def info(self) -> dict[str, Any]:
        info = {
            "type": "sentencepiece",
            "path": TOKENIZER_NAME,
            "sha256": self.sha256,
            "vocab_size": self.vocab_size,
        }
        if self.model_type:  # known when trained here; a reused model file does not say
            info["model_type"] = self.model_type
        return info


def train_sentencepiece(
    lines: Iterator[str], *, vocab_size: int, model_type: str = "bpe", threads: int | None = None
) -> SentencePieceTokenizer:
    """Train a lossless sentencepiece model on `lines` (the caller bounds the sample)."""
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines,
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            split_digits=True,
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            # No "▁" prepended to each encode call: big files are encoded in pieces, and a
            # dummy prefix would insert a space at every piece boundary.
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            input_sentence_size=0,
            max_sentence_length=16384,
            num_threads=threads or os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as e:
        hint = _hint(str(e))
        raise DataError(f"training the sentencepiece tokenizer failed: {e} ({hint})") from None
    return SentencePieceTokenizer(model.getvalue(), "trained tokenizer", model_type)


def _hint(message: str) -> str:
    """What to change, in switchall's flags, for sentencepiece's two vocabulary errors."""
    too_high = re.search(r"Vocabulary size too high \((\d+)\).*?<= (\d+)", message)
    if too_high:
        return (
            f"the text supports at most {too_high[2]} pieces: use --vocab-size {too_high[2]} "
            "or less, or give it more text (more inputs, a larger --tokenizer-sample-mb)"
        )
    too_low = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message)
    if too_low:
        return (
            f"the text has {too_low[2]} distinct characters and special pieces: use "
            f"--vocab-size {too_low[2]} or more, or --tokenizer byte"
        )
    return "check --vocab-size and --tokenizer-sample-mb"


def load_tokenizer(dataset: str | os.PathLike | Manifest) -> ByteTokenizer | SentencePieceTokenizer:
    """The tokenizer of a prepared dataset (a location or a read manifest), hash-checked."""
    manifest = dataset if isinstance(dataset, Manifest) else read_manifest(dataset)
    kind = manifest.tokenizer["type"]
    if kind == "byte":
        return ByteTokenizer()
    if kind != "sentencepiece":
        raise DataError(f"{manifest.manifest_url}: unknown tokenizer type {kind!r}")
    url = manifest.tokenizer["url"]
    tok = SentencePieceTokenizer(fetch(url, "tokenizer"), url)
    if tok.sha256 != manifest.tokenizer["sha256"]:
        raise DataError(f"{url}: sha256 differs from the one in {manifest.manifest_url}")
    return tok
