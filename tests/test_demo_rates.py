"""`make demo`'s step-time and tokens/s rows: totals over the same steady-state windows."""

from __future__ import annotations

import pytest

from switchall.demo import steady_state


def test_rates_are_totals_over_the_steady_windows():
    history = [
        {"step": 0, "val_loss": 9.0},
        {"step": 25, "step_time": 0.9, "tokens_per_s": 1024 / 0.9},  # warm-up window: left out
        {"step": 50, "step_time": 0.2, "tokens_per_s": 1024 / 0.2},
        {"step": 75, "step_time": 0.4, "tokens_per_s": 1024 / 0.4},
        {"step": 80, "step_time": 0.1, "tokens_per_s": 1024 / 0.1},  # a short last window
        {"step": 80, "val_loss": 5.0},
    ]
    step_time, tokens_per_s = steady_state(history, tokens_per_step=1024)
    seconds = 25 * 0.2 + 25 * 0.4 + 5 * 0.1
    assert step_time == pytest.approx(seconds / 55)
    assert tokens_per_s == pytest.approx(1024 * 55 / seconds)
    # The two rows agree with each other (the old per-window averages did not: 0.233 s and
    # 5,973 tok/s here, where 1024 / 0.233 = 4,389).
    assert tokens_per_s * step_time == pytest.approx(1024)


def test_a_single_window_is_used_whole():
    assert steady_state([{"step": 10, "step_time": 0.5}], 100) == pytest.approx((0.5, 200.0))
    with pytest.raises(ValueError, match="no logged training steps"):
        steady_state([{"step": 0, "val_loss": 1.0}], 100)
