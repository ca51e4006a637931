"""Export directories: round trips, shards, lazy slices, tokenizers, atomic writes, and errors
that name the file and tensor at fault."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from switchall.data_pipeline.tokenizer import ByteTokenizer, train_sentencepiece
from switchall.models import (
    PretrainedError,
    build_model,
    load_pretrained,
    load_pretrained_state,
    open_pretrained,
    save_pretrained,
)
from switchall.models import pretrained as pretrained_mod
from switchall.models.pretrained import load_pretrained_tokenizer, sha256_file
from tests.models.helpers import tiny_config

VOCAB = 400  # >= 256, so the byte tokenizer is allowed; the sentencepiece test uses 400 too
TOKENS = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))


def trained_like(variant="switchall", pos="xl", seed=0):
    torch.manual_seed(seed)
    return build_model(tiny_config(variant, pos, vocab_size=VOCAB)).eval()


@pytest.fixture
def export(tmp_path):
    model = trained_like()
    save_pretrained(model.state_dict(), model.cfg, tmp_path / "exp", description="Test model.")
    return model, tmp_path / "exp"


@pytest.fixture
def sharded(tmp_path):
    model = trained_like()
    save_pretrained(model.state_dict(), model.cfg, tmp_path / "sh", max_shard_bytes=20_000)
    return model, tmp_path / "sh"


def logits(model):
    with torch.no_grad():
        first = model(TOKENS[:, :8])
        return torch.cat([first.logits_BTV, model(TOKENS[:, 8:], first.memory).logits_BTV], 1)


@pytest.mark.parametrize(
    "variant,pos", [("switchall", "xl"), ("transformer", "rope"), ("sigma_moe", "xl")]
)
def test_fp32_round_trip_is_bitwise(tmp_path, variant, pos):
    model = trained_like(variant, pos)
    save_pretrained(model.state_dict(), model.cfg, tmp_path / "m")
    loaded, cfg = load_pretrained(tmp_path / "m")
    assert cfg == model.cfg and not loaded.training
    assert torch.equal(logits(loaded), logits(model))
    state, _ = load_pretrained_state(tmp_path / "m")
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[n], t) for n, t in model.state_dict().items())
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]


@pytest.mark.parametrize("variant", ["switchall", "transformer"])
def test_bf16_round_trip_within_bf16_tolerance(tmp_path, variant):
    """Stored tensors are the weights rounded to bf16, and the loaded model is exactly the
    original with rounded weights. For the dense model the logits are then within bf16
    rounding of the original's; with routing, rounding may flip a near-tie expert choice of a
    few tokens (a discrete change), so the MoE models are held to the exact check only."""
    model = trained_like(variant, "xl")
    save_pretrained(model.state_dict(), model.cfg, tmp_path / "b", dtype=torch.bfloat16)
    state, _ = load_pretrained_state(tmp_path / "b")
    assert all(state[n].dtype == torch.bfloat16 for n in state)
    assert all(torch.equal(state[n], t.bfloat16()) for n, t in model.state_dict().items())
    loaded, _ = load_pretrained(tmp_path / "b")
    rounded = trained_like(variant, "xl")
    rounded.load_state_dict({n: t.bfloat16().float() for n, t in model.state_dict().items()})
    assert torch.equal(logits(loaded), logits(rounded))
    ref = logits(model)
    assert not torch.equal(logits(loaded), ref)
    if variant == "transformer":
        # bf16 keeps 8 significant bits (relative rounding <= 2^-9 per weight); logits of std ~1
        # move by ~1e-2.
        torch.testing.assert_close(logits(loaded), ref, rtol=0, atol=0.05 * ref.std().item())


def test_sharded_export_equals_single_file(export, sharded):
    model, single = export
    _, shards = sharded
    index = json.loads((shards / "model.safetensors.index.json").read_text())
    files = sorted({*index["weight_map"].values()})
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert set(index["weight_map"]) == set(model.state_dict())
    assert index["metadata"]["total_size"] == sum(
        t.numel() * 4 for t in model.state_dict().values()
    )
    for name in files:
        tensors = load_file(shards / name)
        data = sum(t.numel() * t.element_size() for t in tensors.values())
        assert data <= 20_000 or len(tensors) == 1  # a bigger tensor gets a file of its own
        assert all(index["weight_map"][n] == name for n in tensors)
    a, _ = load_pretrained_state(single)
    b, _ = load_pretrained_state(shards)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert not (shards / "model.safetensors").exists()


def test_open_pretrained_reads_slices(sharded):
    model, path = sharded
    state = model.state_dict()
    with open_pretrained(path) as reader:
        assert set(reader.names()) == set(state)
        for name in ("embedding.weight", "blocks.1.mlp.w1", "blocks.0.attn.o_experts"):
            assert reader.shape(name) == tuple(state[name].shape)
            assert torch.equal(reader.get_slice(name)[1:3], state[name][1:3])
            assert torch.equal(reader.get_slice(name)[:, 2:5], state[name][:, 2:5])
        assert reader.file_of("blocks.1.mlp.w1").name.startswith("model-")
        assert reader.config == model.cfg


def test_tokenizers(tmp_path):
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    lines = (stdlib / "textwrap.py").read_text().splitlines()
    tok = train_sentencepiece(iter(lines), vocab_size=VOCAB, threads=1)
    (tmp_path / "tok.model").write_bytes(tok.model)
    model = trained_like()
    save_pretrained(
        model.state_dict(), model.cfg, tmp_path / "sp", tokenizer_path=tmp_path / "tok.model"
    )
    assert (tmp_path / "sp" / "tokenizer.model").read_bytes() == tok.model
    loaded = load_pretrained_tokenizer(tmp_path / "sp")
    assert loaded.sha256 == tok.sha256 and loaded.encode("def f(x):") == tok.encode("def f(x):")
    info = json.loads((tmp_path / "sp" / "config.json").read_text())["tokenizer"]
    assert info["type"] == "sentencepiece" and info["eod_id"] == tok.eod_id
    save_pretrained(model.state_dict(), model.cfg, tmp_path / "bytes")
    assert isinstance(load_pretrained_tokenizer(tmp_path / "bytes"), ByteTokenizer)
    assert not (tmp_path / "bytes" / "tokenizer.model").exists()
    small = build_model(tiny_config())  # vocab 50: cannot be bytes
    with pytest.raises(ValueError, match="vocab_size=50"):
        save_pretrained(small.state_dict(), small.cfg, tmp_path / "small")
    (tmp_path / "sp" / "tokenizer.model").write_bytes(tok.model + b"\0")
    with pytest.raises(PretrainedError, match="tokenizer.model"):
        load_pretrained_tokenizer(tmp_path / "sp")


def test_readme_and_config(export):
    model, path = export
    meta = json.loads((path / "config.json").read_text())
    assert meta["format"] == "switchall.pretrained" and meta["format_version"] == 1
    assert meta["dtype"] == "float32" and meta["tokenizer"]["type"] == "byte"
    params = sum(p.numel() for p in model.parameters())
    assert meta["parameters"] == params
    files = meta["weights"]["files"]
    assert files["model.safetensors"]["sha256"] == sha256_file(path / "model.safetensors")
    readme = (path / "README.md").read_text()
    assert "switchall" in readme and f"{params:,}" in readme and "Test model." in readme


def test_replaces_an_export_atomically(export, tmp_path, monkeypatch):
    model, path = export
    before = (path / "model.safetensors").read_bytes()
    other = trained_like(seed=5)
    calls = []

    def failing_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return save_file(*args, **kwargs)

    monkeypatch.setattr(pretrained_mod, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(other.state_dict(), other.cfg, path, max_shard_bytes=20_000)
    assert (path / "model.safetensors").read_bytes() == before  # the old export is intact
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    monkeypatch.undo()
    save_pretrained(other.state_dict(), other.cfg, path)
    loaded, _ = load_pretrained(path)
    assert torch.equal(logits(loaded), logits(other))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(PretrainedError, match="not a switchall export"):
        save_pretrained(other.state_dict(), other.cfg, tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"


def test_save_refuses_a_state_dict_that_is_not_the_model(tmp_path):
    model = trained_like()
    state = model.state_dict()
    del state["blocks.1.mlp.w2"]
    with pytest.raises(PretrainedError, match="'blocks.1.mlp.w2' is missing"):
        save_pretrained(state, model.cfg, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="dtype"):
        save_pretrained(model.state_dict(), model.cfg, tmp_path / "x", dtype=torch.float16)


def rewrite(path: Path, fname: str, tensors: dict) -> None:
    """Replace one weight file, keeping config.json's size and hash in step (so only the
    tensor content is at fault)."""
    save_file(tensors, path / fname)
    meta = json.loads((path / "config.json").read_text())
    entry = meta["weights"]["files"][fname]
    entry["bytes"], entry["sha256"] = (path / fname).stat().st_size, sha256_file(path / fname)
    (path / "config.json").write_text(json.dumps(meta))


def edit_config(path: Path, **changes) -> None:
    meta = json.loads((path / "config.json").read_text())
    meta.update(changes)
    (path / "config.json").write_text(json.dumps(meta))


def test_tensor_errors_name_file_and_tensor(export):
    _, path = export
    state = load_file(path / "model.safetensors")
    f = str(path / "model.safetensors")

    rewrite(path, "model.safetensors", {n: t for n, t in state.items() if n != "ln_f.bias"})
    with pytest.raises(PretrainedError, match=f"{f}: tensor 'ln_f.bias' is missing"):
        load_pretrained(path)
    rewrite(path, "model.safetensors", {**state, "extra.weight": torch.zeros(2)})
    with pytest.raises(PretrainedError, match=f"{f}: unexpected tensor 'extra.weight'"):
        load_pretrained(path)
    rewrite(path, "model.safetensors", {**state, "ln_f.bias": torch.zeros(3)})
    with pytest.raises(PretrainedError, match=rf"{f}: tensor 'ln_f.bias' has shape \[3\]"):
        load_pretrained(path)
    rewrite(path, "model.safetensors", {**state, "ln_f.bias": state["ln_f.bias"].double()})
    with pytest.raises(PretrainedError, match=f"{f}: tensor 'ln_f.bias' is F64"):
        load_pretrained(path)


def test_file_errors_name_the_file(sharded):
    _, path = sharded
    second = path / f"model-00002-of-{len(list(path.glob('model-*'))):05d}.safetensors"
    data = second.read_bytes()
    second.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit flipped
    with pytest.raises(PretrainedError, match=f"{second}: sha256 differs"):
        load_pretrained(path)
    second.write_bytes(data[:-10])
    with pytest.raises(PretrainedError, match=f"{second}: .* truncated or corrupt"):
        open_pretrained(path)
    second.unlink()
    with pytest.raises(PretrainedError, match=f"{second}: missing weight file"):
        load_pretrained(path)


def test_index_errors(sharded):
    _, path = sharded
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name, fname = next(iter(index["weight_map"].items()))
    other = next(f for f in index["weight_map"].values() if f != fname)
    index_path.write_text(json.dumps({**index, "weight_map": {**index["weight_map"], name: other}}))
    with pytest.raises(PretrainedError, match=f"{path / other}: tensor '{name}' listed in"):
        open_pretrained(path)
    del index["weight_map"][name]
    index_path.write_text(json.dumps(index))
    with pytest.raises(PretrainedError, match=f"{path / fname}: tensor '{name}' is not listed"):
        open_pretrained(path)


def test_config_errors_name_the_file(export, tmp_path):
    _, path = export
    cfg = str(path / "config.json")
    meta = json.loads((path / "config.json").read_text())
    edit_config(path, format_version=2)
    with pytest.raises(PretrainedError, match=f"{cfg}: format_version 2"):
        load_pretrained(path)
    edit_config(path, format_version=1, format="other")
    with pytest.raises(PretrainedError, match=f"{cfg}: format 'other'"):
        load_pretrained(path)
    edit_config(path, format="switchall.pretrained", model={**meta["model"], "n_layers": 0})
    with pytest.raises(PretrainedError, match=f"{cfg}: model.n_layers: must be >= 1"):
        load_pretrained(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(PretrainedError, match=f"{cfg}: unreadable"):
        load_pretrained(path)
    with pytest.raises(PretrainedError, match="missing; .* is not a switchall export"):
        load_pretrained(tmp_path)
