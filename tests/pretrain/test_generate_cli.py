"""`switchall generate` end to end: a tiny run trained here, its checkpoint and its export."""

from __future__ import annotations

import json
import shutil
import sysconfig
from pathlib import Path

import pytest

from switchall.cli import main as cli_main
from switchall.models import save_pretrained
from switchall.pretrain.generate_cli import load_run_model
from tests.tiny import TINY_MODEL

TINY = [
    "model.vocab_size=256",
    *TINY_MODEL,
    "train.batch_size=4",
    "train.steps=3",
    "train.eval_batches=1",
    "logging.wandb=disabled",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A SwitchAll run (XL memory) of 3 steps on byte-level text."""
    root = tmp_path_factory.mktemp("generate")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    (root / "text").mkdir()
    shutil.copy(stdlib / "textwrap.py", root / "text" / "textwrap.py")
    data = root / "data"
    argv = ["prepare", str(root / "text"), "--val", str(stdlib / "bisect.py"), "--out", str(data)]
    assert cli_main([*argv, "--tokenizer", "byte", "--no-progress"]) == 0
    run = root / "run"
    args = ["configs/demo_switchall.yaml", *TINY, f"data.path={data}", "--run-dir", str(run)]
    assert cli_main(["pretrain", *args]) == 0
    return run


def generate_json(capsys, *argv) -> dict:
    capsys.readouterr()
    assert cli_main(["generate", *map(str, argv), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_generate_from_run_and_export(run_dir, tmp_path, capsys):
    prompt = ["--prompt", "def wrap(", "--max-new-tokens", "40"]
    greedy = generate_json(capsys, run_dir, *prompt, "--temperature", "0")
    assert greedy["prompt_tokens"] == [0, *b"def wrap("]  # end-of-document first, then bytes
    assert 0 < len(greedy["tokens"]) <= 40 and all(0 <= t < 256 for t in greedy["tokens"])
    assert greedy["stop"] == ("eod" if len(greedy["tokens"]) < 40 else "length")
    assert generate_json(capsys, run_dir, *prompt, "--temperature", "0") == greedy
    top1 = generate_json(capsys, run_dir, *prompt, "--top-k", "1", "--seed", "3")
    assert top1["tokens"] == greedy["tokens"]
    sampled = generate_json(capsys, run_dir, *prompt, "--seed", "5")
    assert generate_json(capsys, run_dir, *prompt, "--seed", "5") == sampled
    assert sampled["tokens"] != greedy["tokens"]

    model, cfg, meta = load_run_model(run_dir)
    export = tmp_path / "export"
    save_pretrained(model.state_dict(), cfg.model, export, description=f"step {meta['step']}")
    from_export = generate_json(capsys, export, *prompt, "--seed", "5")
    assert from_export["tokens"] == sampled["tokens"]
    assert from_export["model"] == f"export {export}"

    capsys.readouterr()
    assert cli_main(["generate", str(export), *prompt, "--temperature", "0"]) == 0
    assert capsys.readouterr().out == greedy["completion"] + "\n"


def test_generate_errors(run_dir, tmp_path, capsys):
    assert cli_main(["generate", str(tmp_path), "--prompt", "x"]) == 2
    assert "neither an export" in capsys.readouterr().err
    assert cli_main(["generate", str(run_dir), "--top-k", "0"]) == 2
    assert "--top-k: must be >= 1" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    ckpt = sorted((broken / "checkpoints").iterdir())[-1]
    data = next(ckpt.glob("*.distcp"))
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, one flipped byte: only the checksum can tell
    data.write_bytes(bytes(raw))
    assert cli_main(["generate", str(broken), "--prompt", "x"]) == 2
    assert "checksum mismatch" in capsys.readouterr().err
