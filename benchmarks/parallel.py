"""Benchmark the distributed training step: data-parallel scaling and bytes moved per step.

    python benchmarks/parallel.py                      # CPU: DP=1 vs DP=2, EP=2 (2 processes)
    python benchmarks/parallel.py --gpu configs/paper/c4_switchall_47m.yaml --data data/c4

CPU mode trains the demo SwitchAll (d_model 128, 4 layers, T=64, byte vocabulary) on the
standard library's sources with the real trainer step (`Trainer.train_step`) at an equal
per-rank batch, one thread per process, so DP=2 ideally takes as long per step as DP=1
(weak scaling: efficiency = t(DP=1) / t(DP=2)). It also counts, per optimiser step:
- all-to-all bytes: what the σ-MoE dispatch / combine sent off-rank (`CommCounter`, forward and
  backward), against the expectation under uniform routing, 4 * X * K * (P-1)/P * D * 4 bytes
  per layer and rank (X tokens, K experts per token, P expert-parallel ranks, D width);
- gradient-reduction bytes: the payload of every DeepSpeed collective (its comms logger), against
  the parameter count: ZeRO-0 all-reduces each gradient (experts over their EDP group only),
  ZeRO-1/2 reduce each gradient to its owner and all-gather the updated parameters.

GPU mode times the single-GPU step (bf16 autocast) of the given configs and reports MFU with the
active-expert training FLOPs of `switchall count` (`train_flops_per_token`).

Workers are this script under torchrun (`--worker SPEC`): one launch runs several cases.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from switchall.launch.local import torchrun_command

REPO = Path(__file__).resolve().parents[1]
DEMO = [
    "model.vocab_size=256",
    "model.dropout=0.0",
    "train.log_every=1000",
    "train.eval_batches=1",
    "logging.wandb=disabled",
]
BARE = "bare gloo all-reduce"
CPU_CASES = [  # (name, processes, layout overrides)
    ("DP=1 (one process, no DeepSpeed)", 0, []),
    # Control: two unrelated one-process runs side by side, no communication at all. What the
    # machine itself gives two concurrent processes bounds what DP=2 can reach.
    ("2 x DP=1 side by side (control)", 2, ["independent"]),
    ("DP=1 (DeepSpeed ZeRO-0)", 1, ["parallel.zero_stage=0"]),
    ("DP=2 ZeRO-0", 2, ["parallel.zero_stage=0"]),
    ("DP=2 ZeRO-1", 2, ["parallel.zero_stage=1"]),
    ("DP=2 ZeRO-2", 2, ["parallel.zero_stage=2"]),
    ("EP=2 DP=2 ZeRO-1", 2, ["parallel.expert=2", "parallel.zero_stage=1"]),
    ("EP=2 DP=2 ZeRO-2", 2, ["parallel.expert=2", "parallel.zero_stage=2"]),
]


def prepare_data(out: Path) -> Path:
    if not (out / "manifest.json").is_file():
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        src = Path(tempfile.mkdtemp())
        for split, names in {
            "train": ["argparse.py", "typing.py", "inspect.py", "ast.py"],
            "val": ["bisect.py"],
        }.items():
            (src / split).mkdir()
            for name in names:
                shutil.copy(stdlib / name, src / split / name)
        cmd = [
            sys.executable,
            "-m",
            "switchall",
            "prepare",
            str(src / "train"),
            "--val",
            str(src / "val"),
            "--out",
            str(out),
            "--tokenizer",
            "byte",
        ]
        subprocess.run(cmd, check=True, capture_output=True)
    return out


# ----------------------------------------------------------------------------- worker side
def _layer_bytes(model) -> int:
    from switchall.parallel.expert_parallel import ParallelSigmaMoE

    return sum(m.comm.bytes_sent for m in model.modules() if isinstance(m, ParallelSigmaMoE))


def _param_counts(model) -> dict[str, int]:
    from switchall.parallel.sharded_state import is_expert_param

    expert = sum(p.numel() for p in model.parameters() if is_expert_param(p))
    return {"dense": sum(p.numel() for p in model.parameters()) - expert, "expert": expert}


def time_bare_allreduce(case: dict) -> dict:
    """One gloo all-reduce of `numel` fp32 values, nothing else running: what the gradient
    reduction costs this machine by itself (median seconds, wall and this rank's CPU)."""
    import torch
    import torch.distributed as dist

    grads = torch.ones(case["allreduce_numel"])
    times, cpu_times = [], []
    for i in range(case["warmup"] + case["steps"]):
        dist.barrier()
        start, cpu_start = time.perf_counter(), time.process_time()
        dist.all_reduce(grads)
        if i >= case["warmup"]:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    return {"step_time": statistics.median(times), "cpu_time": statistics.median(cpu_times)}


def run_worker_case(case: dict) -> dict:
    import torch
    import torch.distributed as dist

    if "allreduce_numel" in case:
        return time_bare_allreduce(case)
    from switchall.config import load_run_config
    from switchall.pretrain.runtime import LocalRuntime
    from switchall.pretrain.trainer import Trainer

    independent = "independent" in case["overrides"]
    cfg = load_run_config(case["config"], [o for o in case["overrides"] if o != "independent"])
    if independent:
        cfg.train.batch_size //= dist.get_world_size()
    distributed = dist.is_initialized() and not independent
    if distributed:
        from switchall.parallel.runtime import DistributedRuntime

        runtime = DistributedRuntime(cfg)
    else:
        runtime = LocalRuntime(torch.device(case.get("device", "cpu")))
    sync = dist.barrier if distributed else (lambda: None)
    if runtime.device.type == "cuda":
        sync = torch.cuda.synchronize
    try:
        run_dir = Path(case["run_dir"]) / (f"r{dist.get_rank()}" if independent else "")
        trainer = Trainer(cfg, run_dir, runtime)
        batches = iter(trainer.loader)
        for step in range(case["warmup"]):
            trainer.step = step
            trainer.train_step(next(batches))
        times, cpu_times = [], []
        with _collective_profile(case.get("profile") and distributed) as collectives:
            for step in range(case["warmup"], case["warmup"] + case["steps"]):
                sync()
                start, cpu_start = time.perf_counter(), time.process_time()
                trainer.step = step
                trainer.train_step(next(batches))
                cpu_times.append(time.process_time() - cpu_start)
                sync()
                times.append(time.perf_counter() - start)
        # CPU time: the work of the step on this rank, without the time spent blocked waiting
        # for the other rank or for the core (load on a shared machine).
        result = {"step_time": statistics.median(times), "times": times,
                  "cpu_time": statistics.median(cpu_times)}  # fmt: skip
        if collectives:
            result["collectives"] = {
                k: v / case["steps"] for k, v in collectives.items()
            }  # per step, this rank
        if distributed:
            result.update(_count_bytes(trainer, runtime, batches, case["warmup"] + case["steps"]))
        return result
    finally:
        if distributed:
            runtime.shutdown()


class _collective_profile:
    """torch.profiler around the timed steps: how many gloo collectives a step runs and how
    long this rank spends inside them (their own work plus waiting for the other rank)."""

    def __init__(self, enabled: bool):
        self.enabled, self.out = enabled, {}

    def __enter__(self) -> dict:
        if self.enabled:
            from torch.profiler import ProfilerActivity, profile

            self.prof = profile(activities=[ProfilerActivity.CPU])
            self.prof.__enter__()
        return self.out

    def __exit__(self, *exc) -> None:
        if not self.enabled:
            return
        self.prof.__exit__(*exc)
        for e in self.prof.key_averages():
            if e.key.startswith("gloo:"):
                self.out[f"{e.key} calls"] = e.count
                self.out[f"{e.key} ms"] = e.cpu_time_total / 1e3


def _count_bytes(trainer, runtime, batches, step: int) -> dict:
    """One more step with DeepSpeed's comms logger on: bytes per collective kind."""
    import deepspeed.comm as ds_comm
    import torch
    import torch.distributed as dist

    model = runtime.parallel_model
    ds_comm.configure(enabled=True, prof_all=True, verbose=False)
    ds_comm.comms_logger.reset_data()
    a2a_before = _layer_bytes(model)
    trainer.step = step
    trainer.train_step(next(batches))
    ds_comm.configure(enabled=False)
    payload: dict[str, int] = {}
    for op, sizes in ds_comm.comms_logger.comms_dict.items():
        name = op.split("|")[0].strip()
        payload[name] = payload.get(name, 0) + sum(size * v[0] for size, v in sizes.items())
    a2a = torch.tensor([_layer_bytes(model) - a2a_before], dtype=torch.float64)
    dist.all_reduce(a2a)
    return {
        "a2a_bytes_all_ranks": int(a2a.item()),
        "collective_payload_bytes_rank0": payload,
        "params": _param_counts(model),
        "layout": runtime.layout_name,
    }


def worker(spec_path: str) -> None:
    import torch.distributed as dist

    spec = json.loads(Path(spec_path).read_text())
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
    results = {case["name"]: run_worker_case(case) for case in spec["cases"]}
    if not dist.is_initialized() or dist.get_rank() == 0:
        Path(spec["out"]).write_text(json.dumps(results))
    if dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- driver side
def _launch(nproc: int, cases: list[dict], work: Path) -> dict:
    spec, out = work / f"spec{nproc}.json", work / f"out{nproc}.json"
    spec.write_text(json.dumps({"cases": cases, "out": str(out)}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, __file__, "--worker", str(spec)]
    if nproc:
        cmd = torchrun_command(nproc, cmd[1:])
    subprocess.run(cmd, check=True, cwd=REPO, env=env, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def _expected_a2a(cfg_overrides: list[str], nproc: int, per_rank_batch: int) -> float:
    from switchall.config import load_run_config

    cfg = load_run_config(REPO / "configs/demo_switchall.yaml", cfg_overrides)
    m, p = cfg.model, cfg.parallel.expert
    tokens = per_rank_batch * m.seq_len
    per_layer_rank = 4 * tokens * m.moe.k * (p - 1) / p * m.d_model * 4
    return per_layer_rank * m.n_layers * nproc


def cpu(args) -> None:
    data = prepare_data(Path(args.data))
    work = Path(tempfile.mkdtemp())
    base = [*DEMO, f"data.path={data}", f"train.steps={args.warmup + args.steps + 1}"]
    by_nproc: dict[int, list] = {}
    for name, nproc, layout in CPU_CASES:
        batch = args.per_rank_batch * max(nproc, 1)
        by_nproc.setdefault(nproc, []).append(
            {
                "name": name,
                "config": str(REPO / "configs/demo_switchall.yaml"),
                "overrides": [*base, f"train.batch_size={batch}", *layout],
                "run_dir": str(work / f"run{len(by_nproc.get(nproc, []))}_{nproc}"),
                "warmup": args.warmup,
                "steps": args.steps,
                "profile": args.profile,
            }
        )
    # The dense demo SwitchAll's gradient (byte vocabulary: 924,160 fp32 values) reduced alone.
    bare = {"name": BARE, "allreduce_numel": 924_160, "warmup": args.warmup, "steps": args.steps}
    by_nproc[2].append(bare)
    results = {}
    for nproc, cases in by_nproc.items():
        results.update(_launch(nproc, cases, work))
    t1 = results[CPU_CASES[0][0]]["step_time"]
    print(f"per-rank batch {args.per_rank_batch} x {64} tokens, median of {args.steps} steps\n")
    c1 = results[CPU_CASES[0][0]]["cpu_time"]
    print(
        "| layout | processes | step time (s) | weak-scaling efficiency vs DP=1 | "
        "CPU s/step (rank 0) | CPU time vs DP=1 |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, nproc, _ in CPU_CASES:
        t, c = results[name]["step_time"], results[name]["cpu_time"]
        print(f"| {name} | {max(nproc, 1)} | {t:.3f} | {t1 / t:.0%} | {c:.3f} | {c / c1:.2f} |")
    print(
        "\n| layout | all-to-all bytes/step (all ranks) | uniform-routing estimate | "
        "DeepSpeed collective payload bytes/step (rank 0) | params dense / expert (rank 0) |"
    )
    print("|---|---:|---:|---|---|")
    for name, nproc, layout in CPU_CASES:
        r = results[name]
        if "params" not in r:
            continue
        expert = any("expert=2" in o for o in layout)
        est = _expected_a2a(layout, nproc, args.per_rank_batch) if expert else 0
        payload = ", ".join(
            f"{k} {v:,}" for k, v in sorted(r["collective_payload_bytes_rank0"].items())
        )
        print(
            f"| {name} | {r['a2a_bytes_all_ranks']:,} | {est:,.0f} | {payload} | "
            f"{r['params']['dense']:,} / {r['params']['expert']:,} |"
        )
    if args.profile:
        print("\n| layout | gloo collectives / step (rank 0) | ms in them / step (rank 0) |")
        print("|---|---:|---:|")
        for name, _, _ in CPU_CASES:
            c = results[name].get("collectives")
            if c:
                calls = sum(v for k, v in c.items() if k.endswith("calls"))
                ms = sum(v for k, v in c.items() if k.endswith(" ms"))
                print(f"| {name} | {calls:.0f} | {ms:.1f} |")
    b = results[BARE]
    print(
        f"\ngloo all-reduce of the 924,160-value gradient alone, 2 processes: "
        f"{b['step_time'] * 1e3:.1f} ms wall, {b['cpu_time'] * 1e3:.1f} ms CPU (rank 0); "
        f"DP=1 step + that = {t1 + b['step_time']:.3f} s, "
        f"efficiency without overlap at most {t1 / (t1 + b['step_time']):.0%}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def gpu(args) -> None:
    import torch

    from switchall.analysis.accounting import train_flops_per_token
    from switchall.config import load_run_config

    work = Path(tempfile.mkdtemp())
    cases = [
        {
            "name": c,
            "config": c,
            "device": "cuda",
            "warmup": args.warmup,
            "steps": args.steps,
            "run_dir": str(work / Path(c).stem),
            "overrides": [
                f"data.path={args.data}",
                "logging.wandb=disabled",
                "train.eval_batches=1",
                "train.precision=bf16",
            ],
        }
        for c in args.gpu
    ]
    results = _launch(0, cases, work)
    name = torch.cuda.get_device_name()
    print(f"| config | GPU | step time (s) | tokens/s | MFU (peak {args.peak_tflops} TFLOP/s) |")
    print("|---|---|---:|---:|---:|")
    for c in args.gpu:
        cfg = load_run_config(c)
        micro = cfg.train.batch_size // cfg.train.grad_accum
        tokens = cfg.train.batch_size * cfg.model.seq_len
        t = results[c]["step_time"]
        mfu = train_flops_per_token(cfg.model, micro) * tokens / t / (args.peak_tflops * 1e12)
        print(f"| {c} | {name} | {t:.3f} | {tokens / t:,.0f} | {mfu:.1%} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--data", default=str(REPO / "data/bench_parallel"), help="dataset directory")
    p.add_argument("--per-rank-batch", type=int, default=8, help="sequences per rank (CPU)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--json", help="also write the raw results here")
    p.add_argument("--profile", action="store_true", help="count and time gloo collectives")
    p.add_argument("--gpu", nargs="*", help="configs to time on one GPU (needs --data)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak (H100 SXM)")
    args = p.parse_args()
    if args.worker:
        worker(args.worker)
    elif args.gpu:
        gpu(args)
    else:
        cpu(args)


if __name__ == "__main__":
    main()
