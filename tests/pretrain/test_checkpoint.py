"""Checkpoints are atomic, verified, pruned, and survive a kill mid-save."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import pytest
import torch

from switchall.pretrain.checkpoint import CheckpointError, CheckpointManager


def test_save_load_prune(tmp_path):
    mgr = CheckpointManager(tmp_path / "ck", keep=2)
    for step in (10, 20, 30):
        mgr.save(step, {"w.pt": {"x": torch.full((3,), float(step))}}, {"note": step})
    assert [s for s, _ in mgr.complete()] == [20, 30]
    latest = mgr.latest()
    assert latest.name == "step_00000030"
    assert mgr.read_meta(latest)["note"] == 30
    assert torch.equal(mgr.load(latest, "w.pt")["x"], torch.full((3,), 30.0))


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


def _slow_saver(root: str, started) -> None:
    mgr = CheckpointManager(root, keep=5)
    big = {"w.pt": torch.zeros(64 * 1024 * 1024 // 4)}  # 64 MiB per file
    started.set()
    for step in range(2, 1000):
        mgr.save(step, {**big, "v.pt": torch.zeros(8 * 1024 * 1024)}, {})


@pytest.mark.timeout(60)
def test_kill_during_save_leaves_previous_checkpoint_usable(tmp_path):
    root = tmp_path / "ck"
    mgr = CheckpointManager(root, keep=5)
    mgr.save(1, {"w.pt": torch.ones(4)}, {"ok": True})
    ctx = mp.get_context("spawn")
    started = ctx.Event()
    proc = ctx.Process(target=_slow_saver, args=(str(root), started))
    proc.start()
    assert started.wait(30)
    time.sleep(0.3)  # mid-way through writing the first big save
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    for _, path in mgr.complete():
        mgr.load(path, "w.pt")  # every complete checkpoint verifies
    assert mgr.complete()[0][0] == 1
    # The next save cleans up the killed run's temporary directory.
    mgr.save(1000, {"w.pt": torch.ones(1)}, {})
    assert not any(p.name.startswith(".tmp-") for p in root.iterdir())
