"""Exported models: single-device weights in safetensors, config.json, tokenizer, README.

An export directory holds

    config.json                         format name and version, the model config, the weights'
                                        dtype, the tokenizer, and each weight file's size and
                                        sha256 (written last)
    model.safetensors                   all weights; above `max_shard_bytes` instead
    model-00001-of-00003.safetensors …  and model.safetensors.index.json (the Hugging Face
                                        convention: {"metadata": {"total_size"}, "weight_map"})
    tokenizer.model                     the sentencepiece model (byte-level models have none)
    README.md                           what the model is

Tensors are named by the single-device model's `state_dict()` keys, whatever layout trained
it. The directory is written under a temporary name and renamed when complete, so a crash
leaves either the previous export or none. Reading checks everything a model needs: a
missing, corrupt or truncated file, and a missing, unexpected or wrongly shaped tensor, are
`PretrainedError`s naming the file and tensor.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from switchall.configtools import to_dict, validate_tree
from switchall.data_pipeline.tokenizer import (
    BYTE_EOD,
    BYTE_SHA256,
    BYTE_VOCAB,
    ByteTokenizer,
    SentencePieceTokenizer,
)
from switchall.fileio import fsync_dir, write_atomic
from switchall.models.config import ModelConfig
from switchall.models.lm import LanguageModel, build_model
from switchall.models.model_card import model_card
from switchall.models.pretrained_reader import (
    CONFIG_NAME,
    DTYPES,
    FORMAT,
    FORMAT_VERSION,
    INDEX_NAME,
    SAFETENSORS_DTYPES,
    TOKENIZER_NAME,
    WEIGHTS_NAME,
    PretrainedError,
    PretrainedReader,
    check_tensors,
    open_pretrained,
    read_config,
    sha256_file,
)

__all__ = [
    "CONFIG_NAME",
    "FORMAT",
    "FORMAT_VERSION",
    "INDEX_NAME",
    "TOKENIZER_NAME",
    "WEIGHTS_NAME",
    "PretrainedError",
    "PretrainedReader",
    "load_pretrained",
    "load_pretrained_state",
    "load_pretrained_tokenizer",
    "open_pretrained",
    "save_pretrained",
]


def _tokenizer_entry(tokenizer_path: Path | None, cfg: ModelConfig) -> tuple[dict, bytes | None]:
    if tokenizer_path is None:
        if cfg.vocab_size < BYTE_VOCAB:
            raise ValueError(
                f"no tokenizer given, so the tokens are bytes, but vocab_size={cfg.vocab_size} "
                f"< {BYTE_VOCAB}; pass the run's tokenizer.model"
            )
        entry = {"type": "byte", "sha256": BYTE_SHA256, "vocab_size": BYTE_VOCAB}
        return {**entry, "eod_id": BYTE_EOD}, None
    data = Path(tokenizer_path).read_bytes()
    tok = SentencePieceTokenizer(data, str(tokenizer_path))
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(
            f"{tokenizer_path}: vocabulary {tok.vocab_size} > model vocab_size {cfg.vocab_size}"
        )
    return {**tok.info(), "path": TOKENIZER_NAME, "eod_id": tok.eod_id}, data


def _shard_groups(state_dict: dict[str, torch.Tensor], dtype, max_bytes: int) -> list[list[str]]:
    """Consecutive tensors per file, each file at most `max_bytes` of data (a larger tensor
    gets a file of its own)."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, t in state_dict.items():
        nbytes = t.numel() * (dtype if t.is_floating_point() else t.dtype).itemsize
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups


