"""The reference incremental decoding must match: the chunked forward of training and eval."""

from __future__ import annotations

import torch


@torch.no_grad()
def chunked_logits(model, tokens_BN: torch.Tensor) -> torch.Tensor:
    """Logits of `tokens_BN` as training and `switchall evaluate` compute them: chunks of
    seq_len tokens from the first, XL memory carried from chunk to chunk (starting empty)."""
    t, memory, pieces = model.cfg.seq_len, None, []
    for start in range(0, tokens_BN.shape[1], t):
        out = model(tokens_BN[:, start : start + t], memory)
        memory = out.memory
        pieces.append(out.logits_BTV)
    return torch.cat(pieces, dim=1)
