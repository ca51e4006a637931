"""Initialisation rules of spec §2.2 and §4, shared by every module."""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def normal_(w: torch.Tensor, std: float) -> torch.Tensor:
    return w.normal_(0.0, std)


@torch.no_grad()
def trunc_normal_(w: torch.Tensor, std: float) -> torch.Tensor:
    """Truncated at two standard deviations, then rescaled so the std is exactly `std`.

    Truncation at ±2σ shrinks the std by a factor 0.8796; dividing it back out keeps the
    fan-in rule of the dense layers (std = sqrt(2 / (n_layers * fan_in))).
    """
    torch.nn.init.trunc_normal_(w, 0.0, 1.0, -2.0, 2.0)
    return w.mul_(std / 0.87962566103423978)


@torch.no_grad()
def renorm_rows_keep_std_(w: torch.Tensor) -> torch.Tensor:
    """Give every row (dim 1 reduced) the same L2 norm while keeping the tensor's global std.

    Used on routing matrices so that no expert starts with an advantage from a larger row norm.
    """
    std = w.std()
    w.div_(w.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    return w.mul_(std / w.std().clamp_min(1e-12))


@torch.no_grad()
def renorm_rows_by_row_std_(w: torch.Tensor) -> torch.Tensor:
    """The authors' SwitchHead routing renorm: row r becomes (w_r / |w_r|) · std_r / s, where
    std_r is row r's own std before and s the global std after the division (spec §2.2).

    Rows keep their random norms up to one global factor (norm_r = std_r / s); they are not
    made equal. Both stds are unbiased, as torch's default (and the authors' code) computes.
    """
    std_R1 = w.std(dim=-1, keepdim=True)
    w.div_(w.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    return w.mul_(std_R1 / w.std().clamp_min(1e-12))


def dense_std(init_scale: float, fan_in: int) -> float:
    return init_scale / math.sqrt(fan_in)
