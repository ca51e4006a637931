"""Language-model level properties: causality, XL memory, gradients, parameter layout."""

from __future__ import annotations

import pytest
import torch

from switchall.models import build_model
from tests.models.helpers import tiny_config

VARIANTS = ["transformer", "switchhead", "switchall", "sigma_moe"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("pos", ["xl", "rope"])
def test_causal_with_memory(variant, pos):
    """Changing token t+1 changes no output at positions <= t, with and without memory.

    float64, because the token change regroups rows per expert, which changes matmul blocking
    and so float32 rounding (~1e-7) even at unaffected positions.
    """
    torch.manual_seed(0)
    model = build_model(tiny_config(variant, pos)).double().eval()
    tokens = torch.randint(0, 50, (2, 8))
    first = model(tokens)
    for memory in (None, first.memory):
        base = model(tokens, memory).logits_BTV
        for t in (0, 3, 6):
            changed = tokens.clone()
            changed[:, t + 1] = (changed[:, t + 1] + 7) % 50
            out = model(changed, memory).logits_BTV
            torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-12)
            assert (out[:, t + 1] - base[:, t + 1]).abs().max() > 1e-4


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("pos", ["xl", "rope"])
def test_xl_memory_equals_full_sequence(variant, pos):
    """Two chunks with one chunk of memory equal one pass over both chunks.

    With mem_len = T, the second chunk's queries see all of the first chunk plus a causal view
    of their own; a single pass over the 2T tokens with no memory gives every query exactly the
    same keys at the same relative distances.
    """
    torch.manual_seed(1)
    cfg = tiny_config(variant, pos)
    model = build_model(cfg).eval()
    tokens = torch.randint(0, 50, (3, 16))
    first = model(tokens[:, :8])
    second = model(tokens[:, 8:], first.memory)
    chunked = torch.cat([first.logits_BTV, second.logits_BTV], dim=1)
    full_cfg = tiny_config(variant, pos, seq_len=16, mem_chunks=0)
    full = build_model(full_cfg).eval()
    full.load_state_dict(model.state_dict())
    torch.testing.assert_close(chunked, full(tokens).logits_BTV, rtol=1e-5, atol=1e-5)


def test_memory_is_detached_layer_input():
    torch.manual_seed(2)
    model = build_model(tiny_config("switchall")).train()
    tokens = torch.randint(0, 50, (2, 8))
    out = model(tokens)
    assert len(out.memory) == 2
    assert all(not m.requires_grad and m.shape == (2, 8, 32) for m in out.memory)
    # Layer 0's input is the embedding of the chunk (dropout is 0 in this config).
    torch.testing.assert_close(out.memory[0], model.embedding(tokens).detach())


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_parameter_gets_a_gradient(variant):
    torch.manual_seed(3)
    model = build_model(tiny_config(variant)).train()
    out = model(torch.randint(0, 50, (2, 8)))
    out = model(torch.randint(0, 50, (2, 8)), out.memory)
    (out.logits_BTV.logsumexp(-1).mean() + out.aux_loss).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing


def test_routing_weights_receive_gradient_through_gates():
    """Top-k is discrete; the routers learn only through the sigmoid gate values."""
    torch.manual_seed(4)
    model = build_model(tiny_config("switchall")).train()
    model(torch.randint(0, 50, (2, 8))).logits_BTV.square().mean().backward()
    block = model.blocks[0]
    for p in (block.attn.sel_src, block.attn.sel_dst, block.mlp.sel):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_no_memory_without_xl_chunks():
    model = build_model(tiny_config("transformer", "rope", mem_chunks=0))
    assert model(torch.randint(0, 50, (1, 8))).memory is None


def test_init_routing_rows_have_equal_norms():
    model = build_model(tiny_config("switchall", n_layers=4))
    for block in model.blocks:
        for w in (block.attn.sel_src, block.attn.sel_dst, block.mlp.sel):
            norms = w.detach().norm(dim=1)
            torch.testing.assert_close(norms, norms.mean().expand_as(norms))
    # σ-MoE W2 fan-in is all experts' width (spec §4): std = sqrt(2/n_layers)/sqrt(N_E*G).
    w2 = torch.cat([b.mlp.w2.detach().flatten() for b in model.blocks])
    assert abs(w2.std().item() / ((2 / 4) ** 0.5 / (4 * 8) ** 0.5) - 1) < 0.1


@pytest.mark.parametrize("variant", ["transformer", "switchall"])
def test_dropout_sites_and_rate(variant):
    """Spec §8 (../shared/docs/switchhead_spec.md): dropout at the embeddings, the attention
    output, the MLP hidden layer (dense MLP only), the MLP output and before the output layer,
    all at model.dropout. Each site is seen zeroing about that fraction in training mode."""
    p = 0.3
    torch.manual_seed(0)
    model = build_model(tiny_config(variant, dropout=p, d_model=64, mlp__d_ff=256)).train()
    zeroed: dict[str, list[float]] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout):

            def record(m, args, out, name=name):
                live = args[0] != 0  # after the MLP's ReLU, half the inputs are 0 already
                zeroed.setdefault(name, []).append((out[live] == 0).float().mean().item())

            module.register_forward_hook(record)
    model(torch.randint(0, 50, (8, 8)))
    calls = {name: len(v) for name, v in zeroed.items()}
    want = {"drop": 2}  # embeddings, before the output layer
    for i in range(2):
        want[f"blocks.{i}.drop"] = 2  # attention output, MLP output
        if variant == "transformer":
            want[f"blocks.{i}.mlp.drop"] = 1  # MLP hidden
    assert calls == want
    fractions = [f for v in zeroed.values() for f in v]
    assert all(abs(f - p) < 0.1 for f in fractions), zeroed
