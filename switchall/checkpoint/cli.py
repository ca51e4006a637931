"""`switchall checkpoint info|convert` and `switchall export`."""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from switchall.checkpoint.errors import CheckpointError
from switchall.configtools import ConfigError


def resolve_checkpoint(path: Path, checkpoint: str | None = None) -> Path:
    """A checkpoint directory from `--checkpoint`, or the latest complete one of a run
    directory (or of its `checkpoints/`), or `path` itself if it is one."""
    from switchall.pretrain.checkpoint import CheckpointManager

    if checkpoint:
        return Path(checkpoint)
    if (path / "meta.json").is_file():
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    latest = CheckpointManager(root).latest()
    if latest is None:
        raise CheckpointError(f"{root} holds no complete checkpoint")
    return latest


def describe(ckpt: Path) -> dict[str, Any]:
    """What `checkpoint info` prints: step, layout, model, data position, sizes, verification."""
    from switchall.checkpoint import dcp_io
    from switchall.pretrain.checkpoint import CheckpointManager

    meta = CheckpointManager.read_meta(ckpt)
    problems = CheckpointManager(ckpt.parent).verify(ckpt)
    info: dict[str, Any] = {
        "checkpoint": str(ckpt),
        "step": meta["step"],
        "layout": meta["layout"],
        "model": meta["model"],
        "files": len(meta["files"]),
        "bytes": sum(f["bytes"] for f in meta["files"].values()),
        "verified": not problems,
        "problems": problems,
    }
    try:
        saved = dcp_io.read_metadata(ckpt).state_dict_metadata
        state = json.loads((ckpt / "train_state.json").read_text())
    except (CheckpointError, OSError, ValueError):
        return info
    count = {"model": 0, "optim": 0, "memory": 0}
    for key, md in saved.items():
        count[key.split("/")[0]] += math.prod(md.size)
    info.update(
        parameters=count["model"],
        optimizer_values=count["optim"],
        memory_values=count["memory"],
        data=state["loader"],
        data_path=meta.get("config", {}).get("data", {}).get("path"),
        train=meta.get("config", {}).get("train", {}),
    )
    return info


def _print_info(info: dict[str, Any]) -> None:
    lay, m = info["layout"], info["model"]
    att, moe = m.get("attention", {}), m.get("moe", {})
    heads = f"{att.get('n_heads')} heads x {att.get('d_head')}"
    if m.get("variant") in ("switchhead", "switchall"):
        heads += f", {att.get('n_experts')} experts/head (k {att.get('k')})"
    mlp = (
        f"σ-MoE {moe.get('n_experts')} x {moe.get('expert_size')} (k {moe.get('k')})"
        if m.get("variant") in ("switchall", "sigma_moe")
        else f"MLP d_ff {m.get('mlp', {}).get('d_ff')}"
    )
    rows = [
        ("step", f"{info['step']:,}"),
        (
            "saved with",
            f"{lay['name']} ({lay['world_size']} ranks on {lay['nodes']} node(s): tensor "
            f"{lay['tensor']}, expert {lay['expert']}, data {lay['data']}, "
            f"ZeRO {lay['zero_stage']})",
        ),
        (
            "model",
            f"{m.get('variant')}, {m.get('n_layers')} layers, d_model {m.get('d_model')}, {heads}, "
            f"{mlp}, vocab {m.get('vocab_size')}, seq_len {m.get('seq_len')}",
        ),
    ]
    if "parameters" in info:
        t, d = info["train"], info["data"]
        rows += [
            (
                "parameters",
                f"{info['parameters']:,} (optimizer state {info['optimizer_values']:,})",
            ),
            (
                "training",
                f"steps {t.get('steps')}, batch {t.get('batch_size')}, seed {t.get('seed')}",
            ),
            (
                "data",
                f"{info['data_path']}: batch {d['batches']:,} (epoch {d['epoch']}), "
                f"{d['samples']:,} sequences in, mode {d['mode']}",
            ),
        ]
    rows.append(("files", f"{info['files']} files, {info['bytes'] / 2**20:,.1f} MiB"))
    rows.append(("verified", "yes, every file" if info["verified"] else "NO"))
    print(info["checkpoint"])
    for k, v in rows:
        print(f"  {k:<11} {v}")
    for p in info["problems"]:
        print(f"  problem     {p}")


