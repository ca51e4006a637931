"""Incremental decoding: a per-layer key/value cache over the XL memory window.

Legend: B batch, N tokens of one call, L keys in the window, R distances (M + T), H heads,
Dh head width, D model width, V vocabulary; T = seq_len (a chunk), M = mem_chunks * T.

What a token sees is exactly what it sees in training and in `switchall evaluate`: the sequence
is cut into chunks of T tokens from its first token, and a token of chunk c attends to the M
tokens before the chunk (XL memory) and causally to its own chunk, so to between M + 1 and
M + T tokens. Incremental logits therefore equal those of `model(chunk, memory)` over the same
sequence with the memory carried chunk to chunk (tests/models/test_decode.py). Positions beyond
that window never occur; the model was not trained on them.

The cache holds, per layer, K and V of the window (memory + current chunk so far). A token's K
and V depend only on its own layer input, so each is computed once, and a new token costs one
position per layer plus attention over the window. When a chunk is full the window drops its
oldest tokens so that M remain, as Transformer-XL's memory does.

Positions are those of the training forward, in the window's frame (the oldest memory token at
0, the current chunk's first query at M): XL biases use the distance query - key; RoPE rotates
each key at its window position and, when the window moves, re-rotates the kept keys once, so a
new query sits at its own position (never at 0) and every cached key at its own.

The training forward is untouched; this path re-implements its attention on the module's own
parameters and is checked against it for every variant and both position encodings.
"""

from __future__ import annotations

import torch

from switchall.kernels import cvmm
from switchall.models.attention import DenseAttention, attend, heads_first
from switchall.models.lm import LanguageModel
from switchall.models.positional import sinusoid_LD, xl_position_bias
from switchall.models.routing import routing_logits
from switchall.models.switchhead import _DST, _SRC, SwitchHeadAttention


class LayerCache:
    """K (before RoPE), V and the keys attention uses (rotated for RoPE) of one layer's window,
    in buffers of the window's full size so that appending copies only the new rows."""

    def __init__(self, capacity: int):
        self.capacity, self.len = capacity, 0
        self.k_BHLD = self.v_BHLD = self.kr_BHLD = None

    def append(self, k_BHND: torch.Tensor, v_BHND: torch.Tensor, kr_BHND: torch.Tensor) -> None:
        n = k_BHND.shape[2]
        if self.k_BHLD is None:
            shape = (*k_BHND.shape[:2], self.capacity, k_BHND.shape[3])
            self.k_BHLD = k_BHND.new_empty(shape)
            self.v_BHLD = v_BHND.new_empty((*shape[:3], v_BHND.shape[3]))
            self.kr_BHLD = self.k_BHLD if kr_BHND is k_BHND else k_BHND.new_empty(shape)
        if self.len + n > self.capacity or k_BHND.shape[0] != self.k_BHLD.shape[0]:
            raise ValueError("decode cache overflow or batch size changed mid-sequence")
        end = self.len + n
        self.k_BHLD[:, :, self.len : end] = k_BHND
        self.v_BHLD[:, :, self.len : end] = v_BHND
        if self.kr_BHLD is not self.k_BHLD:
            self.kr_BHLD[:, :, self.len : end] = kr_BHND
        self.len = end

    def drop_oldest(self, count: int, rerotate) -> None:
        """Forget the `count` oldest tokens; `rerotate(k)` gives the kept keys' new rotation."""
        if self.k_BHLD is None or count <= 0:
            return
        keep = self.len - count
        for buf in (self.k_BHLD, self.v_BHLD):
            buf[:, :, :keep] = buf[:, :, count : self.len].clone()
        if self.kr_BHLD is not self.k_BHLD:
            self.kr_BHLD[:, :, :keep] = rerotate(self.k_BHLD[:, :, :keep])
        self.len = keep

    def keys(self) -> torch.Tensor:
        return self.kr_BHLD[:, :, : self.len]

    def values(self) -> torch.Tensor:
        return self.v_BHLD[:, :, : self.len]


def _qkv(attn, h_BND: torch.Tensor):
    """Q, K, V of the new tokens as their module's forward computes them; the destination
    route (SwitchHead's O experts) is returned for the output projection."""
    if isinstance(attn, DenseAttention):
        n_h = attn.num_heads
        q, k, v = (heads_first(lin(h_BND), n_h) for lin in (attn.q, attn.k, attn.v))
        return q, k, v, None
    src = attn._route(h_BND, attn.sel_src, _SRC, None) if attn.routes_src else None
    dst = None
    if attn.routes_dst and not attn.gated_dense:
        dst = attn._route(h_BND, attn.sel_dst, _DST, None)
    q = attn._project(h_BND, "q", dst) * attn.qk_scale
    k = attn._project(h_BND, "k", src) * attn.qk_scale
    return q, k, attn._project(h_BND, "v", src), dst


def _distance_table(attn, rows: int, h_BND: torch.Tensor) -> torch.Tensor:
    """The projected sinusoid of every distance 0..rows-1, [H, R, Dh] (computed once)."""
    d = h_BND.shape[-1]
    pe_RD = sinusoid_LD(rows, d, h_BND.device, torch.promote_types(h_BND.dtype, torch.float32))
    if isinstance(attn, SwitchHeadAttention):
        pe_RD = pe_RD * attn.qk_scale
    return attn.pos(pe_RD.to(h_BND.dtype)).view(rows, attn.num_heads, -1).transpose(0, 1)


