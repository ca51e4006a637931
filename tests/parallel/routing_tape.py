"""Record or replay every top-k routing decision of a training run, in global coordinates.

Top-k routing is a discontinuous function of its logits: when the k-th and (k+1)-th logits of a
row are within fp32 rounding of each other (a near-tie), a layout whose reductions run in
another order (a row-parallel all-reduce, a gated sum over k in another order) can pick the
other expert, and from then on the runs differ by the effect of that one choice, not by
rounding. The demo-size parity test uses this tape to tell the two apart:
- `record`: every routing call of a training forward stores its fp32 logits and the selected
  expert ids, placed at this rank's global rows (data-parallel slice) and heads
  (tensor-parallel slice), so tapes of different layouts line up entry by entry;
- `replay`: every routing call takes its expert ids from a recorded tape (the gates are still
  this run's own sigmoids of its own logits), so the layouts are compared with the discrete
  choices pinned and only rounding left.

Keys are "step/layer/side": side `src` and `dst` for SwitchHead, `moe` for σ-MoE. Only training
forwards (module.training) are taped; validation is not. Needs `train.grad_accum=1` and no
expert dropout (dropped experts would need their own bookkeeping).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from pathlib import Path

import torch

import switchall.models.sigma_moe as sigma_moe_mod
import switchall.models.switchhead as switchhead_mod
from switchall.models.routing import sigmoid_topk

_SIDES = {1: "src", 2: "dst"}  # switchhead._SRC, switchhead._DST


class RoutingTape:
    def __init__(self, mode: str, row_offset: int = 0, reference: dict | None = None):
        """`row_offset`: global index of this rank's first batch row (dp_rank * local rows)."""
        if mode not in ("record", "replay"):
            raise ValueError(mode)
        if mode == "replay" and reference is None:
            raise ValueError("replay needs a recorded reference tape")
        self.mode, self.row_offset, self.reference = mode, row_offset, reference
        self.entries: dict[str, dict] = {}
        self._calls: dict[tuple[int, str], int] = defaultdict(int)
        self._where: dict | None = None

    # ------------------------------------------------------------------ placement
    def _key(self, layer: int, side: str) -> str:
        step = self._calls[(layer, side)]
        self._calls[(layer, side)] += 1
        return f"{step}/{layer}/{side}"

    def _topk(self, logits_XE: torch.Tensor, k: int, drop_XE: torch.Tensor | None = None):
        where = self._where
        if where is None:  # validation forward, or a routing call outside a patched module
            return sigmoid_topk(logits_XE, k, drop_XE)
        if drop_XE is not None:
            raise ValueError("the routing tape does not support expert dropout")
        b, heads, head_offset = where["batch_rows"], where["heads"], where["head_offset"]
        num_e = logits_XE.shape[-1]
        # Rows are batch-major: [b, positions, heads] for SwitchHead, [b, positions] for σ-MoE.
        view = (b, -1, heads, num_e)
        rows = slice(self.row_offset, self.row_offset + b)
        cols = slice(head_offset, head_offset + heads)
        if self.mode == "replay":
            ref_idx = self.reference[where["key"]]["idx"][rows, :, cols]
            idx_XK = ref_idx.reshape(-1, k).to(logits_XE.device)
            gates_XK = torch.sigmoid(logits_XE).gather(-1, idx_XK)
            return gates_XK, idx_XK
        gates_XK, idx_XK = sigmoid_topk(logits_XE, k)
        self.entries[where["key"]] = {
            "rows": (rows.start, rows.stop),
            "heads": (cols.start, cols.stop),
            "logits": logits_XE.detach().float().reshape(view).clone(),
            "idx": idx_XK.detach().reshape(b, -1, heads, k).clone(),
        }
        return gates_XK, idx_XK

    @contextlib.contextmanager
    def _at(self, key: str, batch_rows: int, heads: int, head_offset: int):
        self._where = {
            "key": key,
            "batch_rows": batch_rows,
            "heads": heads,
            "head_offset": head_offset,
        }
        try:
            yield
        finally:
            self._where = None

    # ------------------------------------------------------------------ install
    @contextlib.contextmanager
    def installed(self):
        """Patch the model modules' routing for the duration of the block."""
        tape = self
        sh_route = switchhead_mod.SwitchHeadAttention._route
        moe_route = sigma_moe_mod.SigmaMoE.route

        def switchhead_route(attn, x_BSD, w_FD, side, noise):
            if not attn.training:
                return sh_route(attn, x_BSD, w_FD, side, noise)
            key = tape._key(attn.layer_idx, _SIDES[side])
            with tape._at(key, x_BSD.shape[0], attn.num_heads, attn.head_offset):
                return sh_route(attn, x_BSD, w_FD, side, noise)

        def moe_route_taped(moe, x_XD, noise, rows_per_batch_row):
            if not moe.training:
                return moe_route(moe, x_XD, noise, rows_per_batch_row)
            key = tape._key(moe.layer_idx, "moe")
            with tape._at(key, x_XD.shape[0] // rows_per_batch_row, 1, 0):
                return moe_route(moe, x_XD, noise, rows_per_batch_row)

        patches = [
            (switchhead_mod.SwitchHeadAttention, "_route", switchhead_route),
            (sigma_moe_mod.SigmaMoE, "route", moe_route_taped),
            (switchhead_mod, "sigmoid_topk", self._topk),
            (sigma_moe_mod, "sigmoid_topk", self._topk),
        ]
        saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
        try:
            for obj, name, value in patches:
                setattr(obj, name, value)
            yield self
        finally:
            for obj, name, value in saved:
                setattr(obj, name, value)

    def save(self, path: Path) -> None:
        torch.save(self.entries, path)


def assemble(parts: list[dict]) -> dict[str, dict]:
    """Merge per-rank recorded entries into global tensors (ranks may overlap: TP replicas of
    σ-MoE routing hold the same rows; the first one is kept)."""
    merged: dict[str, dict] = {}
    for part in parts:
        for key, e in part.items():
            r0, r1 = e["rows"]
            h0, h1 = e["heads"]
            m = merged.get(key)
            if m is None:
                b_total = max(p[key]["rows"][1] for p in parts if key in p)
                h_total = max(p[key]["heads"][1] for p in parts if key in p)
                _, s, _, num_e = e["logits"].shape
                k = e["idx"].shape[-1]
                m = merged[key] = {
                    "logits": torch.full((b_total, s, h_total, num_e), float("nan")),
                    "idx": torch.full((b_total, s, h_total, k), -1, dtype=torch.int64),
                }
            m["logits"][r0:r1, :, h0:h1] = e["logits"]
            m["idx"][r0:r1, :, h0:h1] = e["idx"]
    for key, m in merged.items():
        if torch.isnan(m["logits"]).any() or (m["idx"] < 0).any():
            raise ValueError(f"tape entry {key}: some rows or heads were recorded by no rank")
    return merged


def compare(tape: dict[str, dict], reference: dict[str, dict], tie: float) -> dict:
    """Per entry: the largest logit difference, and the rows whose selected set differs, split
    into near-ties (the reference's k-th and (k+1)-th logits within `tie`) and the rest."""
    if set(tape) != set(reference):
        raise AssertionError(f"tape keys differ: {sorted(set(tape) ^ set(reference))[:6]}")
    out = {"max_logit_diff": 0.0, "flips_at_ties": [], "flips_elsewhere": [], "decisions": 0}
    for key in sorted(reference):
        got, want = tape[key], reference[key]
        k = want["idx"].shape[-1]
        diff = (got["logits"] - want["logits"]).abs().max().item()
        out["max_logit_diff"] = max(out["max_logit_diff"], diff)
        got_sel = got["idx"].sort(-1).values
        want_sel = want["idx"].sort(-1).values
        differs = (got_sel != want_sel).any(-1)
        out["decisions"] += differs.numel()
        if k >= want["logits"].shape[-1]:
            assert not differs.any(), key  # every expert is selected: nothing to decide
            continue
        top = want["logits"].topk(k + 1, dim=-1).values
        margin = top[..., k - 1] - top[..., k]
        for pos in differs.nonzero().tolist():
            rec = (key, tuple(pos), float(margin[tuple(pos)]))
            (out["flips_at_ties"] if rec[2] < tie else out["flips_elsewhere"]).append(rec)
    return out
