"""`switchall prepare`: tokenizer and shard round trips, inputs (files, directories, globs,
JSON Lines, weights, validation inputs), determinism across worker counts, and resumption."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import zstandard

from switchall.cli import main as cli_main
from switchall.data_pipeline import DataError, load_tokenizer, read_manifest
from switchall.data_pipeline import corpus as corpus_mod
from switchall.data_pipeline.corpus import split_of
from tests.data.helpers import (
    documents,
    make_dataset,
    synthetic_text,
    tree_bytes,
    write_corpus,
)
from tests.subproc import subprocess_env


def file_texts(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): p.read_text() for p in root.rglob("*.txt")}


def test_byte_shards_round_trip(byte_ds, corpus_dir):
    m = read_manifest(byte_ds)
    assert (m.vocab_size, m.eod_id, m.dtype, m.byte_level) == (256, 0, "uint16", True)
    shards = m.shards("train")
    assert all(s.tokens == 4096 for s in shards[:-1]) and 0 < shards[-1].tokens <= 4096
    texts = file_texts(corpus_dir)
    for split in ("train", "val"):
        got = sorted(bytes(d).decode() for d in documents(byte_ds, split))
        want = sorted(t for k, t in texts.items() if split_of(k, 0.05) == split)
        assert got == want and got
    # Plain tar + npy: any webdataset reader can take it apart; no pickles inside.
    with tarfile.open(byte_ds / shards[0].name) as tar:
        names = tar.getnames()
    assert names[0] == "train-000000-0000.tokens.npy" and all(n.endswith(".npy") for n in names)


def test_sentencepiece_round_trip(tmp_path, corpus_dir):
    ds = make_dataset(tmp_path / "ds", [str(corpus_dir)], tokenizer=None, vocab_size=400)
    m = read_manifest(ds)
    model = (ds / "tokenizer.model").read_bytes()
    assert m.tokenizer["type"] == "sentencepiece" and m.tokenizer["model_type"] == "bpe"
    assert m.tokenizer["sha256"] == hashlib.sha256(model).hexdigest()
    assert (m.vocab_size, m.dtype) == (400, "uint16")
    tok = load_tokenizer(ds)
    assert m.eod_id == tok.eod_id
    texts = file_texts(corpus_dir)
    decoded = sorted(tok.decode(d) for d in documents(ds, "train"))
    assert decoded == sorted(t for k, t in texts.items() if split_of(k, 0.05) == "train")
    # Digits are split, spaces and newlines survive (lossless on code and prose alike).
    sample = "    x = 4567\n\tnaïve 東京  end\n"
    assert tok.decode(tok.encode(sample)) == sample
    # split_digits: no piece holds two digits, even for numbers the corpus repeats ("4567").
    numbers = "4567 123 89 x=31415926 2024"
    pieces = [byte_piece_text(tok.sp.id_to_piece(i)) for i in tok.encode(numbers)]
    assert sum(c.isdigit() for p in pieces for c in p) == sum(c.isdigit() for c in numbers)
    assert all(sum(c.isdigit() for c in p) <= 1 for p in pieces), pieces


def _u64_of(text: str) -> int:
    """The sampling hash as corpus.py documents it: the first 8 bytes of sha256, big-endian."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def byte_piece_text(piece: str) -> str:
    """A byte-fallback piece `<0x3D>` stands for one byte; any other piece for its text."""
    return chr(int(piece[3:5], 16)) if re.fullmatch(r"<0x[0-9A-F]{2}>", piece) else piece


def write_jsonl(path: Path, records: list[dict]) -> Path:
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    if path.suffix == ".gz":
        data = gzip.compress(data, mtime=0)
    elif path.suffix == ".zst":
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


def test_jsonl_weights_and_text_field(tmp_path):
    bodies = {i: synthetic_text(100 + i, 30) for i in range(60)}
    src = tmp_path / "src"
    src.mkdir()
    write_jsonl(src / "a.jsonl", [{"body": bodies[i], "id": i} for i in range(20)])
    write_jsonl(src / "b.jsonl.gz", [{"body": bodies[i]} for i in range(20, 40)])
    write_jsonl(src / "c.jsonl.zst", [{"body": bodies[i]} for i in range(40, 60)])
    (src / "blank.jsonl").write_text('\n{"body": ""}\n')  # blank lines and empty texts: skipped
    inputs = [
        f"{src}/a.jsonl:2",
        f"{src}/b.jsonl.gz",
        f"{src}/c.jsonl.zst:0.5",
        f"{src}/blank.jsonl",
    ]
    ds = make_dataset(tmp_path / "ds", inputs, text_field="body")
    train = Counter(bytes(d).decode() for d in documents(ds, "train"))
    val = Counter(bytes(d).decode() for d in documents(ds, "val"))
    assert all(n == 1 for n in val.values())
    names = {
        i: f"{'abc'[i // 20]}.jsonl{['', '.gz', '.zst'][i // 20]}#{i % 20 + 1}" for i in bodies
    }
    for i, body in bodies.items():
        if split_of(names[i], 0.05) == "val":
            assert val[body] == 1 and train[body] == 0
        elif i < 20:
            assert train[body] == 2  # weight 2: every training document twice
        elif i < 40:
            assert train[body] == 1
        else:  # weight 0.5: taken iff the hash of "pass:name" is in the lower half
            assert train[body] == int(_u64_of(f"0:{names[i]}") < 2**63), names[i]
    taken_c = sum(train[bodies[i]] for i in range(40, 60))
    assert 0 < taken_c < 20  # the rule really leaves some documents out and takes others


