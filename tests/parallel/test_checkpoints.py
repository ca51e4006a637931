"""Layout-free checkpoints: saved under one layout, resumed under another.

For each save -> load pair of the matrix (DP 2->1, 1->2; TP 2->1, 1->2; EP 2->1, 1->4, 2->4,
2 -> TP 2; ZeRO 1->2, 2->0, 3->1 on the dense model; TP=2 x EP=2 -> DP=4):
- the state the loading run holds right after the load (weights, both AdamW moments and the
  step of every parameter, XL memory), box by box on every rank, equals the checkpoint's
  tensors bitwise, and the boxes of all ranks cover every tensor;
- the continued losses match the uninterrupted run's to CONTINUE_RTOL relative (dropout 0;
  what differs is the order of floating-point reductions of another layout: measured below
  3e-7 on this machine).
Under the same layout the resumed run is bitwise the uninterrupted one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from switchall.checkpoint import dcp_io
from switchall.checkpoint.consolidate import read_entries
from switchall.checkpoint.entries import memory_entries
from switchall.config import load_run_config
from switchall.pretrain.metrics import read_metrics
from switchall.pretrain.runtime import LocalRuntime
from switchall.pretrain.trainer import Trainer
from tests.parallel.conftest import (
    CURVE_STEPS,
    RESHARD_FOUR,
    RESHARD_TWO,
    SPLIT_AT,
    train_records,
)

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(600)]

CONTINUE_RTOL = 1e-5
EXPERT_LAYERS = ("blocks.0.mlp", "blocks.1.mlp")


def ckpt_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:08d}"


def check_state(dumps: list[dict], want: dict[str, torch.Tensor]) -> None:
    """Every box every rank holds equals `want` there; together they cover every tensor."""
    covered = {k: torch.zeros(v.shape, dtype=torch.bool) for k, v in want.items()}
    for dump in dumps:
        assert set(dump["boxes"]) == set(want), set(dump["boxes"]) ^ set(want)
        for key, boxes in dump["boxes"].items():
            for offsets, t in boxes:
                where = tuple(slice(o, o + s) for o, s in zip(offsets, t.shape, strict=True))
                assert torch.equal(t.cpu(), want[key][where]), (key, dump["rank"], offsets)
                covered[key][where] = True
    assert all(c.all() for c in covered.values()), [k for k, c in covered.items() if not c.all()]


def rank_dumps(out: Path, name: str, when: str) -> list[dict]:
    paths = sorted(out.glob(f"{name}_{when}_rank*.pt"))
    assert paths, f"no {when} dumps of {name}"
    return [torch.load(p, weights_only=True) for p in paths]


def max_rel(got: list[dict], want: list[dict]) -> float:
    want_by_step = {r["step"]: r["loss"] for r in want}
    return max(abs(r["loss"] - want_by_step[r["step"]]) / abs(want_by_step[r["step"]]) for r in got)


def uninterrupted(results, reference, source: str) -> list[dict]:
    if "transformer" in source:
        return train_records(reference["transformer"])
    if "tp2_ep2_dp2_z2" in source:  # a 4-step schedule of its own
        return train_records(results["tp2_ep2_dp2_z2"]["history"])
    return train_records(reference["switchall"])


def source_dir(source: str, reference, two_out: Path, four_out: Path | None) -> Path:
    if source == "single":
        return reference["switchall_stop_dir"]
    for root in (two_out, four_out):
        if root is not None and (root / source).is_dir():
            return root / source
    raise AssertionError(source)


@pytest.mark.parametrize(
    "launch, name, source, stop",
    [("two_ranks", n, src, stop) for n, src, stop, _ in RESHARD_TWO]
    + [("four_ranks", n, src, stop) for n, src, stop, _ in RESHARD_FOUR],
)
def test_resume_under_another_layout(request, reference, two_ranks, launch, name, source, stop):
    results, out = request.getfixturevalue(launch)
    four_out = out if launch == "four_ranks" else None
    src = ckpt_dir(source_dir(source, reference, two_ranks[1], four_out), stop)
    saved = read_entries(src)
    assert {k.split("/")[0] for k in saved} >= {"model", "optim"}
    check_state(rank_dumps(out, name, "start"), saved)
    continued = train_records(results[name]["history"])
    steps = [r["step"] for r in continued]
    assert steps == list(range(stop + 1, steps[-1] + 1)) and steps[-1] in (4, 6, CURVE_STEPS)
    want = uninterrupted(results, reference, source)
    assert max_rel(continued, want) <= CONTINUE_RTOL, (continued, want)
    resume = [r for r in read_metrics(out / name / "metrics.jsonl") if r.get("event") == "resume"]
    # RNG streams continue only under the same number of ranks and tensor-parallel size.
    saved_layout = json.loads((src / "meta.json").read_text())["layout"]
    tp, world = int(results[name]["layout"].split("-")[0][2:]), 2 if launch == "two_ranks" else 4
    same = (saved_layout["tensor"], saved_layout["world_size"]) == (tp, world)
    assert resume[0]["step"] == stop and resume[0]["rng"] == ("restored" if same else "reseeded")


def test_each_rank_reads_only_its_slices(two_ranks, four_ranks):
    """EP=2 -> EP=4 at ZeRO-2: rank 0 needs every dense weight, a quarter of the dense moments
    and one expert of four: 57% of this tiny checkpoint's bytes (per-chunk overhead included),
    where reading everything would be 100%."""
    _, out = four_ranks
    src = ckpt_dir(two_ranks[1] / "ep2_z2_split", SPLIT_AT)
    total = sum(p.stat().st_size for p in src.glob("*.distcp"))
    resume = next(
        r for r in read_metrics(out / "ep2_to_ep4" / "metrics.jsonl") if r.get("event") == "resume"
    )
    assert 0 < resume["bytes_read"] < 0.7 * total, (resume["bytes_read"], total)


@pytest.mark.parametrize(
    "source, layout_name",
    [("dp2_z1_split", "dp2_to_dp1"), ("tp2_split", "tp2_to_tp1"), ("ep2_z2_split", "ep2_to_ep1")],
)
def test_resume_in_one_process(two_ranks, reference, tmp_path, source, layout_name):
    """DP 2->1, TP 2->1, EP 2->1: a torchrun checkpoint resumes in one plain process."""
    _, out = two_ranks
    run = tmp_path / layout_name
    shutil.copytree(ckpt_dir(out / source, SPLIT_AT), ckpt_dir(run, SPLIT_AT))
    shutil.copy(out / source / "config.yaml", run / "config.yaml")
    cfg = load_run_config(
        run / "config.yaml", ["parallel.tensor=1", "parallel.expert=1", "parallel.zero_stage=0"]
    )
    trainer = Trainer(cfg, run, LocalRuntime(torch.device("cpu")), resume=True)
    entries = trainer.engine.checkpoint_entries(optimizer=True)
    entries.update(memory_entries(trainer.memory, cfg.train.batch_size, 0))
    boxes = {
        k: [(b.offsets, b.tensor.detach().clone()) for b in g.boxes] for k, g in entries.items()
    }
    check_state([{"rank": 0, "boxes": boxes}], read_entries(ckpt_dir(run, SPLIT_AT)))
    continued = train_records(trainer.run()["history"])
    assert [r["step"] for r in continued] == list(range(SPLIT_AT + 1, CURVE_STEPS + 1))
    assert max_rel(continued, train_records(reference["switchall"])) <= CONTINUE_RTOL


def test_every_expert_saved_once_and_back_as_the_same_expert(two_ranks, four_ranks, tmp_path):
    """Trained at EP=2; each expert's weights and moments, read back at EP=4 and TP=2 (and EP=1
    in `test_resume_in_one_process`), are bitwise the saving run's values of that expert."""
    _, two_out = two_ranks
    _, four_out = four_ranks
    src = ckpt_dir(two_out / "ep2_z2_split", SPLIT_AT)
    md = dcp_io.read_metadata(src).state_dict_metadata
    for layer in EXPERT_LAYERS:
        for w in ("w1", "w2"):
            for key in (f"model/{layer}.{w}", f"optim/{layer}.{w}/exp_avg"):
                # Each expert once: two chunks of two experts (the EP=2 ranks' shares).
                chunks = sorted((tuple(c.offsets), tuple(c.sizes)) for c in md[key].chunks)
                assert [(o[0], s[0]) for o, s in chunks] == [(0, 2), (2, 2)], (key, chunks)
    saving = {d["rank"]: d for d in rank_dumps(two_out, "ep2_z2_stop", "end")}
    for name, out in (("ep2_to_ep4", four_out), ("ep2_to_tp2", two_out)):
        loaded = rank_dumps(out, name, "start")
        for layer in EXPERT_LAYERS:
            for what in ("model/{}.{}", "optim/{}.{}/exp_avg", "optim/{}.{}/exp_avg_sq"):
                for w in ("w1", "w2"):
                    key = what.format(layer, w)
                    for dump in loaded:
                        for offsets, t in dump["boxes"][key]:
                            for i in range(t.shape[0]):
                                expert = offsets[0] + i
                                owner = saving[expert // 2]  # EP=2: rank r held experts 2r, 2r+1
                                (o, full), *_ = owner["boxes"][key]
                                rows = [
                                    slice(a, a + s)
                                    for a, s in zip(offsets[1:], t.shape[1:], strict=True)
                                ]
                                want = full[(expert - o[0], *rows)]
                                assert torch.equal(t[i], want), (name, key, expert)


def test_resume_under_the_same_layout_continues_identically(two_ranks, four_ranks):
    """Stopped, then resumed under the same layout: the same losses, bit for bit."""
    for (results, _), name, stop, steps in (
        (two_ranks, "ep2_z2", SPLIT_AT, CURVE_STEPS),
        (two_ranks, "transformer_z3", 3, 6),
        (four_ranks, "tp2_ep2_dp2_z2", 2, 4),
    ):
        full = {r["step"]: r["loss"] for r in train_records(results[name]["history"])}
        stopped = train_records(results[f"{name}_stop"]["history"])
        resumed = train_records(results[f"{name}_resume"]["history"])
        assert [r["step"] for r in stopped] == list(range(1, stop + 1))
        assert [r["step"] for r in resumed] == list(range(stop + 1, steps + 1))
        assert {r["step"]: r["loss"] for r in stopped + resumed} == full, name
        val = [r["val_loss"] for r in results[name]["history"] if "val_loss" in r]
        val_resumed = [
            r["val_loss"] for r in results[f"{name}_resume"]["history"] if "val_loss" in r
        ]
        assert val[-1] == val_resumed[-1], name


def test_checkpoint_metadata_is_json_and_records_the_layout(two_ranks):
    _, out = two_ranks
    ckpt = ckpt_dir(out / "ep2_z2_split", SPLIT_AT)
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["layout"]["name"] == "tp1-ep2-dp2-zero2" and meta["layout"]["world_size"] == 2
    assert set(meta["files"]) == {p.name for p in ckpt.iterdir() if p.name != "meta.json"}
    # No pickle anywhere: DCP's own pickled `.metadata` is not written.
    assert not (ckpt / ".metadata").exists()
    json.loads((ckpt / dcp_io.METADATA_FILE).read_text())
