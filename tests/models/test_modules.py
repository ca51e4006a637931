"""SwitchHead and σ-MoE against naive references written from the spec's equations."""

from __future__ import annotations

import math

import pytest
import torch

from switchall.models.positional import sinusoid_LD
from switchall.models.routing import NoiseContext, expert_dropout_mask, sigmoid_topk
from switchall.models.sigma_moe import SigmaMoE, entropy_from_stats
from switchall.models.switchhead import SwitchHeadAttention
from tests.models.helpers import tiny_config


def naive_switchhead(att: SwitchHeadAttention, xq_TD, xkv_LD, mem_len):
    """Spec §1.3 and §3, one sequence, loops over heads and positions; float64."""
    h_n, e_n, k, dh = att.num_heads, att.num_experts, att.top_k, att.d_head
    t_n, l_n = xq_TD.shape[0], xkv_LD.shape[0]
    c = dh**-0.25
    y_TD = torch.zeros_like(xq_TD)
    for h in range(h_n):
        rows = slice(h * e_n, (h + 1) * e_n)
        s_src_LE = torch.sigmoid(xkv_LD @ att.sel_src[rows].T)
        s_dst_TE = torch.sigmoid(xq_TD @ att.sel_dst[rows].T)
        v_LD = torch.zeros(l_n, dh, dtype=xq_TD.dtype)
        for j in range(l_n):
            for e in s_src_LE[j].topk(k).indices.tolist():
                v_LD[j] += s_src_LE[j, e] * (xkv_LD[j] @ att.v_experts[h * e_n + e])
        wq, wk = att.q.weight[h * dh : (h + 1) * dh], att.k.weight[h * dh : (h + 1) * dh]
        q_TD, k_LD = (xq_TD @ wq.T) * c, (xkv_LD @ wk.T) * c
        kpos_RD = (sinusoid_LD(l_n, xq_TD.shape[1], dtype=xq_TD.dtype) * c) @ att.pos.weight[
            h * dh : (h + 1) * dh
        ].T
        logits_TL = torch.full((t_n, l_n), -math.inf, dtype=xq_TD.dtype)
        for i in range(t_n):
            for j in range(i + mem_len + 1):
                logits_TL[i, j] = q_TD[i] @ k_LD[j] + q_TD[i] @ kpos_RD[i + mem_len - j]
        o_TD = torch.softmax(logits_TL, -1) @ v_LD
        for i in range(t_n):
            for e in s_dst_TE[i].topk(k).indices.tolist():
                y_TD[i] += s_dst_TE[i, e] * (o_TD[i] @ att.o_experts[h * e_n + e])
    return y_TD


@pytest.mark.parametrize("mem_len", [0, 3])
def test_switchhead_matches_spec_equations(mem_len):
    torch.manual_seed(0)
    cfg = tiny_config("switchhead", attention__n_experts=4, attention__k=2)
    att = SwitchHeadAttention(cfg).double().eval()
    t_n = 5
    xkv_BLD = torch.randn(2, mem_len + t_n, 32, dtype=torch.float64)
    out = att(xkv_BLD[:, mem_len:], xkv_BLD, mem_len)
    for b in range(2):
        ref = naive_switchhead(att, xkv_BLD[b, mem_len:], xkv_BLD[b], mem_len)
        torch.testing.assert_close(out[b], ref, rtol=1e-10, atol=1e-10)


