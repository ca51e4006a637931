"""`switchall generate`: sample text from an exported model or a run's checkpoint."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from switchall.configtools import ConfigError, to_dict


def load_run_model(run_dir: Path, checkpoint: Path | None = None, device="cpu"):
    """The model of a run's checkpoint (the latest unless `checkpoint`), in eval mode.

    -> (model, run config, checkpoint meta). This is the one place that knows how a run
    stores its model; it reads single-process checkpoints (`model_rank0.pt`).
    """
    from switchall.config import load_run_config
    from switchall.models import build_model
    from switchall.pretrain.checkpoint import CheckpointManager

    cfg = load_run_config(run_dir / "config.yaml", ["logging.wandb=disabled"])
    manager = CheckpointManager(run_dir / "checkpoints")
    ckpt = Path(checkpoint) if checkpoint else manager.latest()
    if ckpt is None:
        raise ConfigError("", f"{run_dir / 'checkpoints'} holds no complete checkpoint")
    meta = manager.read_meta(ckpt)
    if meta.get("model") != to_dict(cfg.model):
        raise ConfigError("model", f"{run_dir / 'config.yaml'} differs from checkpoint {ckpt}")
    layout = meta.get("layout", "single")
    if layout != "single":
        raise ConfigError(
            "",
            f"checkpoint {ckpt} was saved by a parallel run (layout {layout}); generate reads "
            "single-process checkpoints or an export directory",
        )
    model = build_model(cfg.model)
    model.load_state_dict(manager.load(ckpt, "model_rank0.pt"))
    return model.to(device).eval(), cfg, meta


def _run_tokenizer(cfg, meta, run_dir: Path):
    from switchall.data_pipeline import DataError, load_tokenizer

    try:
        tok = load_tokenizer(cfg.data.path)
    except DataError as e:
        raise DataError(
            f"{e} (the tokenizer of run {run_dir} is read from its dataset, data.path)"
        ) from None
    if meta.get("tokenizer_sha256") not in (None, tok.sha256):
        raise DataError(
            f"the tokenizer of {cfg.data.path} differs from the one run {run_dir} trained with"
        )
    return tok


def load_for_generation(path: Path, checkpoint: Path | None, device):
    """(model, tokenizer, description) of an export directory or a run directory."""
    from switchall.models.pretrained import (
        CONFIG_NAME,
        load_pretrained,
        load_pretrained_tokenizer,
    )

    if (path / CONFIG_NAME).is_file():
        if checkpoint is not None:
            raise ConfigError("--checkpoint", f"{path} is an export, not a run directory")
        model, _ = load_pretrained(path, device)
        return model, load_pretrained_tokenizer(path), f"export {path}"
    if (path / "config.yaml").is_file():
        model, cfg, meta = load_run_model(path, checkpoint, device)
        return model, _run_tokenizer(cfg, meta, path), f"run {path}, step {meta.get('step')}"
    raise ConfigError(
        "", f"{path}: neither an export ({CONFIG_NAME}) nor a run directory (config.yaml)"
    )


def run_generate(args: argparse.Namespace) -> int:
    from switchall.models.generate import generate
    from switchall.pretrain.checkpoint import CheckpointError
    from switchall.pretrain.runtime import resolve_device

    if args.max_new_tokens < 0:
        raise ConfigError("--max-new-tokens", f"must be >= 0, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise ConfigError("--temperature", f"must be >= 0, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise ConfigError("--top-k", f"must be >= 1, got {args.top_k}")
    device = resolve_device(args.device)
    try:
        model, tok, source = load_for_generation(Path(args.model), args.checkpoint, device)
    except CheckpointError as e:
        print(f"switchall generate: checkpoint error: {e}", file=sys.stderr)
        return 2
    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=device).manual_seed(args.seed)
    # Documents follow an end-of-document token in training, so one starts the prompt.
    prompt = [tok.eod_id, *tok.encode(args.prompt)]
    result = generate(
        model,
        prompt,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        generator=generator,
        vocab_size=tok.vocab_size,
        stop_id=tok.eod_id,
    )
    text_ids = result.tokens[:-1] if result.stop == "eod" else result.tokens
    completion = tok.decode(text_ids)
    if args.json:
        record = {
            "model": source,
            "prompt": args.prompt,
            "completion": completion,
            "prompt_tokens": prompt,
            "tokens": result.tokens,
            "stop": result.stop,
        }
        print(json.dumps(record))
    else:
        print(completion)
    return 0


def register(verbs: argparse._SubParsersAction) -> None:
    g = verbs.add_parser(
        "generate",
        help="sample text from an exported model or a run's checkpoint",
        description="Continue a prompt with text sampled from a model (incremental decoding "
        "over the XL memory window the model was trained with).",
    )
    g.add_argument("model", help="an export directory, or a run directory (latest checkpoint)")
    g.add_argument("--prompt", default="", help="text to continue (default: a new document)")
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=1.0, help="0: greedy (argmax)")
    g.add_argument("--top-k", type=int, help="sample among the K most likely tokens")
    g.add_argument("--seed", type=int, help="seed of the draws (default: fresh each run)")
    g.add_argument("--checkpoint", help="with a run directory: this checkpoint directory")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--json", action="store_true", help="print one JSON object with the tokens")
    g.set_defaults(func=run_generate)
