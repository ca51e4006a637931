"""The paper's analyses (spec §9) of any trained model: attention maps and expert selections.

Legend: H heads, T tokens of the analysed text, E experts (per head for SwitchHead).

- Attention maps per layer and head, and their element-wise maximum over heads, on one text
  (the first chunk of the validation split, no XL memory, as the paper's plots): captured by
  swapping the models' `attend` for an explicit softmax during the analysis only.
- Expert selections per layer, head and routing side (SwitchHead V = source, O = destination;
  σ-MoE): how often each expert is chosen over validation batches, and for which tokens (the
  most typical tokens of each expert: highest P(expert | token) among tokens seen often enough),
  through the models' routing-statistics hook.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from switchall.config import RunConfig
from switchall.configtools import ConfigError
from switchall.data_pipeline import read_manifest
from switchall.pretrain.checkpoint import CheckpointManager


@dataclass
class LoadedModel:
    name: str
    model: torch.nn.Module
    cfg: RunConfig
    source: str


def load_model(path: str | Path, data: str | None = None) -> LoadedModel:
    """A trained model: a run directory's latest checkpoint (of any parallel layout), or an
    export directory (`switchall export`) with `data`, the dataset to read its text from (a
    run directory reads its own `data.path`, or `data` when given)."""
    from switchall.config import export_run_config
    from switchall.models.pretrained import CONFIG_NAME, load_pretrained, load_pretrained_tokenizer
    from switchall.pretrain.generate_cli import load_run_model

    path = Path(path)
    if (path / "config.yaml").is_file():
        model, cfg, _ = load_run_model(path)
        if data is not None:
            cfg = replace(cfg, data=replace(cfg.data, path=str(data)))
        ckpt = CheckpointManager(path / "checkpoints").latest()
        return LoadedModel(path.name, model, cfg, str(ckpt))
    if (path / CONFIG_NAME).is_file():
        if data is None:
            raise ConfigError("--data", f"{path} is an export: give the dataset with --data DIR")
        cfg = export_run_config(path, [f"data.path={data}", "logging.wandb=disabled"])
        model, _ = load_pretrained(path)
        tokenizer = load_pretrained_tokenizer(path).info()["sha256"]
        if tokenizer != read_manifest(data).tokenizer.get("sha256"):
            raise ConfigError("--data", f"{data} has another tokenizer than export {path}")
        return LoadedModel(path.name, model, cfg, str(path))
    raise ConfigError("", f"{path}: neither a run directory (config.yaml) nor an export")


def explicit_attend(store: list[torch.Tensor]):
    """`attend` with the same semantics as SDPA there, keeping the probabilities [H, T, L]."""

    def attend(q_BHTD, k_BHLD, v_BHLD, mem_len, bias_BHTL=None, scale=None):
        scale = q_BHTD.shape[-1] ** -0.5 if scale is None else scale
        s_BHTL = (q_BHTD @ k_BHLD.transpose(-1, -2)).float() * scale
        t, n_keys = s_BHTL.shape[-2:]
        if bias_BHTL is not None:
            s_BHTL = s_BHTL + bias_BHTL.float()
        else:
            keep = torch.ones(t, n_keys, dtype=torch.bool, device=s_BHTL.device).tril(mem_len)
            s_BHTL = s_BHTL.masked_fill(~keep, float("-inf"))
        p_BHTL = torch.softmax(s_BHTL, dim=-1)
        store.append(p_BHTL[0].detach().cpu())
        return (p_BHTL.to(v_BHLD.dtype) @ v_BHLD).to(q_BHTD.dtype)

    return attend


@contextlib.contextmanager
def capture_attention(store: list[torch.Tensor]):
    import switchall.models.attention as dense_mod
    import switchall.models.switchhead as sh_mod

    saved = dense_mod.attend, sh_mod.attend
    dense_mod.attend = sh_mod.attend = explicit_attend(store)
    try:
        yield
    finally:
        dense_mod.attend, sh_mod.attend = saved


@torch.no_grad()
def attention_maps(lm: LoadedModel, tokens_T: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, the attention probabilities [H, T, T] of the first chunk (no memory)."""
    store: list[torch.Tensor] = []
    with capture_attention(store):
        lm.model(tokens_T[None])
    return store


