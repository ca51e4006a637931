"""Incremental decoding (KV cache over the XL window) against the chunked training forward.

Tolerances: float64 1e-12 (the same arithmetic up to summation order: any position, mask or
window mistake is far larger), float32 2e-5 absolute on logits of magnitude ~1 (observed
<= 2e-6).
"""

from __future__ import annotations

import pytest
import torch

from switchall.models import build_model
from switchall.models.decode import DecodeState
from tests.models.helpers import tiny_config
from tests.models.reference import chunked_logits

VARIANTS = ["transformer", "switchhead", "switchall", "sigma_moe"]
TOL = {torch.float64: 1e-12, torch.float32: 2e-5}
LENGTH = 29  # 3 chunks of 8 and a partial one: the window moves three times


def decode_one_by_one(model, tokens_BN):
    state = DecodeState(model)
    return torch.cat([state.extend(tokens_BN[:, i : i + 1]) for i in range(tokens_BN.shape[1])], 1)


def decode_prompt_then_steps(model, tokens_BN, prompt_len):
    """A prompt longer than a chunk in one call (prefill), then one token at a time."""
    state = DecodeState(model)
    pieces = [state.extend(tokens_BN[:, :prompt_len])]
    pieces += [state.extend(tokens_BN[:, i : i + 1]) for i in range(prompt_len, LENGTH)]
    return torch.cat(pieces, 1)


def model_for(variant, pos, dtype, seed=0, **overrides):
    torch.manual_seed(seed)
    return build_model(tiny_config(variant, pos, **overrides)).to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("pos", ["xl", "rope"])
def test_incremental_equals_full_forward(variant, pos, dtype):
    model = model_for(variant, pos, dtype)
    tokens = torch.randint(0, 50, (2, LENGTH))
    ref = chunked_logits(model, tokens)
    for got in (decode_one_by_one(model, tokens), decode_prompt_then_steps(model, tokens, 19)):
        torch.testing.assert_close(got, ref, rtol=0, atol=TOL[dtype])


@pytest.mark.parametrize("pos", ["xl", "rope"])
@pytest.mark.parametrize("mem_chunks", [0, 2])
def test_window_sizes(pos, mem_chunks):
    """No memory (each chunk on its own) and two chunks of memory move the window correctly."""
    model = model_for("switchall", pos, torch.float64, seed=1, mem_chunks=mem_chunks)
    tokens = torch.randint(0, 50, (1, LENGTH))
    ref = chunked_logits(model, tokens)
    torch.testing.assert_close(decode_one_by_one(model, tokens), ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(decode_prompt_then_steps(model, tokens, 11), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "overrides",
    [{"attention__moe_projections": "vkqo"}, {"attention__n_experts": 1, "attention__k": 1}],
    ids=["moe_qkvo", "gated_dense"],
)
@pytest.mark.parametrize("pos", ["xl", "rope"])
def test_switchhead_special_cases(overrides, pos):
    """Q and K experts (routed per token, cached K) and the gated dense special case."""
    model = model_for("switchhead", pos, torch.float64, seed=2, **overrides)
    tokens = torch.randint(0, 50, (2, LENGTH))
    ref = chunked_logits(model, tokens)
    torch.testing.assert_close(decode_one_by_one(model, tokens), ref, rtol=0, atol=1e-12)


def test_window_is_the_trained_context():
    """With one layer, tokens older than the memory chunk do not influence a token's logits
    (the window is memory + current chunk, as trained), while tokens inside it do. (Deeper
    layers see further back through the memory of lower layers' inputs, as in training.)"""
    model = model_for("switchall", "xl", torch.float64, seed=3, n_layers=1)
    tokens = torch.randint(0, 50, (1, 24))
    base = decode_one_by_one(model, tokens)
    far = tokens.clone()
    far[0, 3] = (far[0, 3] + 1) % 50  # chunk 0: outside the window of chunk 2 (positions 8..23)
    changed = decode_one_by_one(model, far)
    torch.testing.assert_close(changed[:, 16:], base[:, 16:], rtol=0, atol=1e-12)
    assert (changed[:, 8:16] - base[:, 8:16]).abs().max() > 1e-6


def test_decoding_needs_eval_mode():
    model = build_model(tiny_config()).train()
    with pytest.raises(ValueError, match="eval"):
        DecodeState(model)
