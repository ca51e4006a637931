"""The measurements of `benchmarks/gpu_acceptance.py`, one function per section item.

Each function measures one item (a kernel-test run, a CVMM problem, an attention pair, a
training config) and returns table rows (dicts). Nothing here touches CUDA unless the device
is CUDA, so `--smoke` runs every line of it on a CPU. The driver runs them in worker
processes (`gpu_acceptance.py --worker`) and renders the report.
"""

from __future__ import annotations

import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

# Dense bf16 tensor-core peaks (TFLOP/s, without sparsity), from the vendors' datasheets.
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,  # a bare "NVIDIA H100" name is the SXM part (80GB HBM3)
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
}
TRAIN_CONFIGS = [
    "configs/paper/c4_transformer_47m.yaml",
    "configs/paper/c4_switchhead_47m.yaml",
    "configs/paper/c4_switchall_47m.yaml",
    "configs/paper/c4_transformer_262m.yaml",
    "configs/paper/c4_switchhead_262m.yaml",
    "configs/paper/c4_switchall_259m.yaml",
]
# --smoke: one item of each kind, on a CPU, with models small enough for CI.
SMOKE_CVMM = ("switchhead_v_h4e4k2", "sigma_moe_w2_e32k4")
SMOKE_TRAIN = ["configs/paper/c4_switchall_47m.yaml", "configs/paper/c4_transformer_262m.yaml"]
SMOKE_MODEL = [
    "model.d_model=32",
    "model.n_layers=1",
    "model.seq_len=16",
    "model.mlp.d_ff=64",
    "model.attention.d_head=8",
    "model.moe.expert_size=16",
]


def peak_tflops(device_name: str) -> float | None:
    """The bf16 dense peak of a GPU by its name (longest matching key), None if unknown."""
    name = device_name.replace("NVIDIA", "").strip()
    hits = [
        k for k in PEAK_BF16_TFLOPS if k.replace(" ", "").lower() in name.replace(" ", "").lower()
    ]
    return PEAK_BF16_TFLOPS[max(hits, key=len)] if hits else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- kernel tests
_OUTCOME = re.compile(r"^(tests/\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)")


def kernel_tests(item: str, smoke: bool, budget_s: float) -> list[dict]:
    """pytest -v tests/kernels/test_cvmm_gpu.py in a child process, counted from its progress
    lines as they arrive, so that a run cut off by the budget still reports what it did."""
    cmd = [sys.executable, "-m", "pytest", "tests/kernels/test_cvmm_gpu.py", "-v", "-rfE",
           "-p", "no:cacheprovider"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # fmt: skip
    outcomes: dict[str, str] = {}

    def read() -> None:  # a thread, so that the deadline holds while pytest is silent
        for line in proc.stdout:
            m = _OUTCOME.match(line.strip())
            if m:
                outcomes[m.group(1)] = m.group(2)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=max(budget_s - 10, 10))
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        timed_out = True
    reader.join(timeout=5)
    counts = {k: sum(v == k for v in outcomes.values()) for k in ("PASSED", "FAILED", "SKIPPED")}
    failed = [n.split("::")[-1] for n, v in outcomes.items() if v in ("FAILED", "ERROR")]
    return [
        {
            "tests run": len(outcomes),
            "passed": counts["PASSED"],
            "failed": len(failed),
            "skipped": counts["SKIPPED"],
            "exit": "timed out" if timed_out else proc.returncode,
            "failures": ", ".join(failed) or "-",
        }
    ]


# ----------------------------------------------------------------------------- CVMM
def cvmm_problem(item: str, smoke: bool, budget_s: float) -> list[dict]:
    """One paper-shape problem: dense cuBLAS ceiling, Triton fast and deterministic, grouped_mm.

    `item` is "problem@tokens". bf16 on CUDA; the smoke run uses fp32 on the CPU backend.
    """
    sys.path.insert(0, str(Path(__file__).parent))
    import cvmm as bench

    name, tokens = item.split("@")
    problem = next(p for p in bench.SETS["262m"] if p.name == name)
    cuda = torch.cuda.is_available() and not smoke
    device = "cuda" if cuda else "cpu"
    impls = bench.implementations(device)
    keep = (
        ("cvmm_triton", "cvmm_triton_det", "grouped_mm") if cuda else ("cvmm_torch", "grouped_mm")
    )
    impls = {n: f for n, f in impls.items() if n in keep}
    dtype = torch.bfloat16 if cuda else torch.float32
    rows = bench.bench_problem(problem, int(tokens), dtype, device, 1 if smoke else 5, impls)
    return [
        {
            "problem": r["problem"],
            "tokens": r["tokens"],
            "impl": r["impl"],
            "fwd ms": round(r["fwd_ms"], 4),
            "fwd+bwd ms": round(r["all_ms"], 4),
            "fwd+bwd TFLOP/s": round(r["all_tflops"], 2),
            "fwd+bwd vs dense": f"{r['ratio']:.0%}",
        }
        for r in rows
    ]


