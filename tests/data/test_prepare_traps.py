"""`switchall prepare` traps: a failed prepare does not block the corrected command, an empty
validation split is reported at prepare (and refused by pretrain before it builds anything),
a bad INPUT:WEIGHT names the weight, the vocabulary hints agree with sentencepiece, and
`switchall --version` exists."""

from __future__ import annotations

import gzip
import random

import pytest

from switchall.cli import main as cli_main
from switchall.data_pipeline import DataError
from switchall.data_pipeline.tokenizer import _hint
from tests.data.helpers import make_dataset, write_corpus


def test_a_failed_prepare_does_not_refuse_the_corrected_command(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus", 8)
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(gzip.compress(b'{"text": "fine"}\n' * 50)[:-20])  # truncated gzip
    out = tmp_path / "ds"
    with pytest.raises(DataError, match="corrupt or truncated"):
        make_dataset(out, [str(corpus), str(bad)], shard_tokens=1024)
    make_dataset(out, [str(corpus)], shard_tokens=1024, val_fraction=0.3)
    assert "holds a failed prepare" in capsys.readouterr().err
    assert (out / "manifest.json").is_file() and not (out / "prepare_state.json").exists()


def test_an_interrupted_prepare_of_other_inputs_is_still_refused(tmp_path):
    """Only a failed prepare is discarded; the state of an interrupted one is kept."""
    import json

    corpus = write_corpus(tmp_path / "corpus", 8)
    out = tmp_path / "ds"
    out.mkdir()
    (out / "prepare_state.json").write_text(json.dumps({"fingerprint": "other", "splits": {}}))
    with pytest.raises(DataError, match="interrupted prepare of other inputs"):
        make_dataset(out, [str(corpus)])


def test_an_empty_validation_split_is_reported_at_prepare_and_refused_by_pretrain(tmp_path, capsys):
    one = tmp_path / "one.txt"
    one.write_text("a single document, so the hash split puts nothing in validation\n" * 20)
    out = make_dataset(tmp_path / "ds", [str(one)], shard_tokens=1024)
    err = capsys.readouterr().err
    assert "the validation split is empty" in err and "--val INPUT" in err
    code = cli_main(
        [
            "pretrain",
            "configs/demo_transformer.yaml",
            "model.vocab_size=256",
            f"data.path={out}",
            "--run-dir",
            str(tmp_path / "run"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "no validation split" in err and "--val INPUT" in err
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.parametrize("weight", ["abc", "-1", "0.5.1"])
def test_a_bad_weight_is_named(tmp_path, weight, capsys):
    corpus = write_corpus(tmp_path / "corpus", 2)
    code = cli_main(["prepare", f"{corpus}:{weight}", "--out", str(tmp_path / "ds")])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{weight!r} is not a weight" in err and "no such file" not in err


def test_vocabulary_hints_agree_with_sentencepiece(tmp_path, capsys):
    assert "use --vocab-size 322 or less" in _hint(
        "Vocabulary size too high (8000). Please set it to a value <= 322."
    )
    rng = random.Random(0)
    chars = [chr(c) for c in range(0x4E00, 0x4E00 + 600)]
    text = "\n".join("".join(rng.choice(chars) for _ in range(50)) for _ in range(400))
    (tmp_path / "zh.txt").write_text(text)
    argv = ["prepare", str(tmp_path / "zh.txt"), "--out", str(tmp_path / "ds")]
    assert cli_main([*argv, "--vocab-size", "300", "--workers", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Increase vocab_size" in err  # sentencepiece's own words...
    assert "or more, or --tokenizer byte" in err and "smaller --vocab-size" not in err  # ...ours


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("switchall 0.1.0")
