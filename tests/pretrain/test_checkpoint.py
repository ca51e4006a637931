"""Checkpoints are atomic, verified, pruned, and survive a kill mid-save."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from switchall.pretrain.checkpoint import CheckpointError, CheckpointManager
from tests.subproc import subprocess_env


def test_save_load_prune(tmp_path):
    mgr = CheckpointManager(tmp_path / "ck", keep=2)
    for step in (10, 20, 30):
        mgr.save(step, {"w.pt": {"x": torch.full((3,), float(step))}}, {"note": step})
    assert [s for s, _ in mgr.complete()] == [20, 30]
    latest = mgr.latest()
    assert latest.name == "step_00000030"
    assert mgr.read_meta(latest)["note"] == 30
    assert torch.equal(mgr.load(latest, "w.pt")["x"], torch.full((3,), 30.0))
    # meta.json is what marks a checkpoint complete: without it the step is not offered.
    (latest / "meta.json").unlink()
    assert [s for s, _ in mgr.complete()] == [20] and mgr.latest().name == "step_00000020"


def test_corruption_is_named(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=2)
    path = mgr.save(1, {"w.pt": torch.arange(100)}, {})
    data = bytearray((path / "w.pt").read_bytes())
    data[-20] ^= 0xFF
    (path / "w.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"w\.pt: checksum mismatch"):
        mgr.load(path, "w.pt")
    (path / "w.pt").unlink()
    with pytest.raises(CheckpointError, match="missing checkpoint file"):
        mgr.load(path, "w.pt")


# The child saves checkpoint 2 and SIGKILLs itself in the middle of the real writer's
# `die_at`-th file write (0 w.pt, 1 v.pt, 2 files_rank0.json, 3 meta.json, the last): the
# `open` that `switchall.fileio.write_atomic` calls hands back a file whose write puts half
# the bytes on disk, then kills the process. Nothing is renamed, no cleanup runs.
KILLED_SAVE = """
import builtins, os, signal, sys
import torch
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

fileio.open = open_and_die  # the writer's own `open`, looked up in its module first
mgr = CheckpointManager(root, keep=5)
mgr.save(2, {"w.pt": torch.full((1000,), 2.0), "v.pt": torch.zeros(10)}, {"ok": False})
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("die_at", "partial"), [(0, "w.pt.tmp"), (3, "meta.json.tmp")])
def test_kill_during_save_leaves_previous_checkpoint_usable(tmp_path, die_at, partial):
    root = tmp_path / "ck"
    mgr = CheckpointManager(root, keep=5)
    mgr.save(1, {"w.pt": torch.ones(4)}, {"ok": True})
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
    assert [s for s, _ in mgr.complete()] == [1] and mgr.latest().name == "step_00000001"
    assert torch.equal(mgr.load(mgr.latest(), "w.pt"), torch.ones(4))
    assert mgr.read_meta(mgr.latest())["ok"] is True
    # The next save cleans up the killed run's temporary directory.
    mgr.save(3, {"w.pt": torch.ones(1)}, {})
    assert not any(p.name.startswith(".tmp-") for p in root.iterdir())
    assert [s for s, _ in mgr.complete()] == [1, 3]
