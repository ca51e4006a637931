"""Bad input gets a clear error naming the shard, file or field: truncated, corrupt and missing
shards, a foreign tokenizer, broken manifests and broken corpus files. Skipping bad shards is
an explicit option, and then every other token keeps its place."""

from __future__ import annotations

import gzip
import json
import logging
import shutil

import numpy as np
import pytest
import zstandard

from switchall.data_pipeline import DataError, TokenLoader, read_manifest
from switchall.data_pipeline.shards import load_shard
from tests.data.helpers import make_dataset, synthetic_text

GBS, T = 16, 64


@pytest.fixture
def ds(small_ds, tmp_path):
    return shutil.copytree(small_ds, tmp_path / "ds")


def one_epoch(location, **kw) -> np.ndarray:
    loader = TokenLoader(location, global_batch_size=GBS, seq_len=T, **kw)
    return np.stack([loader.batch(k).numpy() for k in range(loader.batches_per_epoch)])


def damage(ds, how: str) -> str:
    name = read_manifest(ds).shards("train")[3].name
    data = (ds / name).read_bytes()
    if how == "truncated":
        (ds / name).write_bytes(data[: len(data) // 2])
    elif how == "corrupt":
        (ds / name).write_bytes(data[:3000] + bytes([data[3000] ^ 1]) + data[3001:])
    else:
        (ds / name).unlink()
    return name


@pytest.mark.parametrize(
    ("how", "message"),
    [("truncated", "truncated: "), ("corrupt", "sha256 mismatch"), ("missing", "missing")],
)
def test_bad_shard_is_a_clear_error(ds, how, message):
    name = damage(ds, how)
    with pytest.raises(DataError, match=rf"shard {name}: {message}.*{name}"):
        one_epoch(ds)


def test_skipping_bad_shards_keeps_everything_else_in_place(ds, small_ds, caplog):
    clean = one_epoch(small_ds)
    name = damage(ds, "corrupt")
    with caplog.at_level(logging.WARNING):
        skipped = one_epoch(ds, skip_bad_shards=True)
    assert f"skipping bad shard {name}: shard {name}: sha256 mismatch" in caplog.text
    # Rows that overlap the bad shard's stretch of the epoch-0 stream changed; no other row did.
    order = TokenLoader(small_ds, global_batch_size=GBS, seq_len=T).order
    order_S, offsets = order.stream_map(0)
    bad = [s.name for s in read_manifest(ds).shards("train")].index(name)
    pos = order_S.tolist().index(bad)
    lo, hi = offsets[pos], offsets[pos + 1]
    starts = np.stack([order.row_starts(k, 0, GBS)[1] for k in range(len(clean))])
    touched = (starts < hi) & (starts + T + 1 > lo)
    assert touched.any() and (skipped[~touched] == clean[~touched]).all()
    assert not (skipped[touched] == clean[touched]).all()
    # What stands in: the next shard of the epoch's order, cut or repeated to the bad one's
    # length (README). Rebuild the epoch-0 stream that way and read every row from it.
    m = read_manifest(small_ds)
    shards = m.shards("train")
    tokens = [load_shard(m.url(s.name), s, m.dtype).astype(np.int64) for s in shards]
    stand_in = order_S[(pos + 1) % len(order_S)]
    tokens[bad] = np.resize(tokens[stand_in], shards[bad].tokens)
    stream = np.concatenate([tokens[i] for i in order_S])
    for k in range(len(clean)):
        for row, start in zip(skipped[k], starts[k], strict=True):
            assert (row == stream[start : start + T + 1]).all(), k


def test_tokenizer_mismatch_names_the_manifest(ds):
    with pytest.raises(DataError, match=rf"{ds}/manifest.json: the dataset's tokenizer"):
        TokenLoader(ds, global_batch_size=GBS, seq_len=T, expected_tokenizer_sha256="0" * 64)
    good = read_manifest(ds).tokenizer["sha256"]
    TokenLoader(ds, global_batch_size=GBS, seq_len=T, expected_tokenizer_sha256=good)


def test_broken_manifests(ds, tmp_path):
    path = ds / "manifest.json"
    tree = json.loads(path.read_text())
    path.write_text("{not json")
    with pytest.raises(DataError, match=r"manifest.json: not valid JSON"):
        read_manifest(ds)
    del tree["splits"]["train"]["shards"][0]["sha256"]
    path.write_text(json.dumps(tree))
    with pytest.raises(DataError, match=r"splits.train.shards\[0\]: missing field 'sha256'"):
        read_manifest(ds)
    with pytest.raises(DataError, match="does not exist"):
        read_manifest(tmp_path / "nothing")


def test_shard_that_disagrees_with_its_manifest_entry(ds):
    m = read_manifest(ds)
    info = m.shards("train")[0]
    from dataclasses import replace

    with pytest.raises(DataError, match=r"\d+ tokens, the manifest says"):
        load_shard(m.url(info.name), replace(info, tokens=info.tokens + 1), m.dtype)
    with pytest.raises(DataError, match="is uint16"):
        load_shard(m.url(info.name), info, "uint32")


def test_bad_corpus_files_are_named(tmp_path):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(DataError, match=rf"{bad_json}:2: not a valid JSON line"):
        make_dataset(tmp_path / "a", [str(bad_json)])
    no_field = tmp_path / "nofield.jsonl"
    no_field.write_text('{"text": "ok"}\n{"content": "x"}\n')
    with pytest.raises(DataError, match=rf"{no_field}:2: field 'text' is missing"):
        make_dataset(tmp_path / "b", [str(no_field)])
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("café au lait\n".encode("latin-1"))
    with pytest.raises(DataError, match=rf"{latin}: not UTF-8 text.*--encoding-errors replace"):
        make_dataset(tmp_path / "c", [str(latin)], tokenizer=None, val_fraction=0.0)
    make_dataset(tmp_path / "d", [str(latin)], encoding_errors="replace", val_fraction=0.0)
    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"text\nwith a \x00 inside\n")
    with pytest.raises(DataError, match=rf"{nul}: holds a NUL byte \(byte 12 .*end-of-document"):
        make_dataset(tmp_path / "n1", [str(nul)], val_fraction=0.0)
    nul_json = tmp_path / "nul.jsonl"
    nul_json.write_text(json.dumps({"text": "a\u0000b"}) + "\n")
    with pytest.raises(DataError, match=rf"{nul_json}:1: holds a NUL byte \(byte 1 "):
        make_dataset(tmp_path / "n2", [str(nul_json)], val_fraction=0.0)
    lines = "".join(json.dumps({"text": synthetic_text(i, 50)}) + "\n" for i in range(40))
    compressors = {".gz": gzip.compress, ".zst": zstandard.ZstdCompressor().compress}
    for suffix, compress in compressors.items():
        truncated = tmp_path / f"cut.jsonl{suffix}"
        data = compress(lines.encode())
        truncated.write_bytes(data[: len(data) // 2])
        with pytest.raises(DataError, match=rf"{truncated}: corrupt or truncated compressed"):
            make_dataset(tmp_path / f"e{suffix}", [str(truncated)])
    not_a_model = tmp_path / "x.model"
    not_a_model.write_bytes(b"nonsense")
    with pytest.raises(DataError, match=rf"{not_a_model}: not a sentencepiece model"):
        make_dataset(tmp_path / "f", [str(latin)], tokenizer=str(not_a_model))