def _attend(attn, q_BHND, k_BHLD, v_BHLD, first: int, table_HRD) -> torch.Tensor:
    """Attention of queries at window positions first.. over the window's keys."""
    dense = isinstance(attn, DenseAttention)
    if not attn.xl:
        q_BHND = attn.rotary(q_BHND, offset=first)
        return attend(q_BHND, k_BHLD, v_BHLD, first, scale=None if dense else 1.0)
    kpos_HLD = table_HRD[:, : k_BHLD.shape[2]]
    if not dense:
        bias_BHNL = xl_position_bias(q_BHND @ kpos_HLD.transpose(-1, -2), first)
        return attend(q_BHND, k_BHLD, v_BHLD, first, bias_BHNL, scale=1.0)
    pos_BHNL = (q_BHND + attn.v_HD[:, None].to(q_BHND.dtype)) @ kpos_HLD.transpose(-1, -2)
    scale = attn.scale.to(q_BHND.dtype)
    bias_BHNL = xl_position_bias(pos_BHNL * scale, first)
    q_c = (q_BHND + attn.u_HD[:, None].to(q_BHND.dtype)) * scale
    return attend(q_c, k_BHLD, v_BHLD, first, bias_BHNL, scale=1.0)


def _output(attn, out_BHND: torch.Tensor, h_BND: torch.Tensor, dst) -> torch.Tensor:
    b, n, d = h_BND.shape
    out_BNHD = out_BHND.transpose(1, 2)
    if isinstance(attn, DenseAttention):
        return attn.o(out_BNHD.reshape(b, n, -1))
    if attn.gated_dense:
        gate_BNH = torch.sigmoid(routing_logits(h_BND, attn.sel_dst))
        out_BNHD = out_BNHD * gate_BNH[..., None].to(out_BNHD.dtype)
    if "o" not in attn.moe:
        return attn.o(out_BNHD.reshape(b, n, -1))
    y_XD = cvmm(
        out_BNHD.reshape(b * n, attn.num_heads, attn.d_head), dst.sel, attn.o_experts, dst.gates_XHK
    )
    return y_XD.view(b, n, d)


class DecodeState:
    """One batch of sequences being decoded: feed tokens with `extend`, get their logits."""

    def __init__(self, model: LanguageModel):
        if model.training:
            raise ValueError("decode with the model in eval mode (dropout off): model.eval()")
        self.model, cfg = model, model.cfg
        self.chunk, self.mem = cfg.seq_len, cfg.mem_len
        self.pos = 0
        """Tokens consumed so far."""
        self.start = 0
        """Position (in the sequence) of the window's oldest token."""
        self.caches = [LayerCache(self.mem + self.chunk) for _ in model.blocks]
        self.tables: list[torch.Tensor | None] = [None] * len(model.blocks)

    @torch.no_grad()
    def extend(self, tokens_BN: torch.Tensor) -> torch.Tensor:
        """Append tokens to every sequence; returns their logits [B, N, V]."""
        pieces, i, total = [], 0, tokens_BN.shape[1]
        if total == 0:
            raise ValueError("extend needs at least one token")
        while i < total:
            if self.pos % self.chunk == 0:
                self._move_window()
            n = min(total - i, self.chunk - self.pos % self.chunk)
            pieces.append(self._step(tokens_BN[:, i : i + n]))
            i += n
            self.pos += n
        return torch.cat(pieces, dim=1)

    def _move_window(self) -> None:
        """At a chunk boundary: keep the last M tokens as memory (none while mem_chunks=0)."""
        start = max(0, self.pos - self.mem)
        for block, cache in zip(self.model.blocks, self.caches, strict=True):
            attn = block.attn
            cache.drop_oldest(start - self.start, lambda k, a=attn: a.rotary(k, offset=0))
        self.start = start

    def _step(self, tokens_BN: torch.Tensor) -> torch.Tensor:
        """Tokens that fit in the current chunk, through every layer."""
        first = self.pos - self.start
        x_BND = self.model.embedding(tokens_BN)
        for i, (block, cache) in enumerate(zip(self.model.blocks, self.caches, strict=True)):
            attn = block.attn
            h_BND = block.ln1(x_BND)
            q_BHND, k_BHND, v_BHND, dst = _qkv(attn, h_BND)
            kr_BHND = k_BHND if attn.xl else attn.rotary(k_BHND, offset=first)
            cache.append(k_BHND, v_BHND, kr_BHND)
            if attn.xl and self.tables[i] is None:
                self.tables[i] = _distance_table(attn, cache.capacity, h_BND)
            out_BHND = _attend(attn, q_BHND, cache.keys(), cache.values(), first, self.tables[i])
            x_BND = x_BND + _output(attn, out_BHND, h_BND, dst)
            y_BND, _ = block.mlp(block.ln2(x_BND), None)
            x_BND = x_BND + y_BND
        return self.model.output(self.model.ln_f(x_BND))
