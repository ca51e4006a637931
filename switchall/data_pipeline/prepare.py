"""`switchall prepare`: inputs -> tokenizer -> token shards + `manifest.json`.

Work units (see `corpus`) are tokenized by worker processes and their results are consumed in
unit order, so the shards are byte-identical for any number of workers. Each split's tokens
are cut into shards of exactly `shard_tokens` tokens (the last one may be shorter).

Resumption (see `splitwriter`): after every unit that completed a shard, the state records the
shards written, the tokens not yet in a shard, and the next unit. A rerun with the same inputs
and options re-reads the inputs up to that unit without tokenizing them, then continues;
anything half-written (`*.tmp`) is discarded. `manifest.json` is written last, so a dataset
without one is never mistaken for a complete one.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from switchall.data_pipeline import corpus
from switchall.data_pipeline.cli import default_workers
from switchall.data_pipeline.encode import (
    SPLITS,
    TextOptions,
    encode_unit,
    init_worker,
    part_text,
)
from switchall.data_pipeline.manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_NAME,
    DataError,
    canonical_json,
    manifest_bytes,
    parse_manifest,
)
from switchall.data_pipeline.shards import CHUNK_TOKENS
from switchall.data_pipeline.splitwriter import STATE_NAME, SplitWriter, save_state
from switchall.data_pipeline.tokenizer import (
    ByteTokenizer,
    SentencePieceTokenizer,
    token_dtype,
    train_sentencepiece,
)
from switchall.fileio import write_atomic


@dataclass(kw_only=True)
class PrepareOptions:
    """What `switchall prepare` makes; the CLI flags map one to one onto these fields."""

    out: Path
    inputs: list[str] = field(default_factory=list)
    """INPUT[:WEIGHT] items (see `corpus`); none means the embedded default, @stdlib."""
    val_inputs: list[str] = field(default_factory=list)
    """Inputs that form the validation split; with any, the hash split is off."""
    val_fraction: float = 0.05
    tokenizer: str | None = None
    """None: train a sentencepiece model; "byte"; or the path of a .model file to reuse."""
    vocab_size: int = 8000
    model_type: str = "bpe"
    tokenizer_sample_mb: float = 16.0
    """The tokenizer is trained on at most this much training text (the first in prepare order)."""
    text_field: str = "text"
    encoding_errors: str = "strict"
    shard_tokens: int = 1 << 22
    workers: int = field(default_factory=default_workers)
    progress: bool = True

    def validate(self) -> None:
        def need(ok: bool, flag: str, message: str) -> None:
            if not ok:
                raise DataError(f"{flag}: {message}")

        need(0.0 <= self.val_fraction < 1.0, "--val-fraction", "must be in [0, 1)")
        need(self.vocab_size >= 300, "--vocab-size", "must be >= 300 (256 byte pieces + specials)")
        need(self.model_type in ("bpe", "unigram"), "--model-type", "must be bpe or unigram")
        need(self.tokenizer_sample_mb > 0, "--tokenizer-sample-mb", "must be > 0")
        need(self.encoding_errors in ("strict", "replace"), "--encoding-errors", "strict|replace")
        need(self.shard_tokens >= 1024, "--shard-tokens", "must be >= 1024")
        need(self.workers >= 1, "--workers", "must be >= 1")


def _request(opts: PrepareOptions, specs, files) -> dict:
    """The machine-independent description of what is being prepared (kept in the manifest)."""
    inputs = []
    for spec, fs in zip(specs, files, strict=True):
        item = {"spec": spec.spec, "weight": spec.weight, "split": spec.split, "files": len(fs)}
        if spec.spec == corpus.STDLIB:
            item["python"] = ".".join(map(str, sys.version_info[:3]))
        inputs.append(item)
    if opts.tokenizer == "byte":
        tok = {"kind": "byte"}
    elif opts.tokenizer:
        try:
            tok = {
                "kind": "file",
                "sha256": hashlib.sha256(Path(opts.tokenizer).read_bytes()).hexdigest(),
            }
        except OSError as e:
            raise DataError(f"--tokenizer {opts.tokenizer}: cannot read it ({e})") from None
    else:
        tok = {
            "kind": "train",
            "vocab_size": opts.vocab_size,
            "model_type": opts.model_type,
            "sample_mb": opts.tokenizer_sample_mb,
        }
    return {
        "inputs": inputs,
        "val_fraction": opts.val_fraction if not opts.val_inputs else None,
        "text_field": opts.text_field,
        "encoding_errors": opts.encoding_errors,
        "shard_tokens": opts.shard_tokens,
        "tokenizer": tok,
    }


def _sample_lines(units: Iterator[corpus.Unit], budget: int, text: TextOptions) -> Iterator[str]:
    seen = 0
    for unit in units:
        for split, kind, payload, _, origin in unit.parts:
            if split != "train":
                continue
            for line in part_text(kind, payload, origin, text).split("\n"):
                if seen >= budget:
                    return
                seen += len(line) + 1
                yield line


def _results(units: Iterator[corpus.Unit], tok_spec: tuple, text: TextOptions, workers: int):
    """Encoded units in unit order; at most 2 * workers + 2 are in flight (bounded memory)."""
    if workers == 1:
        init_worker(tok_spec, text)
        yield from map(encode_unit, units)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn: workers import only numpy and sentencepiece, and inherit no threads or locks.
    pool = ProcessPoolExecutor(
        workers, multiprocessing.get_context("spawn"), init_worker, (tok_spec, text)
    )
    try:
        window: deque = deque()
        for unit in units:
            window.append(pool.submit(encode_unit, unit))
            if len(window) >= 2 * workers + 2:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def prepare(opts: PrepareOptions) -> dict:
    """Prepare (or finish preparing) the dataset in `opts.out`; returns the manifest tree."""
    opts.validate()
    out = Path(opts.out)
    auto = "train" if opts.val_inputs else "auto"
    specs = [corpus.parse_input(x, auto) for x in opts.inputs or [corpus.STDLIB]]
    specs += [corpus.parse_input(x, "val") for x in opts.val_inputs]
    files = [corpus.list_files(s) for s in specs]
    request = _request(opts, specs, files)
    stats = [(f.key, f.size, os.stat(f.path).st_mtime_ns) for fs in files for f in fs]
    fingerprint = hashlib.sha256(canonical_json([request, stats])).hexdigest()

    out.mkdir(parents=True, exist_ok=True)
    if (out / MANIFEST_NAME).exists():
        done = parse_manifest((out / MANIFEST_NAME).read_bytes(), str(out))
        if done.source.get("request") != request:
            raise DataError(
                f"{out} already holds a dataset prepared from other inputs or options; "
                "choose another --out or delete it"
            )
        return json.loads((out / MANIFEST_NAME).read_bytes())
    for stale in out.glob("*.tmp"):
        stale.unlink()  # half-written shards of an interrupted run
    state = json.loads((out / STATE_NAME).read_bytes()) if (out / STATE_NAME).exists() else {}
    if state and state.get("fingerprint") != fingerprint:
        if not state.get("failed"):
            raise DataError(
                f"{out} holds an interrupted prepare of other inputs or options (or the input "
                "files changed since); rerun that command, or delete the directory"
            )
        _discard_failed(out, state)
        state = {}
    text = TextOptions(opts.text_field, opts.encoding_errors)
    val_fraction = opts.val_fraction

    def units() -> Iterator[corpus.Unit]:
        return corpus.iter_units(specs, files, val_fraction)

    tok = _tokenizer(opts, out, state, units, text)
    if not state:
        state = {"fingerprint": fingerprint, "tokenizer_sha256": tok.sha256, "splits": {}}
        write_atomic(out / STATE_NAME, canonical_json(state))
    writers = {
        s: SplitWriter(out, s, opts.shard_tokens, tok.eod_id, state["splits"].get(s, {}))
        for s in SPLITS
    }
    try:
        _run(opts, out, state, writers, tok, units(), text, specs, files)
        _check_splits(writers, opts)
    except Exception as e:  # an interrupted prepare (KeyboardInterrupt) stays resumable as is
        # A failed one is marked, so that the corrected command may start over in this --out.
        write_atomic(out / STATE_NAME, canonical_json({**state, "failed": str(e)[:500]}))
        raise

    dtype = token_dtype(tok.vocab_size)
    tree = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "vocab_size": tok.vocab_size,
        "eod_id": tok.eod_id,
        "dtype": dtype,
        "shard_tokens": opts.shard_tokens,
        "chunk_tokens": CHUNK_TOKENS,
        "tokenizer": tok.info(),
        "splits": {
            s: {
                "tokens": sum(x.tokens for x in w.shards),
                "documents": sum(x.documents for x in w.shards),
                "shards": [asdict(x) for x in w.shards],
            }
            for s, w in writers.items()
        },
        "source": {"request": request, "split_rule": "sha256(document name) < val_fraction"},
    }
    write_atomic(out / MANIFEST_NAME, manifest_bytes(tree))
    for leftover in [out / STATE_NAME, *out.glob("pending-*.npy")]:
        leftover.unlink()
    return tree


def _check_splits(writers: dict, opts: PrepareOptions) -> None:
    """Refuse a dataset without training tokens and warn about one without validation tokens
    (`switchall pretrain` needs both), naming the split and the fix."""
    docs = {s: sum(x.documents for x in w.shards) for s, w in writers.items()}
    if not writers["train"].shards:
        raise DataError(
            f"the training split is empty (all {docs['val']} documents went to validation); "
            "give more inputs, or a smaller --val-fraction"
        )
    if not writers["val"].shards:
        why = (
            "--val-fraction 0"
            if opts.val_fraction == 0
            else f"none of the {docs['train']} documents fell in the --val-fraction "
            f"{opts.val_fraction:g} of the hash split"
        )
        print(
            f"warning: the validation split is empty ({why}); `switchall pretrain` needs one: "
            "pass --val INPUT (held-out text) or a larger --val-fraction",
            file=sys.stderr,
        )


def _discard_failed(out: Path, state: dict) -> None:
    """Remove what a failed prepare into `out` left (its state, shards and pending tokens)."""
    print(
        f"note: {out} holds a failed prepare of other inputs or options ({state['failed']}); "
        "starting over",
        file=sys.stderr,
    )
    names = {s["name"] for split in state.get("splits", {}).values() for s in split["shards"]}
    for path in [*(out / n for n in names), *out.glob("pending-*.npy"), out / STATE_NAME]:
        path.unlink(missing_ok=True)


def _tokenizer(opts, out: Path, state: dict, units, text: TextOptions):
    if opts.tokenizer == "byte":
        return ByteTokenizer()
    if opts.tokenizer:
        model = Path(opts.tokenizer).read_bytes()
        tok = SentencePieceTokenizer(model, opts.tokenizer)
    elif state:  # resuming: the model trained by the interrupted run
        tok = SentencePieceTokenizer(
            (out / "tokenizer.model").read_bytes(), str(out), opts.model_type
        )
        if tok.sha256 != state["tokenizer_sha256"]:
            raise DataError(
                f"{out}/tokenizer.model changed since the interrupted run; delete {out}"
            )
        return tok
    else:
        start = time.perf_counter()
        budget = int(opts.tokenizer_sample_mb * 1e6)
        # Collected first, so that a bad input raises its own error here rather than from
        # inside sentencepiece's trainer (which would turn it into a RuntimeError).
        lines = list(_sample_lines(units(), budget, text))
        if not any(lines):
            raise DataError(
                "no training text to train the tokenizer on (is every document in val?)"
            )
        tok = train_sentencepiece(
            iter(lines), vocab_size=opts.vocab_size, model_type=opts.model_type
        )
        if opts.progress:
            print(
                f"trained a {opts.model_type} tokenizer ({tok.vocab_size} pieces) on "
                f"<= {opts.tokenizer_sample_mb:g} MB in {time.perf_counter() - start:.1f}s",
                file=sys.stderr,
            )
    write_atomic(out / "tokenizer.model", tok.model)
    return tok


def _run(opts, out, state, writers, tok, units, text, specs, files) -> None:
    from tqdm import tqdm

    start_unit = state.get("next_unit", 0)
    total = sum(
        sum(f.size for f in fs) * int(np.ceil(s.weight)) for s, fs in zip(specs, files, strict=True)
    )
    bar = tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc=f"tokenizing ({opts.workers} workers)",
        disable=not opts.progress,
        mininterval=0.5,
        smoothing=0.05,
    )
    t0, docs, text_bytes = time.perf_counter(), 0, 0

    def to_encode() -> Iterator[corpus.Unit]:
        for unit in units:
            if unit.index < start_unit:
                bar.update(unit.disk_bytes)  # tokenized by the interrupted run: read, not encoded
            else:
                yield unit

    tok_spec = ("byte",) if isinstance(tok, ByteTokenizer) else ("sp", tok.model, tok.model_type)
    try:
        for result in _results(to_encode(), tok_spec, text, opts.workers):
            wrote = [w.add(result.tokens[s]) for s, w in writers.items()]
            if any(wrote):
                save_state(out, state, writers, result.index + 1)
            docs += sum(result.documents.values())
            text_bytes += result.text_bytes
            elapsed = max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix_str(
                f"{docs / elapsed:,.0f} docs/s, {text_bytes / elapsed / 1e6:.1f} MB/s text",
                refresh=False,
            )
            bar.update(result.disk_bytes)
    finally:
        bar.close()
    for w in writers.values():
        w.finish()
