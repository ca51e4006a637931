"""The authors' initialisation of the paper configs (spec §2.1-2.2), against hand computations."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from switchall.config import load_run_config
from switchall.models import build_model
from switchall.models.init import renorm_rows_by_row_std_, renorm_rows_keep_std_

from ..models.helpers import tiny_config

PAPER = Path(__file__).resolve().parents[2] / "configs" / "paper"


def _std(xs):  # unbiased, as torch.std
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def test_row_std_renorm_by_hand():
    rows = [[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 2.0], [1.0, -1.0, 1.0, -1.0]]
    normed = [[x / math.sqrt(sum(v * v for v in r)) for x in r] for r in rows]
    s = _std([x for r in normed for x in r])
    expected = [[x * _std(r) / s for x in n] for r, n in zip(rows, normed, strict=True)]
    got = renorm_rows_by_row_std_(torch.tensor(rows, dtype=torch.float64))
    assert got.flatten().tolist() == pytest.approx([x for r in expected for x in r], rel=1e-12)
    # Row norms are the rows' own stds over one global factor, not equal ...
    norms = got.norm(dim=-1)
    assert norms.tolist() == pytest.approx([_std(r) / s for r in rows], rel=1e-12)
    # ... unlike the equal-norm rule this option replaces for SwitchHead.
    equal = renorm_rows_keep_std_(torch.tensor(rows, dtype=torch.float64)).norm(dim=-1)
    assert equal.tolist() == pytest.approx([float(equal[0])] * 3, rel=1e-12)


def test_routing_and_output_init_options():
    torch.manual_seed(0)
    authors = build_model(
        tiny_config("switchhead", routing_init="row_std", output_init="torch_default", d_model=64)
    )
    sel = authors.blocks[0].attn.sel_src.detach()
    norms = sel.norm(dim=-1)
    assert float(norms.std() / norms.mean()) > 0.02  # random row norms kept
    bound = 1 / math.sqrt(64)  # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    w, b = authors.output.weight.detach(), authors.output.bias.detach()
    assert float(w.abs().max()) <= bound and float(w.std()) == pytest.approx(
        bound / 3**0.5, rel=0.1
    )
    assert float(b.abs().max()) <= bound and float(b.abs().sum()) > 0
    default = build_model(tiny_config("switchhead", d_model=64))
    n = default.blocks[0].attn.sel_src.detach().norm(dim=-1)
    assert n.tolist() == pytest.approx([float(n[0])] * len(n), rel=1e-5)
    assert float(default.output.bias.detach().abs().sum()) == 0.0


@pytest.mark.parametrize("path", sorted(PAPER.glob("*.yaml")), ids=lambda p: p.stem)
def test_paper_configs_use_the_authors_init_and_fp16(path):
    cfg = load_run_config(path)
    assert cfg.model.routing_init == "row_std"
    assert cfg.model.output_init == "torch_default"
    assert cfg.train.precision == "fp16"
