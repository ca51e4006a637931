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
    process, the `DistributedRuntime` (which validates the layout against the world size).
    What the distributed stack prints while it is imported and set up goes to the rank log."""
    from switchall.launch.process import third_party_output_to_log
    from switchall.pretrain.runtime import LocalRuntime, resolve_device

    p = cfg.parallel
    if p.zero_stage > 0 and "WORLD_SIZE" not in os.environ:
        raise ConfigError(
            "parallel.zero_stage",
            f"{p.zero_stage} needs the DeepSpeed engine: launch with torchrun",
        )
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or p.tensor > 1 or p.expert > 1 or p.zero_stage:
        with third_party_output_to_log():
            from switchall.parallel.runtime import DistributedRuntime

            return DistributedRuntime(cfg)
    return LocalRuntime(resolve_device(cfg.train.device))


def _continue_command(args: argparse.Namespace) -> str:
    """The command line that continues a stopped run (for the message printed at the stop)."""
    import shlex
    import sys

    argv = [a for a in sys.argv[1:] if a not in ("--resume", "--auto-resume")]
    prog = "switchall" if not os.environ.get("TORCHELASTIC_RUN_ID") else "torchrun ... -m switchall"
    return f"{prog} {shlex.join(argv)} --resume"


def run_pretrain(args: argparse.Namespace) -> int:
    from switchall.launch.process import RANK_LOG, exit_with_parent, under_torchrun
    from switchall.pretrain.control import StopSignals
    from switchall.pretrain.startup import check_start, env_rank, print_notes

    StopSignals.install()  # first: a warning signal during the start-up is not lost
    if under_torchrun():
        exit_with_parent()
    rank, world = env_rank()
    RANK_LOG.banner(rank, world)
    cfg = load_run_config(args.config, args.overrides)
    plan = check_start(
        cfg,
        args.run_dir,
        config_source=args.config,
        resume=args.resume,
        auto_resume=args.auto_resume,
        allow_config_change=args.allow_config_change,
    )
    args.startup_checked = True  # from here on, errors can differ between ranks
    print_notes(plan)
    if plan.finished_step is not None:
        if rank == 0:
            print(
                f"{args.run_dir} is finished (checkpoint at step {plan.finished_step}, "
                f"train.steps={cfg.train.steps}): nothing to do"
            )
        return 0
    try:
        return _train(args, cfg, plan.resume, rank)
    finally:
        if plan.lock is not None:
            plan.lock.release()  # the trainer released it already unless it failed


def _train(args: argparse.Namespace, cfg, resume: bool, rank: int) -> int:
    from switchall.launch.process import RANK_LOG, log_dir_for
    from switchall.pretrain.control import EXIT_STOPPED

    log_dir = log_dir_for(args.run_dir)
    if rank == 0 or os.environ.get("SWITCHALL_LOG_DIR"):
        RANK_LOG.attach(log_dir / f"rank-{rank}.log")
    from switchall.pretrain.trainer import Trainer

    runtime = make_runtime(cfg)
    try:
        if cfg.train.deterministic:
            # cuBLAS is only deterministic with a fixed workspace; it must be set before the
            # first cuBLAS call, and a user's own setting wins.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        trainer = Trainer(cfg, args.run_dir, runtime, resume=resume)
        RANK_LOG.attach(log_dir / f"rank-{rank}.log")  # the run directory exists on every rank
        result = trainer.run()
    finally:
        runtime.shutdown()
    if not runtime.is_logging_rank:
        return EXIT_STOPPED if result.get("stopped") else 0
    if result.get("stopped"):
        print(
            f"stopped by {result['signal']} after step {result['step']}: checkpoint "
            f"{result['checkpoint']}; continue with: {_continue_command(args)}",
            flush=True,
        )
        return EXIT_STOPPED
    if result.get("already_finished"):
        print(f"{args.run_dir} is finished (step {result['step']}): nothing to do")
        return 0
    print(
        f"done: step {result['step']}  val_loss {result['val_loss']:.4f}  "
        f"val_ppl {result['val_ppl']:.2f}  (run directory {args.run_dir})"
    )
    return 0


def _evaluation_model(args, overrides: list[str]):
    """(run config, model, step or None, what was loaded) of `evaluate`'s argument: a run
    directory's checkpoint of any layout, or an export directory (`--model`)."""
    from switchall.checkpoint.consolidate import consolidate
    from switchall.config import export_run_config
    from switchall.models import build_model
    from switchall.pretrain.checkpoint import CheckpointManager

    if args.model is not None:
        from switchall.models.pretrained import load_pretrained, load_pretrained_tokenizer

        if args.run_dir is not None or args.checkpoint is not None:
            raise ConfigError("--model", "give an export directory or a run directory, not both")
        model_dir = Path(args.model)
        cfg = export_run_config(model_dir, overrides)
        model, _ = load_pretrained(model_dir)
        return cfg, model, None, model_dir, load_pretrained_tokenizer(model_dir).info()["sha256"]
    if args.run_dir is None:
        raise ConfigError("", "evaluate needs a run directory or --model EXPORT_DIR")
    run_dir = Path(args.run_dir)
    cfg = load_run_config(run_dir / "config.yaml", overrides)
    manager = CheckpointManager(run_dir / "checkpoints")
    ckpt = Path(args.checkpoint) if args.checkpoint else manager.latest()
    if ckpt is None:
        raise ConfigError("", f"{run_dir / 'checkpoints'} holds no complete checkpoint")
    meta = manager.read_meta(ckpt)
    model = build_model(cfg.model)
    # Any layout: the checkpoint's weights consolidated into the single-device state dict.
    model.load_state_dict(consolidate(ckpt))
    return cfg, model, meta, ckpt, None


