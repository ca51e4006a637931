"""One torchrun job running several training cases, each under its own parallel layout.

Started by `tests/parallel/launch.py` as `torchrun ... tests/parallel/worker.py SPEC.json`.
Each case builds a `DistributedRuntime` and runs the real `Trainer` loop, so the numbers the
tests compare come from the same code as `switchall pretrain`. Sharing one launch between cases
saves the process start-up (imports, DeepSpeed's comm set-up), the bulk of a case's cost on CPU.

Rank 0 writes SPEC's `out`/results.json: per case, the logged history, and under
`switchall_imported_from` every rank's `switchall.__file__`. Cases may also ask for
per-rank dumps (`dump_experts`: the local σ-MoE expert shards; `capture_grads`: gradients as
the optimiser sees them after DeepSpeed's reduction, at ZeRO stage 0; `dump_weights_at`: the
local parameters after the listed optimiser steps; `dump_state`: every checkpoint entry this
rank holds, as (global offsets, tensor) boxes, right after construction (a resumed run: what it
loaded) and at the end). `copy_from` starts the case in a copy of another case's run directory
(a checkpoint resumed under another layout).
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import switchall
from switchall.config import load_run_config
from switchall.kernels import cvmm_prepare
from switchall.models.sigma_moe import SigmaMoE
from switchall.parallel.expert_parallel import ParallelSigmaMoE, parallelize_sigma_moe
from switchall.parallel.layout import destroy_layout, init_layout
from switchall.parallel.runtime import DistributedRuntime
from switchall.parallel.sharded_state import global_name
from switchall.pretrain.trainer import Trainer


def _dump_experts(trainer: Trainer, runtime: DistributedRuntime, path: Path) -> None:
    layers = {}
    for name, m in runtime.parallel_model.named_modules():
        if isinstance(m, ParallelSigmaMoE):
            layers[name] = {
                "expert_offset": m.expert_offset,
                "w1": m.w1.detach().clone(),
                "w2": m.w2.detach().clone(),
            }
    layout = runtime.layout
    torch.save({"ep_rank": layout.ep_rank, "tp_rank": layout.tp_rank, "layers": layers}, path)


def _dump_replicated(runtime: DistributedRuntime, path: Path) -> None:
    """Parameters every tensor-parallel rank holds whole (they must stay identical)."""
    params = {
        global_name(n): p.detach().clone()
        for n, p in runtime.parallel_model.named_parameters()
        if not getattr(p, "tensor_model_parallel", False)
    }
    torch.save(params, path)


def _copy_checkpoint(src: Path, dst: Path, step: int) -> None:
    """A new run directory holding `src`'s config and its checkpoint `step` only."""
    name = f"checkpoints/step_{step:08d}"
    (dst / "checkpoints").mkdir(parents=True)
    shutil.copy(src / "config.yaml", dst / "config.yaml")
    shutil.copytree(src / name, dst / name)


def dump_state(trainer: Trainer, runtime, path: Path) -> None:
    """This rank's boxes of every checkpoint entry: key -> [(global offsets, tensor)]."""
    from switchall.checkpoint.entries import memory_entries

    entries = trainer.engine.checkpoint_entries(optimizer=trainer.engine.has_optimizer_state())
    lanes = trainer.cfg.train.batch_size
    first_lane = runtime.dp_rank * lanes // runtime.dp_size
    entries.update(memory_entries(trainer.memory, lanes, first_lane))
    boxes = {
        key: [(b.offsets, b.tensor.detach().clone()) for b in g.boxes] for key, g in entries.items()
    }
    torch.save({"rank": runtime.rank, "step": trainer.step, "boxes": boxes}, path)


def _capture_grads(trainer: Trainer, runtime: DistributedRuntime, path: Path) -> None:
    """Snapshot every gradient right before the first optimiser step (after reduction)."""
    model = runtime.parallel_model
    names = {id(p): global_name(n) for n, p in model.named_parameters()}

    def hook(optimizer, args, kwargs):
        grads = {
            names[id(p)]: p.grad.detach().clone()
            for g in optimizer.param_groups
            for p in g["params"]
            if p.grad is not None
        }
        torch.save({"rank": runtime.rank, "ep_rank": runtime.layout.ep_rank, "grads": grads}, path)
        handle.remove()

    handle = trainer.engine.optimizer.register_step_pre_hook(hook)


def _dump_weights_at(trainer: Trainer, runtime: DistributedRuntime, steps, prefix: Path) -> None:
    """After each optimiser step in `steps`, save this rank's parameters as the model holds
    them (single-device names, the slices of the full tensors they are, see `mark_shard`).
    Under ZeRO-3 every rank gathers its data-parallel partitions first (collectively)."""
    train_step = trainer.train_step

    def train_step_then_dump(batch):
        stats = train_step(batch)
        step = trainer.step + 1  # the trainer counts the step once train_step returns
        if step in steps:
            model = runtime.parallel_model
            gathered = contextlib.nullcontext()
            if runtime.layout.zero_stage == 3:
                import deepspeed

                gathered = deepspeed.zero.GatheredParameters(list(model.parameters()))
            with gathered:
                params = {
                    global_name(n): {
                        "data": p.detach().clone(),
                        "shards": [list(s) for s in getattr(p, "switchall_shards", ())],
                    }
                    for n, p in model.named_parameters()
                }
            torch.save(params, f"{prefix}_step{step}_rank{runtime.rank}.pt")
        return stats

    trainer.train_step = train_step_then_dump


