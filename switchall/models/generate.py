"""Sampling text from a language model with incremental decoding (`switchall generate`).

Legend: B batch, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from switchall.models.decode import DecodeState
from switchall.models.lm import LanguageModel


@dataclass
class Generation:
    tokens: list[int]
    """The new tokens (the stop token included when one ended the text)."""
    stop: str
    """"eod" when the model ended the document, "length" at max_new_tokens."""


def sample_next(
    logits_BV: torch.Tensor,
    temperature: float,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row: argmax at temperature 0, else a draw from softmax(logits / T) over
    the `top_k` most likely tokens (all when None)."""
    logits_BV = logits_BV.float()
    if temperature == 0:
        return logits_BV.argmax(-1)
    if top_k is not None and top_k < logits_BV.shape[-1]:
        kth_B1 = logits_BV.topk(top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    probs_BV = torch.softmax(logits_BV / temperature, dim=-1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: LanguageModel,
    prompt: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    vocab_size: int | None = None,
    stop_id: int | None = None,
) -> Generation:
    """Continue `prompt` (token ids, at least one) by up to `max_new_tokens` tokens.

    `vocab_size` (the tokenizer's) keeps the draw off ids the tokenizer cannot decode when the
    model's vocabulary is padded beyond it; `stop_id` ends the text when drawn. Each new token
    costs one position per layer (see `switchall.models.decode`).
    """
    if not prompt:
        raise ValueError("the prompt needs at least one token (e.g. the end-of-document token)")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    device = next(model.parameters()).device
    state = DecodeState(model)
    tokens_1N = torch.tensor([prompt], dtype=torch.long, device=device)
    out: list[int] = []
    if max_new_tokens <= 0:
        return Generation(out, "length")
    logits_1V = state.extend(tokens_1N)[:, -1]
    while True:
        if vocab_size is not None and vocab_size < logits_1V.shape[-1]:
            logits_1V[:, vocab_size:] = float("-inf")
        token = int(sample_next(logits_1V, temperature, top_k, generator).item())
        out.append(token)
        if token == stop_id:
            return Generation(out, "eod")
        if len(out) == max_new_tokens:
            return Generation(out, "length")
        logits_1V = state.extend(torch.tensor([[token]], dtype=torch.long, device=device))[:, -1]
