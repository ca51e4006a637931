"""Helpers for the data-pipeline tests: synthetic corpora, datasets made from them, and a
loopback HTTP server (optionally one that drops connections mid-shard)."""

from __future__ import annotations

import random
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import torch

from switchall.data_pipeline import read_manifest
from switchall.data_pipeline.prepare import PrepareOptions, prepare
from switchall.data_pipeline.shards import load_shard

WORDS = (
    "the of and to in is that for it as with was on be by this are or from at which but not "
    "expert router head attention memory token shard lane window epoch seed batch rank worker "
    "naïve café über 東京 数据 λ→μ 123 4567 89"
).split()


def synthetic_text(seed: int, n_words: int) -> str:
    """Deterministic pseudo-prose with newlines, indentation, digits and non-ASCII letters."""
    rng = random.Random(seed)
    lines, line = [], []
    for _ in range(n_words):
        line.append(rng.choice(WORDS))
        if rng.random() < 0.08:
            lines.append(" " * rng.choice((0, 0, 4, 8)) + " ".join(line))
            line = []
    lines.append(" ".join(line))
    return "\n".join(lines) + "\n"


def write_corpus(root: Path, n_files: int, words: int = 400, seed: int = 0) -> Path:
    """`n_files` text files in nested folders under `root`."""
    for i in range(n_files):
        path = root / f"d{i % 3}" / f"doc{i:03d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(synthetic_text(seed * 1000 + i, words + 37 * (i % 5)))
    return root


def make_dataset(out: Path, inputs: list[str], **kw) -> Path:
    kw.setdefault("tokenizer", "byte")
    kw.setdefault("shard_tokens", 4096)
    kw.setdefault("workers", 1)
    kw.setdefault("progress", False)
    prepare(PrepareOptions(out=out, inputs=inputs, **kw))
    return out


def global_stream(loaders, n: int) -> list[torch.Tensor]:
    """The first `n` global batches: each rank's batches concatenated in rank order."""
    iters = [iter(loader) for loader in loaders]
    return [torch.cat([next(it) for it in iters]) for _ in range(n)]


class _QuietHandler(SimpleHTTPRequestHandler):
    """Serves files; records every GET that reaches it (path, time) and answers 503 to the
    paths in `failing`. Both are class attributes that `Server` resets."""

    requests: list[tuple[str, float]] = []
    failing: frozenset[str] = frozenset()

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.requests.append((self.path, time.monotonic()))
        if self.path in self.failing:
            self.send_error(503)
            return
        super().do_GET()


class _DroppingHandler(_QuietHandler):
    """Sends half of each shard the first time it is asked for, then cuts the connection."""

    dropped: set[str] = set()

    def fails_now(self) -> bool:
        return self.path not in self.dropped

    def after_half(self) -> None:
        self.close_connection = True
        self.connection.shutdown(2)

    def do_GET(self) -> None:
        if not self.path.endswith(".tar") or not self.fails_now():
            return super().do_GET()
        self.dropped.add(self.path)
        data = Path(self.translate_path(self.path)).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        self.after_half()


class _StallingHandler(_DroppingHandler):
    """Sends half of the first shard asked for, then stops sending and holds the connection
    open (a hung server); curl's low-speed check needs about 7 s to notice with a 1 s limit."""

    stall_seconds = 20.0

    def fails_now(self) -> bool:
        return not self.dropped

    def after_half(self) -> None:
        time.sleep(self.stall_seconds)
        self.close_connection = True


class Server:
    """An HTTP server on 127.0.0.1 serving `root`, in a thread; use as a context manager.
    `dropping`: each shard's first request is cut off half way; `stalling`: the first request
    for a shard hangs half way; `failing`: URL paths always answered with 503. `requests`
    lists (path, time.monotonic()) of every GET the server saw."""

    def __init__(
        self, root: Path, dropping: bool = False, stalling: bool = False, failing=frozenset()
    ):
        handler = _StallingHandler if stalling else _DroppingHandler if dropping else _QuietHandler
        _DroppingHandler.dropped = set()
        _QuietHandler.requests = self.requests = []
        _QuietHandler.failing = frozenset(failing)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


def split_tokens(ds, split: str) -> np.ndarray:
    """All tokens of a split, shards in manifest order (each shard verified)."""
    m = read_manifest(ds)
    shards = m.shards(split)
    if not shards:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([load_shard(m.url(s.name), s, m.dtype) for s in shards])


def documents(ds, split: str) -> list[list[int]]:
    """The documents of a split as token lists (cut at the end-of-document token)."""
    eod = read_manifest(ds).eod_id
    tokens = split_tokens(ds, split).tolist()
    docs, current = [], []
    for t in tokens:
        if t == eod:
            docs.append(current)
            current = []
        else:
            current.append(t)
    assert not current, "a split must end with an end-of-document token"
    return docs


def tree_bytes(root) -> dict[str, bytes]:
    """Every file of a dataset directory by name (to compare two preparations byte for byte)."""
    return {p.name: p.read_bytes() for p in sorted(Path(root).iterdir())}
