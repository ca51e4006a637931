"""`switchall pretrain` and `switchall evaluate`."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from switchall.config import load_run_config
from switchall.configtools import ConfigError


def make_runtime(cfg):
    """One process: `LocalRuntime`. Under torchrun, or with any parallel setting beyond one
    process, the `DistributedRuntime` (which validates the layout against the world size)."""
    from switchall.pretrain.runtime import LocalRuntime, resolve_device

    p = cfg.parallel
    if p.zero_stage > 0 and "WORLD_SIZE" not in os.environ:
        raise ConfigError(
            "parallel.zero_stage",
            f"{p.zero_stage} needs the DeepSpeed engine: launch with torchrun",
        )
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or p.tensor > 1 or p.expert > 1 or p.zero_stage:
        from switchall.parallel.runtime import DistributedRuntime

        return DistributedRuntime(cfg)
    return LocalRuntime(resolve_device(cfg.train.device))


def run_pretrain(args: argparse.Namespace) -> int:
    from switchall.pretrain.trainer import Trainer

    cfg = load_run_config(args.config, args.overrides)
    runtime = make_runtime(cfg)
    try:
        if cfg.train.deterministic:
            # cuBLAS is only deterministic with a fixed workspace; it must be set before the
            # first cuBLAS call, and a user's own setting wins.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        result = Trainer(cfg, args.run_dir, runtime, resume=args.resume).run()
    finally:
        runtime.shutdown()
    if runtime.is_logging_rank:
        print(
            f"done: step {result['step']}  val_loss {result['val_loss']:.4f}  "
            f"val_ppl {result['val_ppl']:.2f}  (run directory {args.run_dir})"
        )
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from switchall.checkpoint.consolidate import consolidate
    from switchall.models import build_model
    from switchall.pretrain.checkpoint import CheckpointManager
    from switchall.pretrain.evaluate import validate
    from switchall.pretrain.runtime import LocalRuntime, resolve_device
    from switchall.pretrain.setup import RunSetup

    run_dir = Path(args.run_dir)
    overrides = list(args.overrides) + ["logging.wandb=disabled"]
    if args.batches is not None:
        overrides.append(f"train.eval_batches={args.batches}")
    cfg = load_run_config(run_dir / "config.yaml", overrides)
    runtime = LocalRuntime(resolve_device(cfg.train.device))
    manager = CheckpointManager(run_dir / "checkpoints")
    ckpt = Path(args.checkpoint) if args.checkpoint else manager.latest()
    if ckpt is None:
        raise ConfigError("", f"{run_dir / 'checkpoints'} holds no complete checkpoint")
    setup = RunSetup(cfg, run_dir, runtime, resume=True, write=False)
    setup.check_checkpoint_meta(manager.read_meta(ckpt), ckpt)
    model = build_model(cfg.model)
    # Any layout: the checkpoint's weights consolidated into the single-device state dict.
    model.load_state_dict(consolidate(ckpt))
    model.to(runtime.device)
    result = validate(
        model,
        setup.val_loader(),
        cfg.model,
        runtime.device,
        setup.amp_dtype,
        cfg.train.eval_batches,
        byte_level=setup.byte_level,
    )
    step = manager.read_meta(ckpt)["step"]
    if args.json:
        print(json.dumps({**result.record(step), "checkpoint": str(ckpt)}))
    else:
        print(f"{ckpt}: step {step}  {result.describe()}  ({result.tokens:,} tokens)")
    return 0


def register(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser(
        "pretrain",
        help="train a model from a YAML config",
        description="Train a model; overrides look like section.key=value.",
    )
    p.add_argument("config", help="YAML run config, e.g. configs/demo_switchall.yaml")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--run-dir", required=True, help="where config, metrics, checkpoints go")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.set_defaults(func=run_pretrain)

    e = verbs.add_parser("evaluate", help="validation loss / perplexity of a run's checkpoint")
    e.add_argument("run_dir", help="a run directory written by `switchall pretrain`")
    e.add_argument("overrides", nargs="*", help="section.key=value overrides (e.g. data.path=...)")
    e.add_argument("--checkpoint", help="a checkpoint directory (default: the latest)")
    e.add_argument("--batches", type=int, help="validation batches (default: train.eval_batches)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(func=run_evaluate)