def test_validation_inputs_and_big_files(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_mod, "PIECE_BYTES", 1000)  # read big files in many pieces
    big = tmp_path / "train.txt"
    big.write_text(synthetic_text(7, 3000))
    valid = tmp_path / "valid.txt"
    valid.write_text(synthetic_text(8, 500))
    ds = make_dataset(tmp_path / "ds", [str(big)], val_inputs=[str(valid)])
    assert [bytes(d) for d in documents(ds, "train")] == [big.read_bytes()]
    assert [bytes(d) for d in documents(ds, "val")] == [valid.read_bytes()]
    # A trained sentencepiece model adds nothing at the piece boundaries either.
    sp_ds = make_dataset(tmp_path / "sp", [str(big)], tokenizer=None, vocab_size=400)
    tok = load_tokenizer(sp_ds)
    assert [tok.decode(d) for d in documents(sp_ds, "train")] == [big.read_text()]


@pytest.mark.timeout(120)
def test_output_identical_for_1_and_3_workers(tmp_path, corpus_dir, monkeypatch):
    monkeypatch.setattr(corpus_mod, "UNIT_BYTES", 2048)  # many units, so workers interleave
    jsonl = write_jsonl(
        tmp_path / "x.jsonl.zst", [{"text": synthetic_text(i, 40)} for i in range(50)]
    )
    inputs = [str(corpus_dir), f"{jsonl}:1.5"]
    kw = {"tokenizer": None, "vocab_size": 400, "shard_tokens": 2048}
    one = make_dataset(tmp_path / "w1", inputs, workers=1, **kw)
    three = make_dataset(tmp_path / "w3", inputs, workers=3, **kw)
    assert tree_bytes(one) == tree_bytes(three)
    assert len(read_manifest(one).shards("train")) > 5


def test_interrupted_prepare_resumes(tmp_path, corpus_dir, monkeypatch):
    from switchall.data_pipeline import encode, prepare, shards, splitwriter

    monkeypatch.setattr(corpus_mod, "UNIT_BYTES", 4096)
    reference = make_dataset(tmp_path / "ref", [str(corpus_dir)])
    real_write, written = shards.write_shard, []

    def crash_on_fifth(directory, split, index, tokens):
        if len(written) == 4:  # die mid-write: a partial temporary file, no rename
            (directory / f"{split}-{index:06d}.tar.tmp").write_bytes(b"partial")
            raise KeyboardInterrupt
        written.append(index)
        return real_write(directory, split, index, tokens)

    monkeypatch.setattr(splitwriter, "write_shard", crash_on_fifth)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        make_dataset(out, [str(corpus_dir)])
    assert not (out / "manifest.json").exists() and (out / "prepare_state.json").exists()
    with pytest.raises(DataError, match="interrupted"):
        read_manifest(out)
    monkeypatch.setattr(splitwriter, "write_shard", real_write)
    encoded = []

    def counting(unit):
        encoded.append(unit.index)
        return encode.encode_unit(unit)

    monkeypatch.setattr(prepare, "encode_unit", counting)
    make_dataset(out, [str(corpus_dir)])
    assert tree_bytes(out) == tree_bytes(reference)
    assert encoded and encoded[0] > 0  # resumed: the first units were not encoded again


def test_fingerprint_is_the_token_content(tmp_path, corpus_dir, byte_ds):
    """The same corpus prepared from another directory has the same fingerprint (a run resumes
    on it); one changed byte changes it."""
    moved = shutil.copytree(corpus_dir, tmp_path / "elsewhere")
    again = make_dataset(tmp_path / "again", [str(moved)])
    assert read_manifest(again).source != read_manifest(byte_ds).source
    assert read_manifest(again).fingerprint == read_manifest(byte_ds).fingerprint
    first = sorted(moved.rglob("*.txt"))[0]
    first.write_text(first.read_text() + "!")
    changed = make_dataset(tmp_path / "changed", [str(moved)])
    assert read_manifest(changed).fingerprint != read_manifest(byte_ds).fingerprint


