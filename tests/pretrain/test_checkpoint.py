"""The checkpoint directory protocol: atomic, verified, pruned in a disk-safe order, and never a
directory that looks complete without being so (kill mid-save, kill mid-delete, full disk)."""

from __future__ import annotations

import errno
import json
import math
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from switchall.pretrain import checkpoint as ckpt_mod
from switchall.pretrain.checkpoint import CheckpointError, CheckpointManager
from tests.subproc import subprocess_env


def writer(payload: bytes, name: str = "data.bin"):
    def write(tmp: Path) -> list[str]:
        (tmp / name).write_bytes(payload)
        return [name]

    return write


def save(mgr: CheckpointManager, step: int, payload: bytes = b"x" * 100) -> Path:
    return mgr.save(step, writer(payload), {"note": step})


def test_save_verify_prune(tmp_path):
    mgr = CheckpointManager(tmp_path / "ck", keep=2)
    for step in (10, 20, 30):
        save(mgr, step, bytes([step]) * 50)
    assert [s for s, _ in mgr.complete()] == [20, 30]
    latest = mgr.latest()
    meta = mgr.read_meta(latest)
    assert meta["note"] == 30 and meta["step"] == 30 and meta["format_version"] == 2
    assert meta["files"]["data.bin"]["bytes"] == 50
    assert mgr.verify(latest) == []
    assert mgr.select_resume() == latest
    # meta.json is what marks a checkpoint complete: without it the step is not offered.
    (latest / "meta.json").unlink()
    assert [s for s, _ in mgr.complete()] == [20] and mgr.latest().name == "step_00000020"


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda c: _corrupt(c / "data.bin"), r"data\.bin: checksum mismatch"),
        (lambda c: (c / "data.bin").unlink(), r"data\.bin: missing checkpoint file"),
        (lambda c: (c / "meta.json").write_text("{not json"), r"meta\.json: unreadable"),
        (lambda c: (c / "data.bin").write_bytes(b"short"), r"data\.bin: 5 bytes"),
    ],
)
def test_a_bad_latest_checkpoint_falls_back_loudly(tmp_path, capsys, damage, reason):
    mgr = CheckpointManager(tmp_path, keep=3)
    for step in (1, 2, 3):
        save(mgr, step)
    damage(tmp_path / "step_00000003")
    assert mgr.select_resume() == tmp_path / "step_00000002"
    err = capsys.readouterr().err
    assert "WARNING: skipping checkpoint" in err and "step_00000003" in err
    assert len(mgr.skipped) == 1 and mgr.skipped[0][0] == tmp_path / "step_00000003"
    assert re.search(reason, mgr.skipped[0][1]), mgr.skipped
    # Moved aside (kept for a look), so neither resume nor pruning takes it for a good one.
    assert [s for s, _ in mgr.complete()] == [1, 2]
    assert any(p.name.startswith("step_00000003.corrupt-") for p in tmp_path.iterdir())


def test_prune_before_save_fits_a_disk_of_keep_checkpoints(tmp_path, monkeypatch):
    """With room for exactly `keep` checkpoints, every save succeeds: the oldest is deleted
    before the new one is written (pruning after the save would need room for keep + 1)."""
    size, keep = 1000, 3
    root = tmp_path / "ck"

    def quota_writer(tmp: Path) -> list[str]:
        used = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        if used + size > keep * size + 600:  # meta.json files are small
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "data.bin"))
        (tmp / "data.bin").write_bytes(b"y" * size)
        return ["data.bin"]

    mgr = CheckpointManager(root, keep=keep)
    for step in range(1, 9):
        mgr.save(step, quota_writer, {})
    assert [s for s, _ in mgr.complete()] == [6, 7, 8]


def test_full_disk_names_the_path_and_leaves_no_temporary(tmp_path):
    mgr = CheckpointManager(tmp_path / "ck", keep=2)
    save(mgr, 1)

    def full(tmp: Path) -> list[str]:
        (tmp / "part.bin").write_bytes(b"z" * 10)
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "part.bin"))

    with pytest.raises(
        CheckpointError, match=r"\.tmp-step_00000002/part\.bin: No space left on device"
    ):
        mgr.save(2, full, {})
    assert [p.name for p in (tmp_path / "ck").iterdir()] == ["step_00000001"]


