"""Configuration of the optimiser, schedule, training loop and logging."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from switchall.configtools import check, join


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW with linear warmup then cosine decay (spec §8)."""

    lr: float = 2.5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0
    cosine_steps: int | None = None
    """T_max of the cosine after warmup; None means the rest of train.steps."""
    min_lr: float = 0.0
    grad_clip: float = 0.25
    """Global L2 norm clip; 0 disables."""

    def validate(self, prefix: str = "") -> None:
        check(self.lr > 0, join(prefix, "lr"), "must be > 0")
        check(all(0 <= b < 1 for b in self.betas), join(prefix, "betas"), "must be in [0, 1)")
        check(self.eps > 0, join(prefix, "eps"), "must be > 0")
        check(self.weight_decay >= 0, join(prefix, "weight_decay"), "must be >= 0")
        check(self.warmup_steps >= 0, join(prefix, "warmup_steps"), "must be >= 0")
        check(
            self.cosine_steps is None or self.cosine_steps > 0,
            join(prefix, "cosine_steps"),
            "must be > 0",
        )
        check(0 <= self.min_lr <= self.lr, join(prefix, "min_lr"), "must be in [0, lr]")
        check(self.grad_clip >= 0, join(prefix, "grad_clip"), "must be >= 0")


# torch.compile backends that run on CPU and CUDA without extra packages.
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")


@dataclass(kw_only=True)
class TrainConfig:
    steps: int = 1000
    seed: int = 0
    batch_size: int = 64
    """Global batch, in sequences, per optimiser step."""
    grad_accum: int = 1
    """Micro-batches per step (gradient accumulation); must divide the per-rank batch."""
    log_every: int = 10
    eval_every: int = 0
    """Steps between validations; 0 validates only at the start and the end."""
    eval_batches: int = 0
    """Validation batches per evaluation; 0 means the whole validation split."""
    ckpt_every: int = 0
    """Steps between checkpoints; 0 saves only at the end."""
    ckpt_every_minutes: float = 0.0
    """Also checkpoint when this many minutes have passed since the last checkpoint (agreed by
    all ranks at a step boundary), so a long step schedule still leaves recent work on disk;
    0 disables."""
    keep_checkpoints: int = 2
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """auto: bf16 autocast on GPU, fp32 on CPU."""
    device: str = "auto"
    deterministic: bool = False
    """Deterministic algorithms (and the deterministic CVMM weight gradient)."""
    compile: bool = False
    """torch.compile the model (in place: checkpoints keep their parameter names)."""
    compile_backend: str = "inductor"
    """torch.compile backend: inductor (generates code), or aot_eager / eager for debugging."""
    activation_checkpointing: bool = False
    """Recompute each block (attention, routing, XL memory, MLP) in backward to save memory."""

    def validate(self, prefix: str = "") -> None:
        check(self.steps >= 0, join(prefix, "steps"), "must be >= 0")
        check(self.batch_size >= 1, join(prefix, "batch_size"), "must be >= 1")
        check(self.grad_accum >= 1, join(prefix, "grad_accum"), "must be >= 1")
        check(self.log_every >= 1, join(prefix, "log_every"), "must be >= 1")
        check(self.eval_every >= 0, join(prefix, "eval_every"), "must be >= 0")
        check(self.eval_batches >= 0, join(prefix, "eval_batches"), "must be >= 0")
        check(self.ckpt_every >= 0, join(prefix, "ckpt_every"), "must be >= 0")
        check(self.ckpt_every_minutes >= 0, join(prefix, "ckpt_every_minutes"), "must be >= 0")
        check(self.keep_checkpoints >= 1, join(prefix, "keep_checkpoints"), "must be >= 1")
        check(
            self.compile_backend in COMPILE_BACKENDS,
            join(prefix, "compile_backend"),
            f"must be one of {', '.join(COMPILE_BACKENDS)}, got {self.compile_backend!r}",
        )


@dataclass(kw_only=True)
class LoggingConfig:
    wandb: Literal["offline", "online", "disabled"] = "offline"
    """offline writes the wandb run under the run directory with no account or network."""
    project: str = "switchall"
    name: str | None = None
    console: bool = True
    peak_flops: float | None = None
    """Per-device peak FLOP/s for the MFU metric; None: the table of common GPUs
    (`switchall.pretrain.run_metrics.PEAK_FLOPS`), no MFU on the CPU or an unknown device."""
    expert_load: bool = True
    """Log per-layer expert load (entropy, overload factor, idle experts) of routed layers."""

    def validate(self, prefix: str = "") -> None:
        check(
            self.peak_flops is None or self.peak_flops > 0,
            join(prefix, "peak_flops"),
            "must be > 0",
        )