def test_rerun_is_a_no_op_and_other_options_are_refused(tmp_path, corpus_dir):
    out = make_dataset(tmp_path / "ds", [str(corpus_dir)])
    before = tree_bytes(out)
    make_dataset(out, [str(corpus_dir)])
    assert tree_bytes(out) == before
    with pytest.raises(DataError, match="already holds a dataset"):
        make_dataset(out, [str(corpus_dir)], shard_tokens=2048)


def test_cli_prepare(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "c", 5)
    out = tmp_path / "ds"
    argv = ["prepare", f"{corpus}/**/*.txt", "--out", str(out), "--tokenizer", "byte"]
    assert cli_main([*argv, "--workers", "1", "--no-progress"]) == 0
    assert "train" in capsys.readouterr().out
    assert read_manifest(out).source["request"]["inputs"][0]["files"] == 5
    assert cli_main(["prepare", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert "no such file or directory" in capsys.readouterr().err


def test_embedded_default_corpus_and_its_split():
    files = corpus_mod.list_files(corpus_mod.InputSpec(corpus_mod.STDLIB))
    keys = [f.key for f in files]
    assert len(keys) > 1000 and "os.py" in keys and "json/decoder.py" in keys
    assert not any(k.split("/")[0] in ("site-packages", "dist-packages") for k in keys)
    assert all(k.endswith(".py") for k in keys)
    val = [k for k in keys if split_of(k, 0.05) == "val"]
    assert 0.03 < len(val) / len(keys) < 0.07
    # The split is a function of the relative path alone (golden values, any machine).
    golden = {"os.py": "train", "json/decoder.py": "train", "xml/sax/xmlreader.py": "val"}
    assert {k: split_of(k, 0.05) for k in golden} == golden


def test_embedded_corpus_slice_with_sentencepiece(tmp_path):
    root = corpus_mod.stdlib_root()
    ds = make_dataset(tmp_path / "ds", [f"{root}/json/*.py"], tokenizer=None, vocab_size=600)
    tok = load_tokenizer(ds)
    sources = {p.read_text() for p in (root / "json").glob("*.py") if p.stat().st_size}
    decoded = {tok.decode(d) for s in ("train", "val") for d in documents(ds, s)}
    assert decoded == sources


KILLED_RUN = """
import sys, time
from pathlib import Path
from switchall.data_pipeline import corpus, prepare, splitwriter
corpus.UNIT_BYTES = 4096
real_write = splitwriter.write_shard

def slow_write(*args):  # slow enough for the test to kill it between shards
    info = real_write(*args)
    time.sleep(0.3)
    return info

splitwriter.write_shard = slow_write
prepare.prepare(prepare.PrepareOptions(out=Path(sys.argv[1]), inputs=[sys.argv[2]], tokenizer=None,
                vocab_size=400, shard_tokens=4096, workers=2, progress=False))
"""


@pytest.mark.timeout(120)
def test_killed_prepare_resumes(tmp_path, corpus_dir, monkeypatch):
    """SIGKILL (no cleanup at all) in the middle of a run with a trained tokenizer and workers."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_RUN, str(out), str(corpus_dir)],
        env=subprocess_env(),
        start_new_session=True,  # its own process group: the kill takes its workers too
    )
    state = out / "prepare_state.json"
    written: list = []
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                splits = json.loads(state.read_bytes())["splits"] if state.exists() else {}
            except json.JSONDecodeError:  # caught mid-replace on a slow disk: look again
                splits = {}
            written = splits.get("train", {}).get("shards", [])
            if len(written) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "prepare finished before it could be killed"
        assert len(written) >= 2, f"no 2 shards written in 90 s: {written}"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    # Killed mid-run: shards recorded as done, no manifest.
    assert not (out / "manifest.json").exists()
    assert all((out / s["name"]).is_file() for s in written[:2])
    monkeypatch.setattr(corpus_mod, "UNIT_BYTES", 4096)
    from switchall.data_pipeline import prepare as prepare_mod

    real_results, encoded = prepare_mod._results, []

    def counting_results(units, *args):  # the units sent to the (spawned) encoding workers
        def seen():
            for unit in units:
                encoded.append(unit.index)
                yield unit

        return real_results(seen(), *args)

    monkeypatch.setattr(prepare_mod, "_results", counting_results)
    kw = {"tokenizer": None, "vocab_size": 400, "workers": 2}
    make_dataset(out, [str(corpus_dir)], **kw)
    assert encoded and min(encoded) > 0  # resumed: the written shards' units are not redone
    monkeypatch.setattr(prepare_mod, "_results", real_results)
    reference = make_dataset(tmp_path / "ref", [str(corpus_dir)], **kw)
    assert tree_bytes(out) == tree_bytes(reference)
