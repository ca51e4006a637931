"""`switchall prepare`: tokenize a corpus into webdataset token shards (see `prepare`)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

EPILOG = """\
inputs:
  @stdlib            the embedded default: this Python's standard library sources (31 MB)
  PATH               a text file, a directory (all non-hidden files under it) or a glob;
                     *.jsonl / *.ndjson (optionally .gz or .zst) are JSON Lines, one document
                     per line, its text in --text-field
  INPUT:WEIGHT       sampling rate: 2 = every training document twice, 0.5 = half of them
                     (picked by a hash of the document name); validation documents once
examples:
  switchall prepare --out data/stdlib
  switchall prepare corpus/ web.jsonl.zst:0.5 @stdlib:2 --out data/mix --workers 8
  switchall prepare enwik8.train --val enwik8.valid --tokenizer byte --out data/enwik8
rerunning an interrupted command resumes it; rerunning a finished one does nothing.
"""


def default_workers() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def register(verbs) -> None:
    """Add the `prepare` verb to the `switchall` subparsers `verbs` (imports nothing heavy)."""
    p = verbs.add_parser(
        "prepare",
        help="tokenize a corpus into token shards",
        description="Tokenize a corpus into webdataset token shards plus manifest.json.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="default: @stdlib")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument(
        "--val",
        action="append",
        default=[],
        metavar="INPUT",
        help="an input that forms the validation split (repeatable; turns the hash split off)",
    )
    p.add_argument(
        "--val-fraction", type=float, default=0.05, metavar="F", help="hash split (default 0.05)"
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        metavar="FILE.model|byte",
        help="reuse a sentencepiece model, or 'byte' (vocabulary 256); default: train one",
    )
    p.add_argument("--vocab-size", type=int, default=8000, metavar="N", help="default 8000")
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    p.add_argument(
        "--tokenizer-sample-mb",
        type=float,
        default=16.0,
        metavar="MB",
        help="train the tokenizer on at most this much text (default 16)",
    )
    p.add_argument(
        "--text-field", default="text", metavar="NAME", help="JSON Lines field with the text"
    )
    p.add_argument(
        "--encoding-errors",
        choices=("strict", "replace"),
        default="strict",
        help="undecodable UTF-8 in text files: an error (default), or U+FFFD "
        "(the byte tokenizer takes file bytes as they are)",
    )
    p.add_argument(
        "--shard-tokens", type=int, default=1 << 22, metavar="N", help="tokens per shard (4Mi)"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=default_workers(),
        metavar="N",
        help="tokenizer processes (default: all CPUs)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_prepare)


def run_prepare(args: argparse.Namespace) -> int:
    from switchall.data_pipeline.manifest import DataError
    from switchall.data_pipeline.prepare import PrepareOptions, prepare

    opts = PrepareOptions(
        out=args.out,
        inputs=args.inputs,
        val_inputs=args.val,
        val_fraction=args.val_fraction,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        tokenizer_sample_mb=args.tokenizer_sample_mb,
        text_field=args.text_field,
        encoding_errors=args.encoding_errors,
        shard_tokens=args.shard_tokens,
        workers=args.workers,
        progress=not args.no_progress,
    )
    start = time.perf_counter()
    try:
        tree = prepare(opts)
    except DataError as e:
        print(f"switchall prepare: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"switchall prepare: interrupted; rerun the same command to resume into {args.out}",
            file=sys.stderr,
        )
        return 130
    splits = tree["splits"]
    print(
        f"{args.out}: "
        + ", ".join(
            f"{s} {v['tokens']:,} tokens / {v['documents']:,} documents / {len(v['shards'])} shards"
            for s, v in splits.items()
        )
        + f" (vocabulary {tree['vocab_size']}, {time.perf_counter() - start:.1f}s)"
    )
    return 0
