"""Incremental decoding (KV cache over the XL window) vs re-running the chunked forward.

Per new token: `DecodeState.extend` of one token, against the chunked training forward over the
whole sequence so far (what a cache-free sampler does). Both are timed interleaved, token by
token, so machine load affects them alike; the figure is the median per-token time over the
new tokens. Random weights (the cost does not depend on them), fp32, batch 1.

    .venv/bin/python benchmarks/decode.py                      # demo configs, CPU
    .venv/bin/python benchmarks/decode.py --prompt 448 --new 64 --device cuda
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from switchall.config import load_run_config
from switchall.models import build_model
from switchall.models.decode import DecodeState

CONFIGS = ["configs/demo_switchall.yaml", "configs/demo_transformer.yaml"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def full_forward(model, tokens_1N: torch.Tensor) -> torch.Tensor:
    t, memory, last = model.cfg.seq_len, None, None
    for start in range(0, tokens_1N.shape[1], t):
        out = model(tokens_1N[:, start : start + t], memory)
        memory, last = out.memory, out.logits_BTV
    return last[:, -1]


def measure(config: str, prompt: int, new: int, device: torch.device) -> dict:
    cfg = load_run_config(config, ["logging.wandb=disabled"]).model
    torch.manual_seed(0)
    model = build_model(cfg).to(device).eval()
    tokens = torch.randint(0, cfg.vocab_size, (1, prompt + new), device=device)
    state = DecodeState(model)
    state.extend(tokens[:, :prompt])
    cached, rerun, worst = [], [], 0.0
    for i in range(prompt, prompt + new):
        sync(device)
        t0 = time.perf_counter()
        a = state.extend(tokens[:, i : i + 1])[:, -1]
        sync(device)
        t1 = time.perf_counter()
        b = full_forward(model, tokens[:, : i + 1])
        sync(device)
        t2 = time.perf_counter()
        cached.append(t1 - t0)
        rerun.append(t2 - t1)
        worst = max(worst, (a - b).abs().max().item())
    c, r = statistics.median(cached), statistics.median(rerun)
    return {"config": config, "cached_ms": 1e3 * c, "rerun_ms": 1e3 * r, "max_diff": worst}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--prompt", type=int, default=192, help="tokens before the timed ones")
    p.add_argument("--new", type=int, default=32, help="timed new tokens")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {device}")
    print(f"# context {args.prompt} -> {args.prompt + args.new} tokens, batch 1, fp32")
    print("| config | cached ms/token | re-run ms/token | speed-up | max logit diff |")
    print("|---|---:|---:|---:|---:|")
    for config in CONFIGS:
        r = measure(config, args.prompt, args.new, device)
        print(
            f"| {r['config']} | {r['cached_ms']:.1f} | {r['rerun_ms']:.1f} | "
            f"{r['rerun_ms'] / r['cached_ms']:.1f}x | {r['max_diff']:.1e} |"
        )


if __name__ == "__main__":
    main()
