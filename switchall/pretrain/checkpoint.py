"""Atomic, verifiable checkpoints: `RUN/checkpoints/step_00000100/`.

A checkpoint is written into a hidden temporary directory and renamed into place only when
every file is complete and fsynced, so a kill at any moment leaves the previous checkpoint
intact and never a partial one that looks valid. Each rank writes its own files plus a
`files_rank{r}.json` listing their sha256; rank 0 writes `meta.json` last, which is what marks
the directory complete. Loading re-checks the hashes and names the file at fault.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from switchall.fileio import fsync_dir, write_atomic

_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


class CheckpointManager:
    def __init__(
        self,
        root: str | Path,
        keep: int = 2,
        rank: int = 0,
        barrier: Callable[[], None] | None = None,
    ):
        self.root = Path(root)
        self.keep, self.rank = keep, rank
        self.barrier = barrier or (lambda: None)

    def complete(self) -> list[tuple[int, Path]]:
        """(step, dir) of every complete checkpoint, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and (p / "meta.json").is_file():
                found.append((int(m.group(1)), p))
        return sorted(found)

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1][1] if done else None

    def save(self, step: int, objects: dict[str, Any], meta: dict[str, Any]) -> Path:
        """Save this rank's `objects` (name -> picklable torch object) as checkpoint `step`.

        Collective when a barrier is given: every rank must call it with its own objects.
        """
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f".tmp-step_{step:08d}"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)  # left by a run killed while saving this very step
            tmp.mkdir()
        self.barrier()
        hashes = {}
        for name, obj in objects.items():
            buf = io.BytesIO()
            torch.save(obj, buf)
            data = buf.getvalue()
            write_atomic(tmp / name, data, sync_dir=False)
            hashes[name] = hashlib.sha256(data).hexdigest()
        write_atomic(
            tmp / f"files_rank{self.rank}.json", json.dumps(hashes).encode(), sync_dir=False
        )
        self.barrier()
        if self.rank == 0:
            meta_bytes = json.dumps({"step": step, **meta}, indent=1).encode()
            write_atomic(tmp / "meta.json", meta_bytes, sync_dir=False)
            fsync_dir(tmp)
            if final.exists():  # an older save of the same step (e.g. resumed, then re-saved)
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(self.root)
            self._prune()
        self.barrier()
        return final

    def _prune(self) -> None:
        for _, path in self.complete()[: -self.keep]:
            shutil.rmtree(path, ignore_errors=True)
        for p in self.root.iterdir():
            if p.name.startswith(".tmp-step_"):
                shutil.rmtree(p, ignore_errors=True)

    @staticmethod
    def read_meta(ckpt: Path) -> dict[str, Any]:
        try:
            return json.loads((ckpt / "meta.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(
                f"{ckpt / 'meta.json'}: unreadable checkpoint metadata: {e}"
            ) from None

    def load(self, ckpt: Path, name: str, map_location: Any = "cpu") -> Any:
        """Load one of this rank's files from `ckpt`, verifying its hash first."""
        path = ckpt / name
        listing = ckpt / f"files_rank{self.rank}.json"
        try:
            expected = json.loads(listing.read_text())[name]
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{listing}: no valid entry for {name}: {e}") from None
        if not path.is_file():
            raise CheckpointError(f"{path}: missing checkpoint file")
        if _sha256(path) != expected:
            raise CheckpointError(f"{path}: checksum mismatch, the file is corrupt")
        return torch.load(path, map_location=map_location, weights_only=True)
