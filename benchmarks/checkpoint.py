"""Benchmark layout-free checkpoints: save and load time and memory per rank, resharding too.

    python benchmarks/checkpoint.py                   # 259M SwitchAll and 262M Transformer, CPU
    python benchmarks/checkpoint.py --models transformer --threads 1
    python benchmarks/checkpoint.py --device cuda        # one GPU per rank (NCCL)

For each model, three launches (1, 2 and 4 ranks; one thread per process, gloo, fp32) each
build the real `Trainer` under their layout, give it AdamW state (zeros of the right shapes:
a CPU training step of these models would take minutes, and the values do not change what is
written), save a checkpoint, load it back (same layout), and load the previous launch's
checkpoint (another layout: 1 -> 2 -> 4 ranks), then a last one-rank launch loads the 4-rank
checkpoint. Per rank it records the wall time, the bytes written and read, and the peak
resident memory *above* the rank's memory before the operation (sampled from /proc every
2 ms), next to the rank's own state (weights and moments it holds). XL memory is not included
(it exists after a training step; under the paper's batch it adds lanes x 512 x 1024 floats per
layer, sharded over data-parallel ranks like the rest).

Layouts: SwitchAll 1 process; EP=2 ZeRO-2; TP=2 x EP=2 ZeRO-1. Transformer 1 process;
DP=2 ZeRO-1; DP=4 ZeRO-3. Results are printed as a Markdown table (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.parallel import prepare_data  # noqa: E402
from switchall.launch.local import torchrun_command  # noqa: E402

MODELS = {
    "switchall": (
        "configs/paper/c4_switchall_259m.yaml",
        [
            [],
            ["parallel.expert=2", "parallel.zero_stage=2"],
            ["parallel.tensor=2", "parallel.expert=2", "parallel.zero_stage=1"],
        ],
    ),
    "transformer": (
        "configs/paper/c4_transformer_262m.yaml",
        [[], ["parallel.zero_stage=1"], ["parallel.zero_stage=3"]],
    ),
}
COMMON = [
    "train.batch_size=4",
    "train.grad_accum=1",
    "train.precision=fp32",
    "train.eval_batches=1",
    "logging.wandb=disabled",
]


class PeakRSS:
    """Peak resident set size while the block runs, sampled every 2 ms."""

    def __enter__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def extra(self) -> int:
        return self.peak - self.base


def _timed(fn, barrier):
    import gc

    gc.collect()
    barrier()
    with PeakRSS() as rss:
        start = time.perf_counter()
        out = fn()
        barrier()
        seconds = time.perf_counter() - start
    return out, seconds, rss.extra


def worker(spec_path: str) -> None:
    import torch

    from switchall.checkpoint import training_state
    from switchall.config import load_run_config
    from switchall.pretrain.checkpoint import CheckpointManager
    from switchall.pretrain.trainer import Trainer

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    distributed = "WORLD_SIZE" in os.environ
    cfg = load_run_config(spec["config"], spec["overrides"])
    if distributed:
        from switchall.parallel.runtime import DistributedRuntime

        runtime = DistributedRuntime(cfg)
    else:
        from switchall.pretrain.runtime import LocalRuntime, resolve_device

        runtime = LocalRuntime(resolve_device(cfg.train.device))
    barrier = runtime.barrier
    trainer = Trainer(cfg, spec["run_dir"], runtime)
    entries = trainer.engine.checkpoint_entries(optimizer=True, for_load=True)  # AdamW state
    own = sum(b.tensor.numel() * b.tensor.element_size() for g in entries.values() for b in g.boxes)
    result = {"rank": runtime.rank, "layout": runtime.layout_record()["name"], "own_bytes": own}
    if spec.get("save"):
        path, result["save_s"], result["save_extra"] = _timed(trainer.save, barrier)
        result["written"] = sum(p.stat().st_size for p in path.glob(f"__{runtime.rank}_*"))
        result["checkpoint"] = str(path)
    for label, src in spec.get("loads", {}).items():
        src = Path(src) if src else Path(result["checkpoint"])
        meta = CheckpointManager.read_meta(src)
        load = lambda s=src, m=meta: training_state.restore(trainer, s, m)  # noqa: E731
        loaded, seconds, extra = _timed(load, barrier)
        result[label] = {"s": seconds, "extra": extra, "read": loaded["bytes_read"]}
    results = runtime.all_gather_object(result)
    if runtime.rank == 0:
        Path(spec["out"]).write_text(json.dumps(results))
    runtime.shutdown()


def launch(nproc: int, spec: dict, work: Path) -> list[dict]:
    spec_path = work / f"spec-{time.monotonic_ns()}.json"
    spec["out"] = str(spec_path.with_suffix(".out.json"))
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, __file__, "--worker", str(spec_path)]
    if nproc > 1:
        cmd = torchrun_command(nproc, cmd[1:])
    subprocess.run(cmd, check=True, cwd=REPO, env=env, stdout=subprocess.DEVNULL)
    return json.loads(Path(spec["out"]).read_text())


def run_model(name: str, data: Path, work: Path, threads: int, device: str) -> list[tuple]:
    config, layouts = MODELS[name]
    common = [*COMMON, f"train.device={device}", f"data.path={data}"]
    rows, previous = [], None
    for nproc, layout in zip((1, 2, 4), layouts, strict=True):
        loads = {"load (same layout)": None}
        if previous:
            loads[f"load ({previous[0]} ranks -> {nproc})"] = previous[1]
        spec = {
            "config": config,
            "overrides": [*common, *layout],
            "run_dir": str(work / f"{name}-{nproc}"),
            "save": True,
            "loads": loads,
            "threads": threads,
        }
        results = launch(nproc, spec, work)
        rows += [(name, nproc, r) for r in results]
        if previous:
            shutil.rmtree(Path(previous[1]).parent.parent)
        previous = (nproc, results[0]["checkpoint"])
    spec = {
        "config": config,
        "overrides": common,
        "run_dir": str(work / f"{name}-1b"),
        "loads": {"load (4 ranks -> 1)": previous[1]},
        "threads": threads,
    }
    rows += [(name, 1, r) for r in launch(1, spec, work)]
    shutil.rmtree(Path(previous[1]).parent.parent)
    return rows


def table(rows: list[tuple]) -> str:
    """One line per launch and operation; per-rank figures are the largest over the ranks."""
    mib = 2**20
    ops: dict[tuple, list] = {}
    for name, nproc, r in rows:
        for label, v in r.items():
            if label == "save_s":
                v = {"s": r["save_s"], "bytes": r["written"], "extra": r["save_extra"]}
                label = "save"
            elif not (isinstance(v, dict) and "read" in v):
                continue
            else:
                v = {"s": v["s"], "bytes": v["read"], "extra": v["extra"]}
            key = (name, nproc, r["layout"], label)
            ops.setdefault(key, []).append((r["own_bytes"], v))
    lines = [
        "| model | ranks | layout | operation | s | MiB written / read per rank | own state "
        "MiB per rank | peak RSS above start, MiB per rank |",
        "|---|---:|---|---|---:|---:|---:|---:|",
    ]
    for (name, nproc, layout, label), per_rank in ops.items():
        own = max(o for o, _ in per_rank) / mib
        s_max = max(v["s"] for _, v in per_rank)
        moved = max(v["bytes"] for _, v in per_rank) / mib
        extra = max(v["extra"] for _, v in per_rank) / mib
        lines.append(
            f"| {name} | {nproc} | {layout} | {label} | {s_max:.1f} | {moved:,.0f} | {own:,.0f} "
            f"| {extra:,.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--device", default="cpu", help="train.device of every rank (cpu or cuda)")
    p.add_argument("--work", help="scratch directory (default: a temporary one)")
    p.add_argument("--json", help="also write every rank's figures to this file")
    args = p.parse_args()
    if args.worker:
        worker(args.worker)
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="ckpt-bench-"))
    data = prepare_data(work / "data")
    rows = []
    for name in args.models:
        rows += run_model(name, data, work, args.threads, args.device)
        print(table(rows), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
