from __future__ import annotations

import math

import pytest

from switchall.pretrain.config import OptimConfig
from switchall.pretrain.schedule import lr_at


def test_warmup_then_cosine():
    cfg = OptimConfig(lr=1.0, warmup_steps=4, min_lr=0.1)
    assert [lr_at(s, cfg, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, cfg, 14) == pytest.approx(1.0)
    assert lr_at(9, cfg, 14) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(14, cfg, 14) == pytest.approx(0.1)
    assert lr_at(100, cfg, 14) == pytest.approx(0.1)


def test_paper_schedule_never_reaches_zero():
    """Paper: T_max = 100k stepped with (step - warmup), so 100k steps end just above 0."""
    cfg = OptimConfig(lr=2.5e-4, warmup_steps=4000, cosine_steps=100_000)
    assert lr_at(0, cfg, 100_000) == pytest.approx(2.5e-4 / 4000)
    assert lr_at(99_999, cfg, 100_000) > 0
    assert lr_at(4000, cfg, 100_000) == pytest.approx(2.5e-4)
