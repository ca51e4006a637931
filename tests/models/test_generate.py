"""Sampling with incremental decoding: greedy, top-k, seeds, stop token, vocabulary limit.

The references re-run the chunked training forward over the whole sequence for every new
token (no cache), in float64 so that draws from the two agree exactly.
"""

from __future__ import annotations

import pytest
import torch

from switchall.models import build_model
from switchall.models.generate import generate, sample_next
from tests.models.helpers import tiny_config
from tests.models.reference import chunked_logits

PROMPT = [0, 5, 9, 13, 2, 7, 41, 3, 3, 18, 22]  # longer than a chunk (seq_len 8)
NEW = 20


@pytest.fixture(params=[("switchall", "xl"), ("transformer", "rope")], ids=lambda p: "-".join(p))
def model(request):
    torch.manual_seed(0)
    return build_model(tiny_config(*request.param)).double().eval()


def reference(model, n, temperature, top_k=None, generator=None):
    seq = list(PROMPT)
    for _ in range(n):
        logits = chunked_logits(model, torch.tensor([seq]))[:, -1]
        seq.append(int(sample_next(logits, temperature, top_k, generator).item()))
    return seq[len(PROMPT) :]


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def test_greedy_matches_full_forward_and_is_deterministic(model):
    first = generate(model, PROMPT, NEW, temperature=0)
    assert first.tokens == reference(model, NEW, 0) and first.stop == "length"
    assert generate(model, PROMPT, NEW, temperature=0).tokens == first.tokens


def test_top_k_1_is_greedy(model):
    greedy = generate(model, PROMPT, NEW, temperature=0).tokens
    assert generate(model, PROMPT, NEW, temperature=1.0, top_k=1, generator=seeded(3)).tokens == (
        greedy
    )


def test_seeded_sample_is_reproducible_and_from_the_model(model):
    a = generate(model, PROMPT, NEW, temperature=1.0, generator=seeded(7)).tokens
    assert a == generate(model, PROMPT, NEW, temperature=1.0, generator=seeded(7)).tokens
    assert a == reference(model, NEW, 1.0, generator=seeded(7))
    assert a != generate(model, PROMPT, NEW, temperature=1.0, generator=seeded(8)).tokens


def test_top_k_draws_only_among_the_k_best(model):
    got = generate(model, PROMPT, NEW, temperature=2.0, top_k=3, generator=seeded(1)).tokens
    seq, generator = list(PROMPT), seeded(1)
    for _ in range(NEW):
        logits = chunked_logits(model, torch.tensor([seq]))[:, -1]
        token = int(sample_next(logits, 2.0, 3, generator).item())
        assert token in logits[0].topk(3).indices.tolist()
        seq.append(token)
    assert got == seq[len(PROMPT) :] and len(set(got)) > 1


def test_stop_token_and_vocabulary_limit(model):
    greedy = generate(model, PROMPT, NEW, temperature=0).tokens
    stopped = generate(model, PROMPT, NEW, temperature=0, stop_id=greedy[4])
    first = greedy.index(greedy[4])
    assert stopped.tokens == greedy[: first + 1] and stopped.stop == "eod"
    hot = generate(model, PROMPT, 40, temperature=3.0, generator=seeded(0), vocab_size=10)
    assert all(t < 10 for t in hot.tokens) and len(hot.tokens) == 40
    assert generate(model, PROMPT, 0).tokens == []


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [], 3)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, PROMPT, 3, temperature=-1)
    with pytest.raises(ValueError, match="top_k"):
        generate(model, PROMPT, 3, top_k=0)