def test_start_removes_stale_temporaries_and_trash(tmp_path):
    root = tmp_path / "ck"
    mgr = CheckpointManager(root)
    save(mgr, 1)
    (root / ".tmp-step_00000002").mkdir()
    (root / ".tmp-step_00000002" / "__0_0.distcp").write_bytes(b"partial")
    (root / ".trash-step_00000000-1-2").mkdir()
    mgr.start()
    assert sorted(p.name for p in root.iterdir()) == ["step_00000001"]


def test_start_names_a_directory_it_cannot_write(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(CheckpointError, match="cannot write checkpoints"):
        CheckpointManager(blocker / "ck").start()


def test_a_kill_during_pruning_never_leaves_a_complete_looking_checkpoint(tmp_path, monkeypatch):
    """Deleting renames the directory out of the `step_*` names first: a kill half-way
    through the delete (here: rmtree dies after removing the data file) leaves trash."""
    mgr = CheckpointManager(tmp_path, keep=2)
    save(mgr, 1)
    save(mgr, 2)
    real_rmtree = ckpt_mod.shutil.rmtree

    def dies_half_way(path, ignore_errors=False):
        (Path(path) / "data.bin").unlink()
        raise KeyboardInterrupt  # the kill

    monkeypatch.setattr(ckpt_mod.shutil, "rmtree", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        save(mgr, 3)
    monkeypatch.setattr(ckpt_mod.shutil, "rmtree", real_rmtree)
    for _, path in mgr.complete():
        assert mgr.verify(path) == [], path
    assert mgr.select_resume() == tmp_path / "step_00000002"


def test_replacing_a_step_trashes_the_old_one_first(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=2)
    save(mgr, 5, b"old")
    _corrupt(tmp_path / "step_00000005" / "data.bin")
    save(mgr, 5, b"new")
    assert (tmp_path / "step_00000005" / "data.bin").read_bytes() == b"new"
    assert mgr.verify(tmp_path / "step_00000005") == []


def test_old_per_rank_format_is_refused_with_what_to_do(tmp_path):
    old = tmp_path / "step_00000004"
    old.mkdir()
    for name in ("model_rank0.pt", "train_state_rank0.pt"):
        (old / name).write_bytes(b"old")
    (old / "files_rank0.json").write_text("{}")
    (old / "meta.json").write_text(json.dumps({"step": 4, "layout": "single"}))
    mgr = CheckpointManager(tmp_path)
    with pytest.raises(CheckpointError, match="old per-rank format.*switchall checkpoint convert"):
        mgr.select_resume()
    with pytest.raises(CheckpointError, match="old per-rank format"):
        mgr.read_meta(old)


# The child saves checkpoint 2 and SIGKILLs itself in the middle of the real writer's
# `die_at`-th file write (0 the data file w.pt, 1 meta.json, the last): the `open` that
# `switchall.fileio.write_atomic` calls hands back a file whose write puts half the bytes on
# disk, then kills the process. Nothing is renamed, no cleanup runs.
KILLED_SAVE = """
import builtins, os, signal, sys
from pathlib import Path
from switchall import fileio
from switchall.pretrain.checkpoint import CheckpointManager

root, die_at = sys.argv[1], int(sys.argv[2])
opened = []

class HalfThenDie:
    def __init__(self, f):
        self.f = f
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.f.close()
    def write(self, data):
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        os.fsync(self.f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    def __getattr__(self, name):
        return getattr(self.f, name)

def open_and_die(path, mode="r", *args, **kwargs):
    f = builtins.open(path, mode, *args, **kwargs)
    if "w" in mode:
        opened.append(path)
        if len(opened) == die_at + 1:
            return HalfThenDie(f)
    return f

def write(tmp: Path) -> list[str]:
    fileio.write_atomic(tmp / "w.pt", b"2" * 100_000, sync_dir=False)
    return ["w.pt"]

fileio.open = open_and_die  # the writer's own `open`, looked up in its module first
CheckpointManager(root, keep=5).save(2, write, {"ok": False})
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("die_at", "partial"), [(0, "w.pt.tmp"), (1, "meta.json.tmp")])
def test_kill_during_save_leaves_previous_checkpoint_usable(tmp_path, die_at, partial):
    root = tmp_path / "ck"
    mgr = CheckpointManager(root, keep=5)
    save(mgr, 1)
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_SAVE, str(root), str(die_at)],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert proc.returncode == -9, proc.stderr  # killed by SIGKILL, inside the write
    # The kill came mid-save: the temporary checkpoint holds a half-written temporary file.
    tmp = root / ".tmp-step_00000002"
    assert (tmp / partial).is_file() and not (root / "step_00000002").exists()
    assert not (tmp / partial.removesuffix(".tmp")).exists()
    assert [s for s, _ in mgr.complete()] == [1] and mgr.select_resume().name == "step_00000001"
    assert mgr.verify(mgr.latest()) == [] and mgr.read_meta(mgr.latest())["note"] == 1
    mgr.start()  # the next run cleans up the killed run's temporary directory
    assert not any(p.name.startswith((".tmp-", ".trash-")) for p in root.iterdir())
    save(mgr, 3)
    assert [s for s, _ in mgr.complete()] == [1, 3]


# ----------------------------------------------------------------------------- DCP pieces
def test_flat_ranges_become_few_contiguous_boxes():
    """Every flat range of small row-major tensors: the boxes tile it in order, at most
    2 * ndim - 1 of them (what ZeRO partitions of a parameter turn into)."""
    from switchall.checkpoint.boxes import flat_range_boxes

    for shape in [(5,), (3, 4), (2, 3, 4), (4, 1, 3)]:
        n = math.prod(shape)
        x = torch.arange(n).view(shape)
        for a in range(n + 1):
            for b in range(a, n + 1):
                boxes = flat_range_boxes(shape, a, b - a)
                assert len(boxes) <= 2 * len(shape) - 1, (shape, a, b, boxes)
                pieces = [
                    x[tuple(slice(o, o + s) for o, s in zip(off, size, strict=True))]
                    for off, size in boxes
                ]
                got = torch.cat([p.flatten() for p in pieces]) if pieces else torch.empty(0)
                assert torch.equal(got, torch.arange(a, b)), (shape, a, b, boxes)


def test_dcp_reshards_between_flat_partitions_and_row_blocks(tmp_path):
    """Saved as three flat partitions of each tensor (ZeRO-like), loaded as row blocks (TP-like)."""
    from switchall.checkpoint import dcp_io
    from switchall.checkpoint.boxes import GlobalTensor

    full = torch.randn(6, 7, dtype=torch.float64)
    flat = full.flatten().clone()
    saved = GlobalTensor((6, 7), flat.dtype)
    param = torch.empty(6, 7)
    for start, stop in ((0, 10), (10, 31), (31, 42)):
        for box in GlobalTensor.of_flat_range(param, start, flat[start:stop], (6, 7)).boxes:
            saved.add(box.offsets, box.tensor)
    dcp_io.save({"w": saved}, tmp_path, no_dist=True)
    dest = torch.zeros(6, 7, dtype=torch.float64)
    rows = GlobalTensor((6, 7), dest.dtype)
    rows.add((0, 0), dest[:4])
    rows.add((4, 0), dest[4:])
    dcp_io.load({"w": rows}, tmp_path, no_dist=True)
    assert torch.equal(dest, full)


def test_loading_never_unpickles(tmp_path):
    """DCP's pickled `.metadata` is neither written nor read: a hostile one runs nothing."""
    from switchall.checkpoint import dcp_io
    from switchall.checkpoint.boxes import GlobalTensor

    t = torch.arange(6.0)
    dcp_io.save({"w": GlobalTensor.of_shard(t)}, tmp_path, no_dist=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["__0_0.distcp", "dcp_metadata.json"]
    marker = tmp_path / "pwned"

    class Hostile:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / ".metadata").write_bytes(pickle.dumps(Hostile()))
    dest = torch.zeros(6)
    dcp_io.load({"w": GlobalTensor.of_shard(dest)}, tmp_path, no_dist=True)
    assert torch.equal(dest, t) and not marker.exists()


def test_model_sections_compare_through_the_model_config():
    """A checkpoint written before a model field existed (here `routing_init` and
    `output_init`) resumes: missing fields compare at their defaults; `init_from` is ignored;
    any real difference is not."""
    from switchall.config import load_run_config
    from switchall.configtools import to_dict
    from switchall.pretrain.setup import same_architecture

    current = to_dict(load_run_config("configs/demo_switchall.yaml").model)
    older = {k: v for k, v in current.items() if k not in ("routing_init", "output_init")}
    assert older != current and same_architecture(older, current)
    assert same_architecture({**current, "init_from": "/some/export"}, current)
    assert not same_architecture({**current, "d_model": current["d_model"] * 2}, current)
    assert not same_architecture({**older, "routing_init": "row_std"}, current)
