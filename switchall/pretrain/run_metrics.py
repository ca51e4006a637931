"""What a scaling run logs beyond the loss: tokens and FLOPs seen, MFU, and expert load.

Called by the trainer at log time only (`RunMetrics.at_log`), so the loop stays as it is:
- `tokens_seen` = steps × global batch × chunk length; `train_flops_seen` = tokens ×
  `train_flops_per_token` (active experts only, `switchall.analysis.accounting`);
- `mfu`: achieved training FLOP/s over the peak of all devices, from `PEAK_FLOPS` (dense
  tensor-core peaks of common GPUs for the run's precision) or `logging.peak_flops`; omitted on
  the CPU and on unknown devices unless a peak is given;
- per σ-MoE layer (`load/mlp{i}/…`) and per SwitchHead routing side (`load/attn{i}.v/…` source,
  `load/attn{i}.o/…` destination), from the expert assignments of each step: `entropy` (nats,
  of the assignment distribution over a head's experts; log E when uniform; mean over heads),
  `overload` (the most-loaded expert's assignments over the mean; max over heads) and `idle`
  (experts without any assignment in the step; summed over heads), each averaged over the
  steps since the last log.

Assignments are counted on the device (`index_add_` into a per-step buffer, no host sync), and
read once per log, summed over the data-parallel ranks through the runtime (and over the
tensor-parallel ranks for SwitchHead, whose heads those ranks split), so they are global.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from switchall.analysis.accounting import train_flops_per_token

# name fragment (as torch.cuda.get_device_name reports it) -> (bf16/fp16, fp32) dense FLOP/s.
# Checked in order: more specific names first. Vendors' datasheet figures without sparsity.
PEAK_FLOPS: list[tuple[str, tuple[float, float]]] = [
    ("GH200", (989e12, 67e12)),
    ("H200", (989e12, 67e12)),
    ("H100 PCIe", (756e12, 51e12)),
    ("H100 NVL", (835e12, 60e12)),
    ("H100", (989e12, 67e12)),
    ("H800", (989e12, 67e12)),
    ("B200", (2250e12, 80e12)),
    ("A100", (312e12, 19.5e12)),
    ("A800", (312e12, 19.5e12)),
    ("L40S", (362e12, 91.6e12)),
    ("L40", (181e12, 90.5e12)),
    ("L4", (121e12, 30.3e12)),
    ("A10", (125e12, 31.2e12)),
    ("RTX 4090", (165e12, 82.6e12)),
    ("RTX 3090", (71e12, 35.6e12)),
    ("V100", (125e12, 15.7e12)),
    ("T4", (65e12, 8.1e12)),
    ("MI300X", (1307e12, 163e12)),
    ("MI250X", (383e12, 47.9e12)),
]


def device_peak_flops(device: torch.device, precision: str) -> float | None:
    """Per-device peak FLOP/s for `precision` from the table, or None (CPU, unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, (half, single) in PEAK_FLOPS:
        if fragment in name:
            return single if precision == "fp32" else half
    return None


class ExpertLoad:
    """Per-step expert assignment counts of every routing module, on the device."""

    def __init__(self, model: nn.Module, device: torch.device, step_of):
        from switchall.models.sigma_moe import SigmaMoE
        from switchall.models.switchhead import SwitchHeadAttention

        self.device, self.step_of = device, step_of
        self.slots: dict[str, tuple[int, int, int]] = {}  # key -> (offset, heads, experts)
        self.tp_keys: set[str] = set()
        offset = 0
        for module in model.modules():
            if isinstance(module, SigmaMoE):
                sides, heads, experts = ["mlp"], 1, module.num_experts
            elif isinstance(module, SwitchHeadAttention) and not module.gated_dense:
                sides = [s for s, on in (("v", module.routes_src), ("o", module.routes_dst)) if on]
                heads, experts = module.total_heads, module.num_experts
            else:
                continue
            layer = module.layer_idx
            for side in sides:
                key = f"mlp{layer}" if side == "mlp" else f"attn{layer}.{side}"
                self.slots[key] = (offset, heads, experts)
                if side != "mlp":
                    self.tp_keys.add(key)
                offset += heads * experts
            module.load_recorder = self._recorder(layer, module)
        self.size = offset
        self.per_step: dict[int, torch.Tensor] = {}

    def _recorder(self, layer: int, module: nn.Module):
        @torch.compiler.disable
        def record(side: str, expert_ids: torch.Tensor, n: int) -> None:
            if not module.training:  # validation batches are not training load
                return
            key = f"mlp{layer}" if side == "mlp" else f"attn{layer}.{side}"
            offset, heads, experts = self.slots[key]
            step = self.step_of()
            buf = self.per_step.get(step)
            if buf is None:
                buf = self.per_step[step] = torch.zeros(self.size, device=expert_ids.device)
            flat = expert_ids.reshape(-1)
            buf[offset : offset + heads * experts].index_add_(
                0, flat, torch.ones(flat.shape, device=flat.device, dtype=buf.dtype)
            )

        return record

    def collect(self, runtime) -> dict[str, float]:
        """Window statistics since the last call (collective: every rank calls it)."""
        if not self.slots:
            return {}
        steps = sorted(self.per_step)
        counts_WS = (
            torch.stack([self.per_step[s] for s in steps])
            if steps
            else torch.zeros(0, self.size, device=self.device)
        )
        self.per_step = {}
        counts_WS = runtime.all_reduce_sum(counts_WS)
        layout = getattr(runtime, "layout", None)
        if layout is not None and layout.tp_size > 1:
            import torch.distributed as dist

            # SwitchHead heads are split over tensor-parallel ranks (disjoint slots there);
            # σ-MoE routing is replicated on them, so only the attention slots are summed.
            att = torch.zeros_like(counts_WS)
            for key in self.tp_keys:
                o, h, e = self.slots[key]
                att[:, o : o + h * e] = counts_WS[:, o : o + h * e]
            dist.all_reduce(att, group=layout.tp_group)
            for key in self.tp_keys:
                o, h, e = self.slots[key]
                counts_WS[:, o : o + h * e] = att[:, o : o + h * e]
        counts_WS = counts_WS.cpu().double()
        out: dict[str, float] = {}
        for key, (o, h, e) in self.slots.items():
            stats = [load_stats(counts_WS[w, o : o + h * e].view(h, e)) for w in range(len(steps))]
            stats = [s for s in stats if s is not None]
            if not stats:
                continue
            for name in ("entropy", "overload", "idle"):
                out[f"load/{key}/{name}"] = sum(s[name] for s in stats) / len(stats)
        return out


def load_stats(counts_HE: torch.Tensor) -> dict[str, float] | None:
    """Entropy (mean over heads), overload (max over heads), idle experts (sum over heads) of
    one step's assignment counts; None when nothing was routed."""
    total_H1 = counts_HE.sum(-1, keepdim=True)
    if float(total_H1.min()) <= 0:
        return None
    p_HE = counts_HE / total_H1
    entropy_H = -(p_HE * torch.log(p_HE.clamp_min(1e-300))).sum(-1)
    overload_H = counts_HE.max(-1).values / (total_H1.squeeze(-1) / counts_HE.shape[-1])
    return {
        "entropy": float(entropy_H.mean()),
        "overload": float(overload_H.max()),
        "idle": float((counts_HE == 0).sum()),
    }


class RunMetrics:
    """Tokens, FLOPs, MFU and expert load for the trainer's log records."""

    def __init__(self, cfg, model: nn.Module, runtime, step_of):
        t, m = cfg.train, cfg.model
        self.runtime = runtime
        self.tokens_per_step = t.batch_size * m.seq_len
        micro = max(t.batch_size // max(runtime.dp_size, 1) // t.grad_accum, 1)
        self.flops_per_token = train_flops_per_token(m, sequences_per_forward=micro)
        layout = getattr(runtime, "layout", None)
        self.devices = layout.world_size if layout is not None else 1
        self.peak = cfg.logging.peak_flops
        if self.peak is None:
            self.peak = device_peak_flops(runtime.device, t.precision)
        self.load = ExpertLoad(model, runtime.device, step_of) if cfg.logging.expert_load else None

    def at_log(self, step: int, tokens_per_s: float) -> dict[str, Any]:
        tokens = step * self.tokens_per_step
        out: dict[str, Any] = {
            "tokens_seen": tokens,
            "train_flops_seen": tokens * self.flops_per_token,
        }
        if self.peak:
            out["mfu"] = self.flops_per_token * tokens_per_s / (self.peak * self.devices)
        if self.load is not None:
            out.update(self.load.collect(self.runtime))
        return out

    @staticmethod
    def describe(record: dict[str, Any]) -> str:
        """A short console suffix: tokens seen, MFU, the worst expert overload."""
        text = f" | {_si(record['tokens_seen'])} tok"
        if "mfu" in record:
            text += f" | MFU {100 * record['mfu']:.1f}%"
        overloads = [v for k, v in record.items() if k.endswith("/overload")]
        if overloads and all(math.isfinite(v) for v in overloads):
            text += f" | overload {max(overloads):.2f}"
        return text


def _si(x: float) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.0f}"
