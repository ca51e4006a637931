"""The README.md of an export: what the model is, in a few lines a person can read."""

from __future__ import annotations

from switchall.models.config import ModelConfig

_VARIANTS = {
    "transformer": "dense Transformer (the parameter-matched baseline)",
    "switchhead": "SwitchHead attention (mixture-of-experts V/O projections) + dense MLP",
    "switchall": "SwitchAll: SwitchHead attention + σ-MoE MLP",
    "sigma_moe": "dense attention + σ-MoE MLP",
}


def _attention(cfg: ModelConfig) -> str:
    a = cfg.attention
    heads = f"{a.n_heads} heads × {a.d_head}"
    if not cfg.uses_switchhead:
        return f"dense multi-head, {heads}"
    if a.n_experts == 1:
        return f"SwitchHead (gated dense special case), {heads}"
    return (
        f"SwitchHead, {heads}, {a.n_experts} experts per head, top-{a.k}, "
        f"expert projections {a.moe_projections!r}"
    )


def _mlp(cfg: ModelConfig) -> str:
    if cfg.uses_sigma_moe:
        m = cfg.moe
        return f"σ-MoE, {m.n_experts} experts × {m.expert_size}, top-{m.k}"
    return f"dense, d_ff {cfg.mlp.d_ff}"


def _positions(cfg: ModelConfig) -> str:
    if cfg.pos_encoding == "xl":
        return "Transformer-XL relative (sinusoidal distances)"
    a = cfg.attention
    return f"RoPE on {a.rope_fraction:g} of each head's channels (base {a.rope_base:g})"


def _context(cfg: ModelConfig) -> str:
    t, m = cfg.seq_len, cfg.mem_len
    if m == 0:
        return f"chunks of {t} tokens, no memory (a token sees 1 to {t} tokens)"
    return (
        f"chunks of {t} tokens + {cfg.mem_chunks} chunk(s) of XL memory "
        f"(a token sees {m + 1} to {m + t} tokens)"
    )


def model_card(
    cfg: ModelConfig,
    params: int,
    dtype: str,
    tokenizer: str,
    files: dict[str, dict],
    description: str,
) -> str:
    weights = ", ".join(files) if len(files) <= 3 else f"{len(files)} shards (see the index)"
    tok = "sentencepiece, tokenizer.model" if tokenizer == "sentencepiece" else "byte tokens"
    rows = [
        ("variant", f"`{cfg.variant}`: {_VARIANTS[cfg.variant]}"),
        ("parameters", f"{params:,}"),
        ("layers × width", f"{cfg.n_layers} × {cfg.d_model}"),
        ("attention", _attention(cfg)),
        ("MLP", _mlp(cfg)),
        ("positions", _positions(cfg)),
        ("context", _context(cfg)),
        ("vocabulary", f"{cfg.vocab_size:,} ({tok})"),
        ("weights", f"{dtype}, {weights}"),
    ]
    lines = [
        f"# {cfg.variant} language model ({params / 1e6:.2f}M parameters)",
        "",
        "Exported by switchall (single-device tensor names; the model config is in `config.json`).",
        "",
        "| | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in rows),
        "",
    ]
    if description:
        lines += [description.strip(), ""]
    lines += [
        "```python",
        "from switchall.models import load_pretrained",
        'model, cfg = load_pretrained("THIS_DIR")',
        "```",
        "",
        '`switchall generate THIS_DIR --prompt "..."` samples text from it.',
        "",
    ]
    return "\n".join(lines)
