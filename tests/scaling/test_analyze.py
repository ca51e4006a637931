"""`switchall analyze` on two tiny trained models: a SwitchAll and its dense baseline."""

from __future__ import annotations

import json

import torch

from switchall.analysis.analyze import attention_maps, load_model
from switchall.cli import main as cli_main
from switchall.config import load_run_config
from switchall.pretrain.runtime import LocalRuntime
from switchall.pretrain.trainer import Trainer

from .conftest import TINY


def _train(name, data, run_dir):
    cfg = load_run_config(
        name, [*TINY, f"data.path={data}", "train.steps=2", "model.attention.n_heads=2"]
    )
    Trainer(cfg, run_dir, LocalRuntime(torch.device("cpu"))).run()


def test_analyze_switchall_against_dense(tiny_dataset, tmp_path, capsys):
    _train("configs/demo_switchall.yaml", tiny_dataset, tmp_path / "sa")
    _train("configs/demo_transformer.yaml", tiny_dataset, tmp_path / "tf")
    out = tmp_path / "an"
    argv = [
        "analyze",
        str(tmp_path / "sa"),
        "--compare",
        str(tmp_path / "tf"),
        "--out",
        str(out),
        "--tokens",
        "12",
        "--batches",
        "2",
    ]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    sa, tf = summary["models"]
    assert (sa["variant"], tf["variant"]) == ("switchall", "transformer")
    assert set(sa["experts"]) == {"attn0.v", "attn0.o", "mlp0", "attn1.v", "attn1.o", "mlp1"}
    assert tf["experts"] == {}
    for head in sa["experts"]["attn0.v"]:
        assert abs(sum(head["share"]) - 1) < 1e-3 and len(head["typical_tokens"]) == 4
    for name in (
        "attention_max",
        "attention_layer0",
        "attention_layer1",
        "expert_usage",
        "selections",
    ):
        png = out / f"{name}.png"
        assert png.stat().st_size > 5_000 and str(png) in printed
    # An export of the same model, analysed on the same data, gives the same figures.
    export = tmp_path / "sa_export"
    assert cli_main(["export", str(tmp_path / "sa"), "--out", str(export)]) == 0
    out2 = tmp_path / "an_export"
    argv2 = [*argv[:1], str(export), *argv[2:]]
    argv2[argv2.index("--out") + 1] = str(out2)
    assert cli_main([*argv2, "--data", str(tiny_dataset)]) == 0
    again = json.loads((out2 / "summary.json").read_text())
    for key in ("text", "tokens"):
        assert again[key] == summary[key]
    for a, b in zip(again["models"], summary["models"], strict=True):
        assert (a["attention"], a["experts"]) == (b["attention"], b["experts"])
        assert a["val_loss_on_batches"] == b["val_loss_on_batches"]
    capsys.readouterr()
    assert cli_main(argv2) == 2  # an export names no dataset
    assert "--data" in capsys.readouterr().err
    # The captured maps are causal probability distributions, and capturing them leaves the
    # model's output unchanged.
    lm = load_model(tmp_path / "sa")
    tokens = torch.arange(12) % 50
    ref = lm.model(tokens[None]).logits_BTV
    maps = attention_maps(lm, tokens)
    assert len(maps) == 2 and maps[0].shape == (2, 12, 12)
    assert torch.allclose(maps[0].sum(-1), torch.ones(2, 12), atol=1e-5)
    assert float(maps[0].triu(1).abs().max()) == 0.0
    from switchall.analysis.analyze import capture_attention

    with capture_attention([]), torch.no_grad():
        assert torch.allclose(lm.model(tokens[None]).logits_BTV, ref, atol=1e-5)
