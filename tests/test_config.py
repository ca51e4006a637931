"""Config loading: YAML + overrides into typed dataclasses, errors that name the key."""

from __future__ import annotations

import pytest

from switchall.config import dump_run_config, load_run_config
from switchall.configtools import ConfigError

BASE = """
model:
  variant: switchall
  d_model: 64
  n_layers: 2
  seq_len: 16
  attention: {n_heads: 2, d_head: 16, n_experts: 4, k: 2}
  moe: {n_experts: 8, expert_size: 16, k: 2}
train: {steps: 5, batch_size: 4}
"""


@pytest.fixture
def cfg_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(BASE)
    return path


def test_loads_and_overrides(cfg_file):
    cfg = load_run_config(cfg_file, ["train.steps=7", "model.attention.k=3", "optim.lr=1e-3"])
    assert cfg.train.steps == 7 and cfg.model.attention.k == 3 and cfg.optim.lr == 1e-3
    assert cfg.optim.betas == (0.9, 0.999) and cfg.data.path == "data/stdlib"


def test_resolved_config_round_trips(cfg_file, tmp_path):
    cfg = load_run_config(cfg_file, ["train.seed=5", "optim.betas=[0.8, 0.9]"])
    dump_run_config(cfg, tmp_path / "resolved.yaml")
    assert load_run_config(tmp_path / "resolved.yaml") == cfg


@pytest.mark.parametrize(
    "override, key, fragment",
    [
        ("model.attention.k=5", "model.attention.k", "between 1 and n_experts=4"),
        ("model.moe.k=9", "model.moe.k", "between 1 and n_experts=8"),
        ("model.attention.n_expert=2", "model.attention.n_expert", "unknown key"),
        ("trian.steps=3", "trian", "unknown key"),
        ("train.steps=ten", "train.steps", "expected an integer"),
        ("train.steps=1.5", "train.steps", "expected an integer"),
        ("optim.lr=fast", "optim.lr", "expected a number"),
        ("model.variant=moe", "model.variant", "must be one of"),
        ("train.grad_accum=3", "train.grad_accum", "must divide train.batch_size=4"),
        ("model.d_model=63", "model.d_model", "must be even"),
        ("model.attention.moe_projections=vx", "model.attention.moe_projections", "vkqo"),
        ("model.attention.rope_fraction=0.2", "model.attention.rope_fraction", "must be even"),
        ("model.mem_chunks=-1", "model.mem_chunks", ">= 0"),
        ("model.steps.x=1", "model.steps", "unknown key"),
        ("train.steps", "train.steps", "section.key=value"),
    ],
)
def test_errors_name_the_key(cfg_file, override, key, fragment):
    with pytest.raises(ConfigError) as info:
        load_run_config(cfg_file, [override])
    assert info.value.key == key
    assert fragment in str(info.value)
    assert str(cfg_file) in str(info.value)


def test_dense_variant_rejects_attention_experts(cfg_file):
    with pytest.raises(ConfigError, match="model.attention.n_experts"):
        load_run_config(cfg_file, ["model.variant=transformer", "model.mlp.d_ff=32"])
    with pytest.raises(ConfigError, match="model.mlp.d_ff"):
        load_run_config(cfg_file, ["model.variant=switchhead"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_run_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_run_config(bad)
    missing = tmp_path / "missing.yaml"
    missing.write_text("train: {steps: 1}\n")
    with pytest.raises(ConfigError) as info:
        load_run_config(missing)
    assert info.value.key == "model" and "required" in str(info.value)