def test_switchhead_single_expert_is_gated_dense_attention():
    """E = 1: dense V and O, each head's output scaled by σ(x·w_h) before O (spec §1.4)."""
    torch.manual_seed(1)
    cfg = tiny_config("switchhead", pos="rope", attention__n_experts=1, attention__k=1)
    att = SwitchHeadAttention(cfg).double().eval()
    assert not hasattr(att, "sel_src") and not hasattr(att, "v_experts")
    x_BTD = torch.randn(2, 6, 32, dtype=torch.float64)
    heads = []
    for h in range(2):
        sl = slice(h * 8, (h + 1) * 8)
        q = att.rotary((x_BTD @ att.q.weight[sl].T)[:, None], 0)[:, 0]
        k = att.rotary((x_BTD @ att.k.weight[sl].T)[:, None], 0)[:, 0]
        v = x_BTD @ att.v.weight[sl].T
        logits = (q @ k.transpose(1, 2)) / math.sqrt(8)
        logits = logits.masked_fill(torch.ones(6, 6).triu(1).bool(), -math.inf)
        gate = torch.sigmoid(x_BTD @ att.sel_dst[h])[..., None]
        heads.append(gate * (torch.softmax(logits, -1) @ v))
    ref = torch.cat(heads, -1) @ att.o.weight.T
    torch.testing.assert_close(att(x_BTD, x_BTD, 0), ref, rtol=1e-10, atol=1e-10)


def test_sigma_moe_with_all_experts_is_the_dense_sum():
    torch.manual_seed(2)
    cfg = tiny_config("switchall", moe__k=4)
    moe = SigmaMoE(cfg).double().eval()
    x_BTD = torch.randn(2, 5, 32, dtype=torch.float64)
    y, _ = moe(x_BTD)
    s_BTE = torch.sigmoid(x_BTD @ moe.sel.T)
    ref = sum(s_BTE[..., e, None] * (torch.relu(x_BTD @ moe.w1[e]) @ moe.w2[e]) for e in range(4))
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)


def test_entropy_regulariser_by_hand():
    # Two tokens, two experts: softmax rows (0.5, 0.5) and (e/(1+e), 1/(1+e)).
    logits = torch.tensor([[0.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    p1 = math.e / (1 + math.e)
    pbar = [(0.5 + p1) / 2, (0.5 + 1 - p1) / 2]
    expected = sum(p * math.log(p) for p in pbar)  # = -H(p̄)
    probs = torch.softmax(logits, -1)
    got = entropy_from_stats(probs.sum(0), torch.tensor(2.0, dtype=torch.float64))
    assert abs(got.item() - expected) < 1e-12
    cfg = tiny_config("switchall", d_model=2, moe__n_experts=2, moe__k=1, moe__entropy_reg=0.5)
    moe = SigmaMoE(cfg).double()
    assert abs(moe.regulariser(logits).item() - 0.5 * expected) < 1e-12


def test_sigmoid_topk_gates_are_raw_and_dropout_excludes():
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0]])
    gates, idx = sigmoid_topk(logits, 2)
    assert sorted(idx[0].tolist()) == [0, 3]
    torch.testing.assert_close(
        gates.sort(descending=True).values, torch.sigmoid(torch.tensor([[2.0, 1.0]]))
    )
    drop = torch.tensor([[True, False, False, False]])
    gates, idx = sigmoid_topk(logits, 2, drop)
    assert sorted(idx[0].tolist()) == [2, 3]
    # With only one expert left, the dropped one may be picked but carries no weight.
    drop = torch.tensor([[True, True, True, False]])
    gates, idx = sigmoid_topk(logits, 2, drop)
    assert 3 in idx[0].tolist()
    assert gates[idx == 3].item() == pytest.approx(torch.sigmoid(torch.tensor(1.0)).item())
    assert gates[idx != 3].item() == 0.0


def test_expert_dropout_draws_do_not_depend_on_how_rows_are_split():
    """A batch of 6 rows dropped at once equals rows 0-3 and 4-5 dropped with row offsets."""
    noise = NoiseContext(seed=123, row_offset=0)
    whole = expert_dropout_mask(0.3, (6 * 7, 5), torch.device("cpu"), noise, 1, 7)
    first = expert_dropout_mask(0.3, (4 * 7, 5), torch.device("cpu"), noise, 1, 7)
    second = expert_dropout_mask(
        0.3, (2 * 7, 5), torch.device("cpu"), NoiseContext(123, row_offset=4), 1, 7
    )
    assert torch.equal(whole, torch.cat([first, second]))
    assert 0.2 < whole.float().mean() < 0.4
    other = expert_dropout_mask(0.3, (6 * 7, 5), torch.device("cpu"), NoiseContext(124), 1, 7)
    assert not torch.equal(whole, other)