def run_evaluate(args: argparse.Namespace) -> int:
    from switchall.pretrain.evaluate import validate
    from switchall.pretrain.runtime import LocalRuntime, resolve_device
    from switchall.pretrain.setup import RunSetup

    if args.model is not None and args.run_dir is not None and "=" in args.run_dir:
        # `evaluate --model DIR data.path=...`: argparse took the first override for RUN_DIR.
        args.overrides, args.run_dir = [args.run_dir, *args.overrides], None
    overrides = list(args.overrides) + ["logging.wandb=disabled"]
    cfg, model, meta, source, tokenizer_sha256 = _evaluation_model(args, overrides)
    runtime = LocalRuntime(resolve_device(cfg.train.device))
    setup = RunSetup(cfg, Path(args.run_dir or args.model), runtime, resume=True, write=False)
    if meta is not None:
        setup.check_checkpoint_meta(meta, source)
    elif tokenizer_sha256 != setup.tokenizer_sha256:
        raise ConfigError(
            "data.path",
            f"the tokenizer of {cfg.data.path} differs from the one export {source} was trained "
            "with",
        )
    model.to(runtime.device)
    result = validate(
        model,
        setup.val_loader(),
        cfg.model,
        runtime.device,
        setup.amp_dtype,
        args.batches or 0,  # the whole split unless --batches (train.eval_batches is training's)
        byte_level=setup.byte_level,
    )
    step = meta["step"] if meta is not None else None
    if args.json:
        key = "checkpoint" if meta is not None else "model"
        print(json.dumps({**result.record(step), key: str(source)}))
    else:
        at = f"step {step}  " if step is not None else ""
        print(f"{source}: {at}{result.describe()}  ({result.tokens:,} tokens)")
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def register(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser(
        "pretrain",
        help="train a model from a YAML config",
        description="Train a model; overrides look like section.key=value.",
    )
    p.add_argument("config", help="YAML run config, e.g. configs/demo_switchall.yaml")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--run-dir", required=True, help="where config, metrics, checkpoints go")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest complete checkpoint (the run directory must exist)",
    )
    p.add_argument(
        "--auto-resume",
        action="store_true",
        help="continue if the run directory holds a checkpoint, else start (Slurm jobs use it)",
    )
    p.add_argument(
        "--allow-config-change",
        action="store_true",
        help="on resume, accept config changes that alter the run's mathematics "
        "(model, optimiser, schedule, batch, seed)",
    )
    p.set_defaults(func=run_pretrain)

    e = verbs.add_parser(
        "evaluate", help="validation loss / perplexity of a run's checkpoint or an export"
    )
    e.add_argument("run_dir", nargs="?", help="a run directory written by `switchall pretrain`")
    e.add_argument("overrides", nargs="*", help="section.key=value overrides (e.g. data.path=...)")
    e.add_argument("--checkpoint", help="a checkpoint directory (default: the latest)")
    e.add_argument(
        "--model",
        help="an export directory (`switchall export`) instead of a run directory; the "
        "dataset is then given as data.path=DIR",
    )
    e.add_argument(
        "--batches",
        type=_positive_int,
        help="evaluate the first N validation batches (default: the whole validation split)",
    )
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(func=run_evaluate)
