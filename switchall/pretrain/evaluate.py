"""Validation loss, perplexity and bits per character; the `switchall evaluate` verb's core.

Legend: B batch (this rank's lanes), T chunk length, V vocabulary.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from switchall.models.config import ModelConfig


@dataclass
class EvalResult:
    loss: float
    """Mean cross-entropy per token, in nats."""
    tokens: int
    byte_level: bool = False

    @property
    def ppl(self) -> float:
        return math.exp(min(self.loss, 700.0))

    @property
    def bpc(self) -> float:
        """Bits per character; only meaningful for byte-level data (one token per byte)."""
        return self.loss / math.log(2.0)

    def record(self, step: int) -> dict:
        out = {"step": step, "val_loss": self.loss, "val_ppl": self.ppl, "val_tokens": self.tokens}
        if self.byte_level:
            out["val_bpc"] = self.bpc
        return out

    def describe(self) -> str:
        text = f"val_loss {self.loss:.4f}  val_ppl {self.ppl:.2f}"
        return text + (f"  val_bpc {self.bpc:.4f}" if self.byte_level else "")


def autocast_for(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def validate(
    model: nn.Module,
    loader,
    model_cfg: ModelConfig,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    max_batches: int = 0,
    all_reduce_sum=lambda t: t,
    byte_level: bool = False,
) -> EvalResult:
    """Mean token loss over the validation split (or its first `max_batches` batches).

    XL memory starts empty and is carried across the split's contiguous lanes, as in training.
    Losses are summed on every data-parallel rank and reduced, so the figure is global.
    """
    was_training = model.training
    model.eval()
    memory = None
    nll = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        if loader.is_lane_start(i):
            memory = None
        batch_BT1 = batch.to(device, non_blocking=True)
        inp_BT, tgt_BT = batch_BT1[:, :-1], batch_BT1[:, 1:]
        with autocast_for(device, amp_dtype):
            out = model(inp_BT, memory)
        memory = out.memory
        nll += F.cross_entropy(
            out.logits_BTV.float().flatten(0, 1), tgt_BT.flatten(), reduction="sum"
        ).double()
        count += tgt_BT.numel()
    model.train(was_training)
    nll, count = all_reduce_sum(nll), all_reduce_sum(count)
    if count.item() == 0:
        raise RuntimeError("the validation split yielded no batches; is it smaller than one batch?")
    return EvalResult(float(nll / count), int(count.item()), byte_level)