def check_dispatch(case: dict) -> dict:
    """EP dispatch / combine against one device's σ-MoE, with skewed routing: every token of
    every rank goes to rank 0's experts, so rank 1 receives nothing and sends everything."""
    cfg = load_run_config(case["config"], case["overrides"])
    layout = init_layout(cfg.parallel)
    try:
        torch.manual_seed(0)
        full = SigmaMoE(cfg.model)
        local = copy.deepcopy(full)
        parallelize_sigma_moe(local, layout)
        x_count, k, d = 24, cfg.model.moe.k, cfg.model.d_model
        gen = torch.Generator().manual_seed(100 + layout.rank)
        x_XD = torch.randn(x_count, d, generator=gen, requires_grad=True)
        gates_XK = torch.rand(x_count, k, generator=gen, requires_grad=True)
        per_rank = local.num_local_experts
        idx_XK = torch.stack(
            [torch.randperm(per_rank, generator=gen)[:k] for _ in range(x_count)]
        )  # all on rank 0's experts
        y_XD = local.dispatched_experts(x_XD, idx_XK, gates_XK)
        y_XD.square().sum().backward()
        # The reference sees every rank's tokens.
        xs, gs, ids = (
            [torch.empty_like(t) for _ in range(layout.world_size)]
            for t in (x_XD, gates_XK, idx_XK)
        )
        dist.all_gather(xs, x_XD.detach())
        dist.all_gather(gs, gates_XK.detach())
        dist.all_gather(ids, idx_XK)
        ref_x, ref_g = torch.cat(xs).requires_grad_(), torch.cat(gs).requires_grad_()
        ref_y = full.experts(ref_x, cvmm_prepare(torch.cat(ids), full.num_experts), ref_g)
        ref_y.square().sum().backward()
        rows = slice(layout.rank * x_count, (layout.rank + 1) * x_count)
        experts = slice(local.expert_offset, local.expert_offset + per_rank)
        pairs = {
            "y": (y_XD, ref_y[rows]),
            "x_grad": (x_XD.grad, ref_x.grad[rows]),
            "gates_grad": (gates_XK.grad, ref_g.grad[rows]),
            "w1_grad": (local.w1.grad, full.w1.grad[experts]),
            "w2_grad": (local.w2.grad, full.w2.grad[experts]),
        }
        errors = {  # largest error relative to the largest reference value
            k: ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
            for k, (a, b) in pairs.items()
        }
        worst = torch.tensor(list(errors.values()), dtype=torch.float64)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)  # over both ranks' tokens and experts
        errors = dict(zip(errors, worst.tolist(), strict=True))
        sent = torch.tensor([local.comm.bytes_sent], dtype=torch.float64)
        dist.all_reduce(sent)
        # Rank 1's slots cross to rank 0 and back twice: tokens out and outputs back in the
        # forward, output gradients out and token gradients back in the backward.
        expected = 4 * x_count * k * d * 4
        return {"max_rel_error": errors, "bytes_sent": sent.item(), "expected_bytes": expected}
    finally:
        destroy_layout()


def run_case(case: dict, out: Path) -> dict:
    if case.get("kind") == "dispatch":
        return check_dispatch(case)
    cfg = load_run_config(case["config"], case["overrides"])
    if case.get("copy_from") and dist.get_rank() == 0:
        _copy_checkpoint(out / case["copy_from"], out / case["run_dir"], case["copy_step"])
    dist.barrier()
    runtime = DistributedRuntime(cfg)
    try:
        trainer = Trainer(cfg, out / case["run_dir"], runtime, resume=case.get("resume", False))
        name, rank = case["name"], runtime.rank
        if case.get("dump_state"):
            dump_state(trainer, runtime, out / f"{name}_start_rank{rank}.pt")
        if case.get("capture_grads"):
            _capture_grads(trainer, runtime, out / f"{case['name']}_grads_rank{runtime.rank}.pt")
        if case.get("dump_weights_at"):
            _dump_weights_at(trainer, runtime, case["dump_weights_at"], out / case["name"])
        result = trainer.run(stop_after=case.get("stop_after"))
        if case.get("dump_replicated"):
            _dump_replicated(runtime, out / f"{case['name']}_replicated_rank{runtime.rank}.pt")
        if case.get("dump_experts"):
            _dump_experts(trainer, runtime, out / f"{case['name']}_experts_rank{runtime.rank}.pt")
        if case.get("dump_state"):
            dump_state(trainer, runtime, out / f"{name}_end_rank{rank}.pt")
        return {"layout": runtime.layout_name, "history": result["history"]}
    finally:
        runtime.shutdown()


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    dist.init_process_group("gloo")
    results = {}
    for case in spec["cases"]:
        start = time.perf_counter()
        results[case["name"]] = run_case(case, out)
        dist.barrier()
        results[case["name"]]["seconds"] = time.perf_counter() - start
    imported: list = [None] * dist.get_world_size()
    dist.all_gather_object(imported, switchall.__file__)
    results["switchall_imported_from"] = imported  # launch.py checks it is the checkout
    if dist.get_rank() == 0:
        (out / "results.json").write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
