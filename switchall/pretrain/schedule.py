"""Learning-rate schedule: linear warmup, then cosine decay (spec §8)."""

from __future__ import annotations

import math

from switchall.pretrain.config import OptimConfig


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate used by optimiser step `step` (0-based).

    Warmup: lr * (step + 1) / warmup_steps. Afterwards cosine from lr to min_lr over
    `cosine_steps` (default: the steps left after warmup), evaluated at (step - warmup) like
    the paper's CosineAnnealingLR, and held at min_lr past its end.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = cfg.cosine_steps if cfg.cosine_steps is not None else total_steps - cfg.warmup_steps
    t = min(step - cfg.warmup_steps, max(span, 1)) / max(span, 1)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * t))
