"""The XL relative-position bias: the relative-shift fast path equals the gather it replaces,
bit for bit, forward and backward."""

from __future__ import annotations

import pytest
import torch

from switchall.models.positional import xl_position_bias


def _gathered(pos_BHTL: torch.Tensor, mem_len: int) -> torch.Tensor:
    """The definition: key j of query i sits at distance mem_len + i - j; the future is -inf."""
    *_, num_q, num_k = pos_BHTL.shape
    dist_TL = torch.arange(num_q)[:, None] + mem_len - torch.arange(num_k)[None, :]
    bias = pos_BHTL.gather(-1, dist_TL.clamp(min=0).expand_as(pos_BHTL))
    return bias.masked_fill(dist_TL < 0, float("-inf"))


@pytest.mark.parametrize(
    "shape, mem_len",
    [((2, 3, 8, 16), 8), ((1, 2, 5, 5), 0), ((2, 2, 1, 7), 6), ((2, 4, 6, 9), 3), ((3, 4, 6), 2)],
)
def test_relative_shift_equals_the_gather(shape, mem_len):
    pos = torch.randn(*shape, requires_grad=True)
    want, got = _gathered(pos, mem_len), xl_position_bias(pos, mem_len)
    assert torch.equal(got, want)
    cot = torch.randn(want.shape).masked_fill(want.isinf(), 0.0)
    (g_want,) = torch.autograd.grad(want, pos, cot)
    (g_got,) = torch.autograd.grad(got, pos, cot)
    assert torch.equal(g_got, g_want)