# ----------------------------------------------------------------------------- attention
def attention_pair(item: str, smoke: bool, budget_s: float) -> list[dict]:
    """SwitchHead vs dense attention sub-layer of a 262M pair: time and peak memory."""
    sys.path.insert(0, str(Path(__file__).parent))
    import attention_layer as bench

    cuda = torch.cuda.is_available() and not smoke
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    batch, seq_len, iters = (8, 512, 20) if not smoke else (1, 8, 1)
    dense_cfg, moe_cfg = bench.PAIRS[item]
    torch.manual_seed(0)
    dense = bench.bench_layer(dense_cfg, batch, seq_len, device, dtype, iters)
    moe = bench.bench_layer(moe_cfg, batch, seq_len, device, dtype, iters)
    if not cuda:
        ms = bench.paired_cpu_ms({"d": dense["step"], "m": moe["step"]}, iters, time.perf_counter)
        dense["ms"], moe["ms"] = ms["d"], ms["m"]
    key = "peak" if cuda else "saved"
    rows = []
    for label, r in (("dense", dense), ("SwitchHead", moe)):
        rows.append(
            {
                "pair": item,
                "model": label,
                "batch x T": f"{batch} x {seq_len}",
                "ms fwd+bwd": round(r["ms"], 3),
                "peak MiB" if cuda else "saved for bwd MiB": round(r[key] / 2**20, 1),
                "time ratio": round(r["ms"] / dense["ms"], 3),
                "memory ratio": round(r[key] / dense[key], 3),
            }
        )
    return rows


# ----------------------------------------------------------------------------- training
def train_config(item: str, smoke: bool, budget_s: float) -> list[dict]:
    """The real `Trainer.train_step` of one config: step time, tokens/s, peak memory, MFU."""
    from switchall.analysis.accounting import train_flops_per_token
    from switchall.config import load_run_config
    from switchall.pretrain.runtime import LocalRuntime
    from switchall.pretrain.trainer import Trainer

    data = os.environ["ACCEPTANCE_DATA"]
    cuda = torch.cuda.is_available() and not smoke
    device = torch.device("cuda" if cuda else "cpu")
    overrides = [f"data.path={data}", "logging.wandb=disabled", "train.steps=1000"]
    smoke_cpu = ["train.precision=fp32", "train.batch_size=2", *SMOKE_MODEL]
    overrides += ["train.precision=bf16"] if cuda else smoke_cpu
    cfg = load_run_config(REPO / item, overrides)
    run_dir = Path(os.environ.get("ACCEPTANCE_TMP", "/tmp")) / f"run-{Path(item).stem}"
    trainer = Trainer(cfg, run_dir, LocalRuntime(device))
    batches = iter(trainer.loader)
    warmup, steps = (3, 6) if cuda else (1, 2)
    for _ in range(warmup):  # the first steps autotune the Triton kernels
        trainer.train_step(next(batches))
        trainer.step += 1
    _sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        trainer.train_step(next(batches))
        _sync(device)
        times.append(time.perf_counter() - start)
        trainer.step += 1
    step_time = statistics.median(times)
    tokens = cfg.train.batch_size * cfg.model.seq_len
    micro = cfg.train.batch_size // cfg.train.grad_accum
    flops = train_flops_per_token(cfg.model, micro) * tokens / step_time
    peak = peak_tflops(torch.cuda.get_device_name()) if cuda else None
    peak = float(os.environ.get("ACCEPTANCE_PEAK_TFLOPS") or 0) or peak
    return [
        {
            "config": Path(item).stem,
            "params": f"{sum(p.numel() for p in trainer.model.parameters()) / 1e6:.1f}M",
            "tokens/step": tokens,
            "step time (s)": round(step_time, 4),
            "tokens/s": round(tokens / step_time),
            "peak memory (GiB)": round(torch.cuda.max_memory_allocated() / 2**30, 2)
            if cuda
            else "n/a (CPU)",
            "TFLOP/s": round(flops / 1e12, 1),
            "MFU": f"{flops / (peak * 1e12):.1%}" if peak else "n/a (unknown peak)",
        }
    ]


SECTIONS = {
    "kernel_tests": kernel_tests,
    "cvmm": cvmm_problem,
    "attention": attention_pair,
    "train": train_config,
}
