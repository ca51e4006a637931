"""The learning-rate schedule against values computed by hand from its definition (spec §8 of
../shared/docs/switchhead_spec.md: linear warmup lr·(step+1)/warmup, then CosineAnnealingLR
stepped with (step − warmup), eta_min = min_lr, held at min_lr after T_max)."""

from __future__ import annotations

import math

import pytest

from switchall.pretrain.config import OptimConfig
from switchall.pretrain.schedule import lr_at


def cosine(lr: float, min_lr: float, t: int, t_max: int) -> float:
    """CosineAnnealingLR's closed form, written out here independently of the code."""
    return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * t / t_max)) / 2


def test_warmup_then_cosine_over_the_rest_of_training():
    cfg = OptimConfig(lr=1.0, warmup_steps=4, min_lr=0.1)
    assert [lr_at(s, cfg, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    # cosine_steps unset: T_max = 14 - 4 = 10. Step 9 is half way: 0.1 + 0.9 / 2 = 0.55.
    assert lr_at(4, cfg, 14) == pytest.approx(1.0)
    assert lr_at(9, cfg, 14) == pytest.approx(0.55)
    assert lr_at(6, cfg, 14) == pytest.approx(cosine(1.0, 0.1, 2, 10))
    assert lr_at(14, cfg, 14) == pytest.approx(0.1)
    assert lr_at(100, cfg, 14) == pytest.approx(0.1)


def test_cosine_steps_sets_t_max_and_the_rate_holds_after_it():
    """T_max = cosine_steps, independent of train.steps; past its end the rate stays min_lr."""
    cfg = OptimConfig(lr=1.0, warmup_steps=2, cosine_steps=8, min_lr=0.2)
    total = 1000  # far longer than the cosine: T_max must not follow it
    assert lr_at(2, cfg, total) == pytest.approx(1.0)
    assert lr_at(6, cfg, total) == pytest.approx(0.6)  # half way: 0.2 + 0.8 / 2
    assert lr_at(4, cfg, total) == pytest.approx(0.2 + 0.8 * (1 + math.sqrt(0.5)) / 2)
    assert lr_at(9, cfg, total) == pytest.approx(cosine(1.0, 0.2, 7, 8))
    assert [lr_at(s, cfg, total) for s in (10, 11, 500, 999)] == pytest.approx([0.2] * 4)


def test_paper_schedule_never_reaches_zero():
    """Paper: T_max = 100k stepped with (step - warmup), so 100k steps end just above 0."""
    cfg = OptimConfig(lr=2.5e-4, warmup_steps=4000, cosine_steps=100_000)
    assert lr_at(0, cfg, 100_000) == pytest.approx(2.5e-4 / 4000)
    assert lr_at(4000, cfg, 100_000) == pytest.approx(2.5e-4)
    # The last step is t = 99_999 - 4000 = 95_999 of 100_000: cos(0.95999 π) ≈ -0.99210.
    last = 2.5e-4 * (1 + math.cos(math.pi * 0.95999)) / 2
    assert last == pytest.approx(9.87e-7, rel=1e-3)
    assert lr_at(99_999, cfg, 100_000) == pytest.approx(last, rel=1e-12)
