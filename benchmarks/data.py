"""Benchmark the data pipeline on the embedded corpus (this Python's standard library sources).

    python benchmarks/data.py                 # everything, about 2-3 minutes on 2 cores
    python benchmarks/data.py --work /tmp/x   # keep the prepared datasets there

Measures, and prints as a markdown section for BENCHMARKS.md:
- `prepare`: the full default run (train a BPE-8000 tokenizer on the bounded sample, tokenize
  everything, write shards) with all CPUs; tokenization alone (reusing that tokenizer) in MB/s of
  text with 1 and 2 workers; and the byte tokenizer.
- loader throughput, in training tokens (rows x seq_len) per second, for one process
  (num_workers=0: batch assembly in the training process itself) from a cold start over a
  whole epoch, so shard fetching and sha256 verification are included; from local shards and
  from a `python -m http.server` on 127.0.0.1; plus num_workers=2 as seen by the consumer.
- resume: time from building a loader and loading a state to holding the next batch, at
  increasingly deep positions (target: flat), next to reading through to the middle of epoch 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from switchall.data_pipeline import TokenLoader, read_manifest
from switchall.launch.local import free_port


def timed_prepare(out: Path, *flags: str, repeat: int = 1) -> tuple[float, dict]:
    """Best wall time of `switchall prepare --out OUT FLAGS` in a fresh interpreter, as users
    run it (worker processes are spawned, so running it in this process would time their
    imports of this script's torch as well)."""
    best = float("inf")
    for _ in range(repeat):
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        cmd = [sys.executable, "-m", "switchall", "prepare", "--out", str(out), "--no-progress"]
        subprocess.run([*cmd, *flags], check=True, stdout=subprocess.DEVNULL)
        best = min(best, time.perf_counter() - start)
    return best, json.loads((out / "manifest.json").read_text())


def stdlib_text_bytes() -> int:
    from switchall.data_pipeline import corpus

    return sum(f.size for f in corpus.list_files(corpus.InputSpec(corpus.STDLIB)))


def loader_rate(
    location: str, mode: str, gbs: int, seq_len: int, workers: int = 0, repeat: int = 1
) -> float:
    """Training tokens per second over one cold epoch (capped at 2000 batches); best of `repeat`
    runs, each with a new loader (so shards are fetched and verified again)."""
    best = 0.0
    for _ in range(repeat):
        loader = TokenLoader(
            location,
            global_batch_size=gbs,
            seq_len=seq_len,
            mode=mode,
            loop=False,
            num_workers=workers,
        )
        n = min(loader.batches_per_epoch, 2000)
        start = time.perf_counter()
        for i, _ in enumerate(loader):
            if i + 1 == n:
                break
        best = max(best, n * gbs * seq_len / (time.perf_counter() - start))
    return best


def resume_seconds(location: str, mode: str, batches: int, gbs: int, seq_len: int) -> float:
    start = time.perf_counter()
    loader = TokenLoader(location, global_batch_size=gbs, seq_len=seq_len, mode=mode)
    loader.load_state_dict({**loader.state_dict(), "batches": batches})
    next(iter(loader))
    return time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work", type=Path, default=None, help="where to put the datasets")
    p.add_argument("--repeat", type=int, default=2, help="best of N runs (shared machines)")
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="switchall-data-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    cpus = len(os.sched_getaffinity(0))
    text_mb = stdlib_text_bytes() / 1e6
    rows: list[str] = []

    # ---- prepare
    load_before = os.getloadavg()[0]
    full_s, tree = timed_prepare(work / "bpe", "--workers", str(cpus), repeat=args.repeat)
    tokens = tree["splits"]["train"]["tokens"] + tree["splits"]["val"]["tokens"]
    rows.append(
        f"| full default `prepare` ({cpus} workers: train BPE 8000 + tokenize) | "
        f"{full_s:.1f} s | {text_mb / full_s:.1f} MB/s | {tokens / 1e6:.1f}M tokens |"
    )
    model = str(work / "bpe" / "tokenizer.model")
    for w in (1, 2):
        s, _ = timed_prepare(
            work / f"reuse{w}", "--workers", str(w), "--tokenizer", model, repeat=args.repeat
        )
        rows.append(
            f"| tokenize only (reused tokenizer), {w} worker(s) | {s:.1f} s | "
            f"{text_mb / s:.1f} MB/s | |"
        )
    s, tree = timed_prepare(
        work / "bytes",
        "--workers",
        str(cpus),
        "--tokenizer",
        "byte",
        "--shard-tokens",
        "1048576",
        repeat=args.repeat,
    )
    rows.append(
        f"| byte tokenizer, {cpus} workers, 1M-token shards | {s:.1f} s | "
        f"{text_mb / s:.1f} MB/s | {len(tree['splits']['train']['shards'])} train shards |"
    )

    # ---- loader
    lrows: list[str] = []
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "http.server",
            str(port),
            "--bind",
            "127.0.0.1",
            "--directory",
            str(work),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(1.0)
        for ds in ("bpe", "bytes"):
            for mode in ("shuffled", "contiguous"):
                for gbs, seq_len in ((64, 256), (16, 1024)):
                    local = loader_rate(str(work / ds), mode, gbs, seq_len, repeat=args.repeat)
                    url = f"http://127.0.0.1:{port}/{ds}"
                    http = loader_rate(url, mode, gbs, seq_len, repeat=args.repeat)
                    lrows.append(
                        f"| {ds} | {mode} | {gbs} x {seq_len} | {local / 1e6:.1f} | "
                        f"{http / 1e6:.1f} |"
                    )
        two = loader_rate(str(work / "bpe"), "shuffled", 64, 256, workers=2, repeat=args.repeat)
    finally:
        server.terminate()
        server.wait(timeout=10)

    # ---- resume
    byte_ds = str(work / "bytes")
    rrows = []
    for mode in ("shuffled", "contiguous"):
        bpe = TokenLoader(byte_ds, global_batch_size=64, seq_len=256, mode=mode).batches_per_epoch
        for label, pos in [
            ("start", 0),
            ("epoch 0, 50%", bpe // 2),
            ("epoch 10, 99%", 11 * bpe - 2),
            ("epoch 1000, 50%", 1000 * bpe + bpe // 2),
        ]:
            ms = 1000 * min(resume_seconds(byte_ds, mode, pos, 64, 256) for _ in range(3))
            rrows.append(f"| {mode} | {label} (batch {pos:,}) | {ms:.0f} ms |")
        start = time.perf_counter()
        loader = TokenLoader(byte_ds, global_batch_size=64, seq_len=256, mode=mode)
        for i, _ in enumerate(loader):
            if i == 2 * bpe:
                break
        through = time.perf_counter() - start
        rrows.append(f"| {mode} | reading through to epoch 2 instead | {1000 * through:.0f} ms |")

    load_after = os.getloadavg()[0]
    m = read_manifest(work / "bpe")
    print(f"## Data pipeline (CPU, {time.strftime('%Y-%m-%d')})\n")
    print(
        f"Machine: {platform.processor() or platform.machine()}, {cpus} CPU cores, Python "
        f"{platform.python_version()}, torch {torch.__version__}, numpy "
        f"{__import__('numpy').__version__}, sentencepiece "
        f"{__import__('sentencepiece').__version__}, webdataset "
        f"{__import__('webdataset').__version__}. Corpus: the embedded default "
        f"({text_mb:.1f} MB of Python sources); BPE vocabulary {m.vocab_size}. Best of "
        f"{args.repeat} runs. 1-minute load average {load_before:.1f} before, {load_after:.1f} "
        "after (above ~1, other jobs were sharing the 2 cores).\n"
    )
    print(
        "### `switchall prepare`\n\n| run | time | text throughput | output |\n|---|---:|---:|---|"
    )
    print("\n".join(rows))
    print("\n### Loader throughput (one process, cold epoch, M training tokens/s)\n")
    print(
        "| dataset | mode | batch x seq_len | local | HTTP (127.0.0.1) |\n|---|---|---|---:|---:|"
    )
    print("\n".join(lrows))
    print(
        f"\nWith num_workers=2 (bpe, shuffled, 64 x 256) the consumer receives "
        f"{two / 1e6:.1f}M tokens/s.\n"
    )
    print("### Resume (build loader + load state + first batch; best of 3)\n")
    print("| mode | position | time |\n|---|---|---:|")
    print("\n".join(rrows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