def routed_modules(model) -> list[tuple[str, torch.nn.Module, int, int]]:
    from switchall.models.sigma_moe import SigmaMoE
    from switchall.models.switchhead import SwitchHeadAttention

    out = []
    for m in model.modules():
        if isinstance(m, SwitchHeadAttention) and not m.gated_dense:
            out.append((f"attn{m.layer_idx}", m, m.total_heads, m.num_experts))
        elif isinstance(m, SigmaMoE):
            out.append((f"mlp{m.layer_idx}", m, 1, m.num_experts))
    return out


@torch.no_grad()
def expert_selections(lm: LoadedModel, batches: list[torch.Tensor]) -> dict[str, Any]:
    """Counts per (module.side, head, expert), and (token, expert) co-counts per head."""
    counts: dict[str, torch.Tensor] = {}
    by_token: dict[str, list[Counter]] = {}
    last: dict[str, torch.Tensor] = {}  # the latest call's ids [rows, H, K], per key
    current: dict[str, torch.Tensor] = {}
    mods = routed_modules(lm.model)

    def recorder(name, heads, experts):
        def record(side, ids, n):
            key = name if side == "mlp" else f"{name}.{side}"
            ids_XHK = ids.reshape(-1, heads, ids.shape[-1]).cpu() - (
                torch.arange(heads)[None, :, None] * experts
            )
            last[key] = ids_XHK
            c = counts.setdefault(key, torch.zeros(heads, experts, dtype=torch.long))
            for h in range(heads):
                c[h] += torch.bincount(ids_XHK[:, h].reshape(-1), minlength=experts)
            rows = ids_XHK.shape[0]
            toks = current["tokens"]
            if rows != toks.numel():
                return  # source side with memory: no token alignment (not used here)
            per_head = by_token.setdefault(key, [Counter() for _ in range(heads)])
            for h in range(heads):
                for tok, sel in zip(toks.tolist(), ids_XHK[:, h].tolist(), strict=True):
                    per_head[h].update((tok, e) for e in sel)

        return record

    for name, m, heads, experts in mods:
        m.load_recorder = recorder(name, heads, experts)
    try:
        for batch in batches:
            current["tokens"] = batch.reshape(-1)
            lm.model(batch)
    finally:
        for _, m, _, _ in mods:
            m.load_recorder = None
    return {"counts": counts, "by_token": by_token, "last": last}


def typical_tokens(pairs: Counter, experts: int, decode, top: int = 8, min_count: int = 3):
    """Per expert: the tokens with the highest P(expert | token), seen >= min_count times."""
    token_total = Counter()
    for (tok, _), n in pairs.items():
        token_total[tok] += n
    out = []
    for e in range(experts):
        scored = [
            (n / token_total[tok], n, tok)
            for (tok, ee), n in pairs.items()
            if ee == e and token_total[tok] >= min_count
        ]
        scored.sort(reverse=True)
        out.append(
            [
                {"token": decode([tok]), "id": tok, "p_expert_given_token": round(p, 4), "count": n}
                for p, n, tok in scored[:top]
            ]
        )
    return out


def attention_summary(maps: list[torch.Tensor]) -> list[dict[str, Any]]:
    """Per layer: each head's mean attention entropy and distance (in tokens)."""
    out = []
    for layer, p_HTL in enumerate(maps):
        t, n_keys = p_HTL.shape[-2:]
        dist = (torch.arange(t)[:, None] + (n_keys - t) - torch.arange(n_keys)[None]).float()
        ent = -(p_HTL * torch.log(p_HTL.clamp_min(1e-30))).sum(-1).mean(-1)
        out.append(
            {
                "layer": layer,
                "heads": p_HTL.shape[0],
                "entropy": [round(float(v), 4) for v in ent],
                "mean_distance": [
                    round(float(v), 3) for v in (p_HTL * dist.clamp_min(0)).sum(-1).mean(-1)
                ],
            }
        )
    return out


def cross_entropy_of(lm: LoadedModel, batches: list[torch.Tensor], targets) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for inp, tgt in zip(batches, targets, strict=True):
            logits = lm.model(inp).logits_BTV.float()
            total += float(F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), reduction="sum"))
            count += tgt.numel()
    return total / count
