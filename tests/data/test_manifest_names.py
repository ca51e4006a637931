"""Names a manifest supplies are checked against what `switchall prepare` writes, and a name
that reaches a `pipe:` shell command is quoted: a shard named `train-000000.tar;touch${IFS}X;#`
runs nothing."""

from __future__ import annotations

import json
import shutil

import pytest

from switchall.data_pipeline import DataError, TokenLoader, read_manifest
from switchall.data_pipeline.manifest import fetch, resolve

EVIL = "train-000000.tar;touch${IFS}X;#"


@pytest.fixture
def ds(small_ds, tmp_path):
    out = tmp_path / "ds"
    shutil.copytree(small_ds, out)
    return out


def edit_manifest(ds, edit) -> None:
    path = ds / "manifest.json"
    tree = json.loads(path.read_text())
    edit(tree)
    path.write_text(json.dumps(tree))


def test_an_evil_shard_name_is_refused_before_any_command_runs(ds, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where `touch X` would create X
    edit_manifest(ds, lambda t: t["splits"]["train"]["shards"][0].update(name=EVIL))
    location = f"pipe:cat {ds}/{{}}"
    with pytest.raises(DataError, match=r"splits.train.shards\[0\]: bad shard name"):
        loader = TokenLoader(location, global_batch_size=2, seq_len=16)
        next(iter(loader))
    assert not (tmp_path / "X").exists()


def test_a_name_in_a_pipe_command_is_quoted(ds, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    command = resolve(f"pipe:cat {ds}/{{}}", EVIL)
    assert command == f"pipe:cat {ds}/'{EVIL}'"
    with pytest.raises(DataError):
        fetch(command, "shard", retries=0)  # cat finds no such file; nothing else runs
    assert not (tmp_path / "X").exists()
    # Plain names stay as they are.
    assert resolve(f"pipe:cat {ds}/{{}}", "val-000001.tar") == f"pipe:cat {ds}/val-000001.tar"


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t["splits"]["train"]["shards"][0].update(name="../x.tar"), "bad shard name"),
        (lambda t: t["splits"]["train"]["shards"][1].update(name="train-000000.tar"), "shard 1"),
        (lambda t: t["splits"].update({"va l": t["splits"]["val"]}), "bad split name"),
        (
            lambda t: t["tokenizer"].update(type="sentencepiece", path="../../etc/passwd"),
            "bad path",
        ),
    ],
)
def test_names_outside_the_writers_patterns_are_refused(ds, edit, message):
    edit_manifest(ds, edit)
    with pytest.raises(DataError, match=message):
        read_manifest(ds)
