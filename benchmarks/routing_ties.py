"""Why a parallel layout's first-step loss can differ from one process by more than rounding.

Runs the first training forward of CONFIG (default: the demo SwitchAll on data/stdlib, which
`make demo` prepares) in one process with every routing decision recorded, lists the closest
near-ties (rows whose k-th and (k+1)-th routing logits almost tie), then
1. replays the forward with only the closest near-tie decided the other way, and
2. runs the same first step under a parallel layout (default TP=2) with torchrun,
and prints the three losses. When (1) equals (2), the layout's whole difference is that one
routing choice, which its different reduction order tipped the other way (see
tests/parallel/test_demo_parity.py for the test of the general claim).

    .venv/bin/python benchmarks/routing_ties.py [--config C] [--layout parallel.tensor=2 ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from switchall.config import load_run_config  # noqa: E402
from switchall.launch.local import torchrun_command  # noqa: E402
from switchall.models import build_model  # noqa: E402
from switchall.models.routing import NoiseContext, derive_seed  # noqa: E402
from switchall.pretrain.runtime import LocalRuntime  # noqa: E402
from switchall.pretrain.setup import RunSetup  # noqa: E402
from tests.parallel.routing_tape import RoutingTape, assemble  # noqa: E402


def first_step_loss(model, batch, seed: int, tape: RoutingTape) -> float:
    with tape.installed():
        out = model(batch[:, :-1], None, noise=NoiseContext(derive_seed(seed, 0), 0))
    return float(F.cross_entropy(out.logits_BTV.flatten(0, 1), batch[:, 1:].flatten()))


def near_ties(tape: dict, count: int) -> list[tuple[float, str, tuple, int, int]]:
    """(margin, key, row, k-th expert, (k+1)-th expert) of the `count` closest ties."""
    found = []
    for key, e in tape.items():
        k = e["idx"].shape[-1]
        if k >= e["logits"].shape[-1]:
            continue
        top = e["logits"].topk(k + 1, dim=-1)
        margin = top.values[..., k - 1] - top.values[..., k]
        flat = margin.flatten().topk(min(count, margin.numel()), largest=False)
        for m, i in zip(flat.values.tolist(), flat.indices.tolist(), strict=True):
            pos = tuple(torch.unravel_index(torch.tensor(i), margin.shape))
            pos = tuple(int(p) for p in pos)
            found.append((m, key, pos, int(top.indices[pos][k - 1]), int(top.indices[pos][k])))
    return sorted(found)[:count]


def layout_first_loss(config: str, overrides: list[str], layout: list[str], nproc: int) -> float:
    with tempfile.TemporaryDirectory() as run_dir:
        args = ["-m", "switchall", "pretrain", config, *overrides, *layout, "--run-dir", run_dir]
        subprocess.run(torchrun_command(nproc, args), check=True, capture_output=True, cwd=REPO)
        lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
        return next(r["loss"] for r in map(json.loads, lines) if "loss" in r)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(REPO / "configs/demo_switchall.yaml"))
    ap.add_argument("--layout", nargs="+", default=["parallel.tensor=2"])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    overrides = [
        *args.overrides,
        "train.steps=1",
        "train.eval_every=0",
        "train.eval_batches=1",
        "train.log_every=1",
        "logging.wandb=disabled",
    ]
    cfg = load_run_config(args.config, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        setup = RunSetup(cfg, Path(tmp), LocalRuntime(torch.device("cpu")), False, write=False)
        batch = next(iter(setup.train_loader()))
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model).train()
    record = RoutingTape("record")
    loss = first_step_loss(model, batch, cfg.train.seed, record)
    tape = assemble([record.entries])
    ties = near_ties(tape, 5)
    decisions = sum(e["idx"][..., 0].numel() for e in tape.values())
    print(f"{decisions:,} routing decisions in the first forward; the closest near-ties:")
    for m, key, pos, kth, nxt in ties:
        print(f"  {key:>10} row {pos}: k-th expert {kth}, next {nxt}, margin {m:.2e}")
    _, key, pos, kth, nxt = ties[0]
    idx = tape[key]["idx"]
    slot = (idx[pos] == kth).nonzero()[0, 0]
    idx[pos + (int(slot),)] = nxt
    flipped = first_step_loss(model, batch, cfg.train.seed, RoutingTape("replay", reference=tape))
    other = layout_first_loss(args.config, overrides, args.layout, args.nproc)
    print(f"one process                          loss {loss!r}")
    print(f"one process, closest tie flipped     loss {flipped!r}")
    print(f"{' '.join(args.layout):<36} loss {other!r}")


if __name__ == "__main__":
    main()
