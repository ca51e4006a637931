"""`switchall evaluate` against a validation loss computed independently: a plain loop over
every validation batch with the model of the checkpoint as a resumed `Trainer` holds it. Also
`--batches`, `--checkpoint`, bits per byte on byte-level data, and exit code 2 on bad data.

`independent_loss` takes any single-device model, so that runs of other layouts (or exported
models) can be checked the same way once their weights are assembled into one model.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from switchall.cli import main as cli_main
from switchall.config import load_run_config
from switchall.data_pipeline import TokenLoader, read_manifest
from switchall.pretrain.metrics import read_metrics
from switchall.pretrain.runtime import LocalRuntime
from switchall.pretrain.trainer import Trainer
from tests.stdlib_data import prepare_stdlib
from tests.tiny import TINY_MODEL

TINY = [
    "model.vocab_size=256",
    *TINY_MODEL,
    "train.batch_size=4",
    "train.log_every=2",
    "train.eval_batches=1",
    "train.ckpt_every=2",
    "train.steps=4",
    "optim.lr=3e-3",
    "logging.wandb=disabled",
]


@pytest.fixture(scope="module")
def byte_ds(tmp_path_factory) -> Path:
    """Byte tokens of a few standard-library modules; antigravity.py (500 bytes, 7 validation
    batches of 4 x 16 tokens) is validation."""
    root = tmp_path_factory.mktemp("eval_data")
    train = ["textwrap.py", "heapq.py", "shlex.py"]
    return prepare_stdlib(root, train, "antigravity.py", "--tokenizer", "byte", "--workers", "1")


@pytest.fixture(scope="module")
def run(byte_ds, tmp_path_factory) -> Path:
    """A 4-step SwitchAll run (XL memory on) with checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("eval_run") / "run"
    args = ["configs/demo_switchall.yaml", *TINY, f"data.path={byte_ds}"]
    assert cli_main(["pretrain", *args, "--run-dir", str(run_dir)]) == 0
    return run_dir


def load_checkpoint_model(run_dir: Path, ckpt: Path, tmp_path: Path) -> torch.nn.Module:
    """The single-process model of `run_dir`'s config with the weights of `ckpt`, loaded the
    way training resumes (not through `consolidate`, which `evaluate` uses): a copy of the
    run holding only `ckpt`, resumed by a `Trainer`."""
    copy = tmp_path / f"resume_{ckpt.name}"
    shutil.copytree(ckpt, copy / "checkpoints" / ckpt.name)
    shutil.copy(run_dir / "config.yaml", copy / "config.yaml")
    cfg = load_run_config(copy / "config.yaml", ["logging.wandb=disabled"])
    trainer = Trainer(cfg, copy, LocalRuntime(torch.device("cpu")), resume=True)
    assert trainer.step == int(ckpt.name.split("_")[-1])
    return trainer.model


def independent_loss(
    model: torch.nn.Module, dataset: Path, batch_size: int, seq_len: int, batches: int | None
) -> tuple[float, int]:
    """(mean token cross-entropy in nats, tokens) over the validation split or its first
    `batches` batches. XL memory starts empty and follows each lane (contiguous windows)."""
    loader = TokenLoader(
        dataset,
        split="val",
        global_batch_size=batch_size,
        seq_len=seq_len,
        mode="contiguous",
        loop=False,
    )
    model.eval()
    memory, losses = None, []
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if batches is not None and i == batches:
                break
            out = model(batch[:, :-1], memory)
            memory = out.memory
            logits = out.logits_BTV.double().flatten(0, 1)
            losses.append(F.cross_entropy(logits, batch[:, 1:].flatten(), reduction="none"))
    per_token = torch.cat(losses)
    return per_token.mean().item(), per_token.numel()