def run_info(args: argparse.Namespace) -> int:
    info = describe(resolve_checkpoint(Path(args.path), args.checkpoint))
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        _print_info(info)
    return 0 if info["verified"] else 1


def run_convert(args: argparse.Namespace) -> int:
    from switchall.checkpoint.legacy import convert

    new = convert(Path(args.checkpoint), args.out)
    print(f"converted {args.checkpoint} -> {new}")
    return 0


def _tokenizer_file(cfg: dict[str, Any], meta: dict[str, Any], tmp: Path) -> Path | None:
    """The run's sentencepiece model as a file (None for byte tokens), from its dataset and
    checked against the checkpoint's tokenizer hash."""
    from switchall.data_pipeline.tokenizer import (
        BYTE_SHA256,
        SentencePieceTokenizer,
        load_tokenizer,
    )

    if meta.get("tokenizer_sha256") == BYTE_SHA256:
        return None  # byte tokens: nothing to ship, the dataset need not be at hand
    data_path = cfg.get("data", {}).get("path")
    tok = load_tokenizer(data_path)
    if tok.info().get("sha256") != meta.get("tokenizer_sha256"):
        raise ConfigError("data.path", f"the tokenizer of {data_path} is not the checkpoint's")
    if not isinstance(tok, SentencePieceTokenizer):
        return None
    path = tmp / "tokenizer.model"
    path.write_bytes(tok.model)
    return path


def export_to_pretrained(state, model_cfg, out: Path, *, dtype, tokenizer_path, description):
    """Hand the consolidated single-device state dict to the export writer."""
    from switchall.models.pretrained import save_pretrained

    save_pretrained(
        state,
        model_cfg,
        out,
        dtype=dtype,
        tokenizer_path=tokenizer_path,
        max_shard_bytes=5 * 2**30,
        description=description,
    )


def run_export(args: argparse.Namespace) -> int:
    from switchall.checkpoint.consolidate import consolidate
    from switchall.configtools import from_dict
    from switchall.models.config import ModelConfig
    from switchall.pretrain.checkpoint import CheckpointManager

    ckpt = resolve_checkpoint(Path(args.run_dir), args.checkpoint)
    meta = CheckpointManager.read_meta(ckpt)
    model_cfg = replace(from_dict(ModelConfig, meta["model"], prefix="model"), init_from=None)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    state = consolidate(ckpt)
    cfg = meta.get("config") or {}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = _tokenizer_file(cfg, meta, Path(tmp))
        description = (
            f"Trained with switchall for {meta['step']:,} steps (layout {meta['layout']['name']}) "
            f"on {cfg.get('data', {}).get('path')}; exported from {ckpt}."
        )
        export_to_pretrained(
            state,
            model_cfg,
            Path(args.out),
            dtype=dtype,
            tokenizer_path=tokenizer,
            description=description,
        )
    print(f"exported {ckpt} (step {meta['step']:,}) -> {args.out} ({args.dtype})")
    return 0


def register(verbs: argparse._SubParsersAction) -> None:
    c = verbs.add_parser("checkpoint", help="inspect or convert checkpoints")
    sub = c.add_subparsers(dest="checkpoint_verb", required=True, metavar="ACTION")
    i = sub.add_parser("info", help="step, layout, model, data position, sizes, verification")
    i.add_argument("path", help="a checkpoint directory, or a run directory (its latest)")
    i.add_argument("--checkpoint", help="a checkpoint directory (overrides PATH's latest)")
    i.add_argument("--json", action="store_true", help="print one JSON object")
    i.set_defaults(func=run_info)
    v = sub.add_parser("convert", help="rewrite an old per-rank checkpoint in the current format")
    v.add_argument("checkpoint", help="an old-format step_XXXXXXXX directory")
    v.add_argument("--out", help="a checkpoints directory to write into (default: in place)")
    v.set_defaults(func=run_convert)

    e = verbs.add_parser("export", help="a run's checkpoint as a single-device safetensors model")
    e.add_argument("run_dir", help="a run directory written by `switchall pretrain`")
    e.add_argument("--checkpoint", help="a checkpoint directory (default: the latest)")
    e.add_argument("--out", required=True, help="the export directory to write")
    e.add_argument("--dtype", choices=["bf16", "fp32"], default="fp32")
    e.set_defaults(func=run_export)