def _prepare_target(out: Path) -> None:
    """Refuse to replace anything but an empty directory or an earlier export."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        try:
            is_export = json.loads((out / CONFIG_NAME).read_text()).get("format") == FORMAT
        except (OSError, ValueError, AttributeError):
            is_export = False
        if not is_export:
            raise PretrainedError(f"{out}: exists and is not a switchall export; not overwriting")


def save_pretrained(
    state_dict: dict[str, torch.Tensor],
    model_cfg: ModelConfig,
    out_dir,
    *,
    dtype: torch.dtype = torch.float32,
    tokenizer_path: Path | None = None,
    max_shard_bytes: int = 5 * 2**30,
    description: str = "",
) -> None:
    """Write an export of `state_dict` (single-device names) to `out_dir`, atomically.

    Floating-point tensors are stored as `dtype` (float32 or bfloat16). `tokenizer_path` is the
    run's sentencepiece `tokenizer.model`, or None for byte-level tokens. `description` goes
    into the README (e.g. the run, step and tokens trained on). The tensors are checked
    against the model `model_cfg` describes before anything is written. An existing export at
    `out_dir` is replaced; any other non-empty path is refused.
    """
    names = {v: k for k, v in DTYPES.items()}
    if dtype not in names:
        raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
    validate_tree(model_cfg)
    check_tensors({n: t.shape for n, t in state_dict.items()}, model_cfg, lambda n: "state_dict")
    tokenizer, tokenizer_bytes = _tokenizer_entry(tokenizer_path, model_cfg)
    out = Path(out_dir)
    _prepare_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        groups = _shard_groups(state_dict, dtype, max_shard_bytes)
        files, weight_map, total = {}, {}, 0
        for i, group in enumerate(groups):
            fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            fname = WEIGHTS_NAME if len(groups) == 1 else fname
            # copy=True: a fresh tensor each, never a view sharing storage (safetensors refuses
            # those); one file's tensors at a time, so the copies stay within max_shard_bytes.
            tensors = {}
            for n in group:
                t = state_dict[n].detach()
                tensors[n] = t.to(
                    "cpu",
                    dtype if t.is_floating_point() else t.dtype,
                    copy=True,
                    memory_format=torch.contiguous_format,
                )
            save_file(tensors, tmp / fname, metadata={"format": "pt"})
            fsync_dir(tmp / fname)
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            files[fname] = {
                "bytes": (tmp / fname).stat().st_size,
                "sha256": sha256_file(tmp / fname),
                "tensors": len(group),
            }
            weight_map.update(dict.fromkeys(group, fname))
            del tensors
        if len(groups) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            write_atomic(tmp / INDEX_NAME, json.dumps(index, indent=1).encode(), sync_dir=False)
        if tokenizer_bytes is not None:
            write_atomic(tmp / TOKENIZER_NAME, tokenizer_bytes, sync_dir=False)
        params = sum(t.numel() for t in state_dict.values())
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": to_dict(model_cfg),
            "dtype": names[dtype],
            "parameters": params,
            "tokenizer": tokenizer,
            "weights": {"index": INDEX_NAME if len(groups) > 1 else None, "files": files},
            "description": description,
        }
        card = model_card(model_cfg, params, names[dtype], tokenizer["type"], files, description)
        write_atomic(tmp / "README.md", card.encode(), sync_dir=False)
        write_atomic(tmp / CONFIG_NAME, json.dumps(config, indent=1).encode(), sync_dir=False)
        fsync_dir(tmp)
        old = out.parent / f".old-{out.name}-{os.getpid()}"
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        fsync_dir(out.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_pretrained_state(path) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Every tensor of an export (in its stored dtype, on the CPU) and its model config.

    Files are verified against their sha256; the tensors must be exactly the model's.
    """
    with open_pretrained(path, verify=True) as reader:
        shapes = {n: reader.shape(n) for n in reader.names()}
        check_tensors(shapes, reader.config, reader.where)
        stored = SAFETENSORS_DTYPES.get(reader.meta.get("dtype"))
        for name in reader.names():
            found = reader.get_slice(name).get_dtype()
            if found != stored:
                raise PretrainedError(
                    f"{reader.where(name)}: tensor {name!r} is {found}, {CONFIG_NAME} says "
                    f"{reader.meta.get('dtype')!r}"
                )
        state = {n: reader.get_tensor(n) for n in reader.names()}
        return state, reader.config


def load_pretrained(path, device="cpu") -> tuple[LanguageModel, ModelConfig]:
    """Build the model of an export and load its weights strictly; returned in eval mode, in
    float32 (bfloat16 weights are widened exactly)."""
    state, cfg = load_pretrained_state(path)
    with torch.device("meta"):  # every parameter is overwritten: skip the random init
        model = build_model(cfg)
    model = model.to_empty(device=device)
    model.load_state_dict(state, strict=True)
    return model.eval(), cfg


def load_pretrained_tokenizer(path) -> ByteTokenizer | SentencePieceTokenizer:
    """The tokenizer an export names: its `tokenizer.model` (hash-checked) or bytes."""
    path = Path(path)
    info = read_config(path)["tokenizer"]
    if info.get("type") == "byte":
        return ByteTokenizer()
    if info.get("type") != "sentencepiece":
        raise PretrainedError(f"{path / CONFIG_NAME}: unknown tokenizer type {info.get('type')!r}")
    tok_path = path / str(info.get("path", TOKENIZER_NAME))
    try:
        data = tok_path.read_bytes()
    except OSError as e:
        raise PretrainedError(f"{tok_path}: unreadable tokenizer ({e})") from None
    if hashlib.sha256(data).hexdigest() != info.get("sha256"):
        raise PretrainedError(f"{tok_path}: sha256 differs from {CONFIG_NAME}; corrupt or replaced")
    return SentencePieceTokenizer(data, str(tok_path))