def evaluate_json(capsys, *argv: str) -> dict:
    capsys.readouterr()
    assert cli_main(["evaluate", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_evaluate_covers_the_whole_validation_split(run, byte_ds, capsys, tmp_path):
    cfg = load_run_config(run / "config.yaml")
    B, T = cfg.train.batch_size, cfg.model.seq_len
    val_batches = TokenLoader(
        byte_ds, split="val", global_batch_size=B, seq_len=T, mode="contiguous", loop=False
    ).batches_per_epoch
    assert cfg.model.mem_chunks == 1 and val_batches > 5 * cfg.train.eval_batches
    out = evaluate_json(capsys, str(run))
    assert out["step"] == 4 and Path(out["checkpoint"]).name == "step_00000004"
    model = load_checkpoint_model(run, run / "checkpoints" / "step_00000004", tmp_path)
    want, tokens = independent_loss(model, byte_ds, B, T, batches=None)
    assert tokens == val_batches * B * T == out["val_tokens"]
    assert out["val_loss"] == pytest.approx(want, rel=1e-6)
    assert out["val_ppl"] == pytest.approx(math.exp(want), rel=1e-6)
    # Byte-level data: bits per byte = nats per token / ln 2.
    assert read_manifest(byte_ds).byte_level
    assert out["val_bpc"] == pytest.approx(out["val_loss"] / math.log(2), rel=1e-12)
    # The trainer's own validation covered train.eval_batches only.
    last = [r for r in read_metrics(run / "metrics.jsonl") if "val_loss" in r][-1]
    assert last["step"] == 4 and last["val_tokens"] == cfg.train.eval_batches * B * T
    capsys.readouterr()
    assert cli_main(["evaluate", str(run)]) == 0
    text = capsys.readouterr().out
    assert f"val_bpc {out['val_bpc']:.4f}" in text and f"({tokens:,} tokens)" in text


def test_evaluate_batches_and_checkpoint(run, byte_ds, capsys, tmp_path):
    cfg = load_run_config(run / "config.yaml")
    B, T = cfg.train.batch_size, cfg.model.seq_len
    latest = load_checkpoint_model(run, run / "checkpoints" / "step_00000004", tmp_path)
    out = evaluate_json(capsys, str(run), "--batches", "3")
    want, tokens = independent_loss(latest, byte_ds, B, T, batches=3)
    assert out["val_tokens"] == tokens == 3 * B * T
    assert out["val_loss"] == pytest.approx(want, rel=1e-6)
    older = run / "checkpoints" / "step_00000002"
    out = evaluate_json(capsys, str(run), "--checkpoint", str(older))
    want, _ = independent_loss(
        load_checkpoint_model(run, older, tmp_path), byte_ds, B, T, batches=None
    )
    assert out["step"] == 2 and out["checkpoint"] == str(older)
    assert out["val_loss"] == pytest.approx(want, rel=1e-6)
    assert abs(out["val_loss"] - evaluate_json(capsys, str(run))["val_loss"]) > 1e-3
    with pytest.raises(SystemExit):
        cli_main(["evaluate", str(run), "--batches", "0"])


def test_evaluate_an_export(run, byte_ds, capsys, tmp_path, monkeypatch):
    """`evaluate --model EXPORT data.path=...`: the exported model's loss over the whole split,
    as computed independently and as `evaluate RUN_DIR` gives for the checkpoint it came from;
    the dataset must be named and carry the export's tokenizer."""
    from switchall.models.pretrained import load_pretrained

    cfg = load_run_config(run / "config.yaml")
    B, T = cfg.train.batch_size, cfg.model.seq_len
    export = tmp_path / "export"
    assert cli_main(["export", str(run), "--out", str(export)]) == 0
    args = ["--model", str(export), f"data.path={byte_ds}", f"train.batch_size={B}"]
    out = evaluate_json(capsys, *args)
    want, tokens = independent_loss(load_pretrained(export)[0], byte_ds, B, T, batches=None)
    assert out["model"] == str(export) and out["step"] is None and out["val_tokens"] == tokens
    assert out["val_loss"] == pytest.approx(want, rel=1e-6)
    assert out["val_loss"] == pytest.approx(evaluate_json(capsys, str(run))["val_loss"], rel=1e-6)
    capsys.readouterr()
    assert cli_main(["evaluate", "--model", str(export)]) == 2
    assert "data.path" in capsys.readouterr().err
    assert cli_main(["evaluate", str(run), "--model", str(export)]) == 2
    assert "not both" in capsys.readouterr().err

    class OtherTokenizer:
        def info(self):
            return {"type": "sentencepiece", "sha256": "0" * 64}

    import switchall.models.pretrained as pretrained

    monkeypatch.setattr(pretrained, "load_pretrained_tokenizer", lambda path: OtherTokenizer())
    assert cli_main(["evaluate", *args]) == 2
    err = capsys.readouterr().err
    assert "data.path" in err and "tokenizer" in err and str(export) in err


def damaged_copy(dataset: Path, dest: Path, split: str) -> str:
    """A copy of `dataset` whose first `split` shard has one flipped byte."""
    ds = shutil.copytree(dataset, dest)
    name = read_manifest(ds).shards(split)[0].name
    data = bytearray((ds / name).read_bytes())
    data[len(data) // 2] ^= 1
    (ds / name).write_bytes(bytes(data))
    return name


def test_data_errors_exit_2_naming_the_shard(run, byte_ds, tmp_path, capsys):
    bad_val = damaged_copy(byte_ds, tmp_path / "bad_val", "val")
    capsys.readouterr()
    assert cli_main(["evaluate", str(run), f"data.path={tmp_path / 'bad_val'}"]) == 2
    err = capsys.readouterr().err
    assert "switchall evaluate: data error" in err and f"shard {bad_val}" in err
    bad_train = damaged_copy(byte_ds, tmp_path / "bad_train", "train")
    args = ["configs/demo_switchall.yaml", *TINY, f"data.path={tmp_path / 'bad_train'}"]
    assert cli_main(["pretrain", *args, "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "switchall pretrain: data error" in err and f"shard {bad_train}" in err
    missing = ["configs/demo_switchall.yaml", *TINY, f"data.path={tmp_path / 'nothing'}"]
    assert cli_main(["pretrain", *missing, "--run-dir", str(tmp_path / "r2")]) == 2
    assert "data error" in capsys.readouterr().err
