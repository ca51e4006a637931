"""Layouts that cannot run are refused at start-up, before any process group exists, with an
error naming the setting at fault."""

from __future__ import annotations

import pytest

from switchall.cli import main as cli_main
from switchall.config import load_run_config
from switchall.configtools import ConfigError
from switchall.parallel.layout import check_layout
from switchall.pretrain.cli import make_runtime
from tests.parallel.launch import SWITCHALL, TINY, TINY_TRANSFORMER, TRANSFORMER

BAD_LAYOUTS = [
    # (world size, overrides, setting named, message fragment)
    (4, ["parallel.tensor=3"], "parallel.tensor", "does not divide the world size 4"),
    (4, ["parallel.tensor=4"], "parallel.tensor", "larger than model.attention.n_heads=2"),
    (
        2,
        ["parallel.tensor=2", "model.attention.n_heads=3"],
        "parallel.tensor",
        "does not divide model.attention.n_heads=3",
    ),
    (
        2,
        ["parallel.tensor=2", "model.moe.expert_size=15"],
        "parallel.tensor",
        "does not divide model.moe.expert_size=15",
    ),
    (
        3,
        ["parallel.expert=2", "train.batch_size=9"],
        "parallel.expert",
        "does not divide the data-parallel size 3",
    ),
    (
        4,
        ["parallel.tensor=2", "parallel.expert=4"],
        "parallel.expert",
        "does not divide the data-parallel size 2",
    ),
    (
        3,
        ["parallel.expert=3", "train.batch_size=9"],
        "parallel.expert",
        "does not divide model.moe.n_experts=4",
    ),
    (2, ["parallel.zero_stage=3"], "parallel.zero_stage", "does not support MoE with ZeRO"),
    (3, [], "train.batch_size", "8 does not split evenly over 3 data-parallel replicas"),
    (2, ["train.grad_accum=8"], "train.grad_accum", "does not divide the per-replica batch 4"),
    (2, ["train.precision=fp16"], "train.precision", "fp16"),
]


@pytest.mark.parametrize("world_size, extra, key, fragment", BAD_LAYOUTS)
def test_invalid_layout_names_the_setting(world_size, extra, key, fragment):
    cfg = load_run_config(SWITCHALL, [*TINY, *extra])
    with pytest.raises(ConfigError) as err:
        check_layout(cfg, world_size)
    assert err.value.key == key
    assert fragment in str(err.value)


def test_dense_model_layouts():
    base = [*TINY_TRANSFORMER]
    with pytest.raises(ConfigError, match="parallel.expert.*no σ-MoE experts"):
        check_layout(load_run_config(TRANSFORMER, [*base, "parallel.expert=2"]), 2)
    with pytest.raises(ConfigError, match="parallel.tensor.*model.mlp.d_ff=66"):
        check_layout(
            load_run_config(TRANSFORMER, [*base, "parallel.tensor=4", "model.mlp.d_ff=66"]), 4
        )
    # ZeRO-3 is fine without σ-MoE, and so are the valid layouts of the tests.
    check_layout(load_run_config(TRANSFORMER, [*base, "parallel.zero_stage=3"]), 2)
    check_layout(load_run_config(TRANSFORMER, [*base, "parallel.tensor=4"]), 4)
    check_layout(load_run_config(SWITCHALL, [*TINY, "parallel.tensor=2", "parallel.expert=2"]), 4)


def test_tensor_parallel_bf16_needs_cuda():
    """megatron-core's TP layers only support autocast on CUDA: refused on CPU, allowed on GPU,
    and bf16 without tensor parallelism stays allowed on CPU."""
    tp_bf16 = load_run_config(SWITCHALL, [*TINY, "parallel.tensor=2", "train.precision=bf16"])
    with pytest.raises(ConfigError) as err:
        check_layout(tp_bf16, 2, device_type="cpu")
    assert err.value.key == "train.precision" and "needs CUDA" in str(err.value)
    check_layout(tp_bf16, 2, device_type="cuda")
    check_layout(load_run_config(SWITCHALL, [*TINY, "train.precision=bf16"]), 2, device_type="cpu")


def test_runtime_checks_before_joining_a_job(monkeypatch):
    """`make_runtime` validates against WORLD_SIZE before any process group is created."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match="parallel.tensor"):
        make_runtime(load_run_config(SWITCHALL, [*TINY, "parallel.tensor=3"]))
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(ConfigError, match="parallel.zero_stage.*launch with torchrun"):
        make_runtime(load_run_config(SWITCHALL, [*TINY, "parallel.zero_stage=1"]))
    with pytest.raises(ConfigError, match="parallel.expert: 2 needs several processes.*torchrun"):
        make_runtime(load_run_config(SWITCHALL, [*TINY, "parallel.expert=2"]))


def test_cli_reports_the_setting(tmp_path, capsys):
    args = ["pretrain", SWITCHALL, *TINY, "parallel.tensor=2", "--run-dir", str(tmp_path / "r")]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "configuration error" in err and "parallel.tensor" in err
    assert not (tmp_path / "r").exists()
