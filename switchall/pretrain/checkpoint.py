"""Atomic, verified checkpoint directories: `RUN/checkpoints/step_00000100/`.

A checkpoint is written into a hidden temporary directory (`.tmp-step_*`) and renamed into
place only when every file is complete and fsynced; rank 0 writes `meta.json` last, with the
size and sha256 of every file, and that file is what marks the directory complete. So:
- a kill at any moment leaves the previous checkpoints intact and never a partial one under a
  `step_*` name;
- deletion (pruning, replacing a checkpoint of the same step) first renames the directory to a
  `.trash-*` name, so a kill half-way through a delete never leaves a `step_*` directory whose
  `meta.json` survives without its data;
- stale temporaries and trash of a killed run are removed at start-up (`start`);
- resuming takes the newest checkpoint that verifies (all ranks check a share of the files and
  agree); one that does not is skipped loudly, renamed to `step_*.corrupt-*` and kept for a
  look;
- with `keep >= 2`, old checkpoints are pruned to `keep - 1` *before* a save, so a disk that
  holds exactly `keep` checkpoints never has to hold `keep + 1`. With `keep = 1` the only
  checkpoint is removed after the new one is complete (a save needs room for two).

What goes into the directory is the caller's (`switchall.checkpoint.training_state`): DCP data
files, JSON state. Collectives go through `comm` (the trainer's runtime): rank, world_size,
barrier and all_gather_object.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from switchall.checkpoint.errors import CheckpointError
from switchall.fileio import fsync_dir, sha256_file, write_atomic

__all__ = ["CheckpointError", "CheckpointManager", "SingleProcess"]

_STEP_DIR = re.compile(r"^step_(\d{8})$")
FORMAT = "switchall.checkpoint"
FORMAT_VERSION = 2
LEGACY_FILES = ("model_rank0.pt", "train_state_rank0.pt")


def _say(message: str) -> None:
    print(f"switchall: {message}", file=sys.stderr, flush=True)


class SingleProcess:
    """`comm` of a one-process run."""

    rank, world_size = 0, 1

    def barrier(self) -> None:
        pass

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]


def is_legacy(ckpt: Path) -> bool:
    """A directory of the per-rank format main wrote before the layout-free one."""
    return any((ckpt / n).exists() for n in LEGACY_FILES) or any(ckpt.glob("model_tp*.pt"))


def legacy_message(ckpt: Path) -> str:
    return (
        f"{ckpt} is a checkpoint of the old per-rank format (model_rank0.pt / model_tp*.pt, "
        "experts_tp*_ep*.pt, train_state_rank*.pt), which switchall no longer reads; convert it "
        f"once with `switchall checkpoint convert {ckpt}` and resume from the result"
    )


class CheckpointManager:
    def __init__(self, root: str | Path, keep: int = 2, comm=None):
        self.root = Path(root)
        self.keep = keep
        self.comm = comm or SingleProcess()
        self.skipped: list[tuple[Path, str]] = []
        """(checkpoint, why) of those the last `select_resume` skipped."""

    @property
    def rank(self) -> int:
        return self.comm.rank

    # ----------------------------------------------------------------- listing
    def complete(self) -> list[tuple[int, Path]]:
        """(step, dir) of every directory marked complete (`meta.json`), oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and (p / "meta.json").is_file():
                found.append((int(m.group(1)), p))
        return sorted(found)

    def latest(self) -> Path | None:
        """The newest complete checkpoint (not verified; see `select_resume`)."""
        done = self.complete()
        return done[-1][1] if done else None

    # ----------------------------------------------------------------- start-up
    def start(self) -> None:
        """At start-up (collective): check that checkpoints can be written here, naming the
        directory if not, and remove temporaries and trash a killed run left behind."""
        error = None
        if self.rank == 0:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                for p in self.root.iterdir():
                    if p.name.startswith((".tmp-step_", ".trash-")):
                        shutil.rmtree(p)
                probe = self.root / f".tmp-step_probe-{os.getpid()}"
                probe.mkdir()
                probe.rmdir()
            except OSError as e:
                error = f"{e.filename or self.root}: cannot write checkpoints: {e.strerror}"
        errors = self.comm.all_gather_object(error)
        if any(errors):
            raise CheckpointError(next(filter(None, errors)))

    # ----------------------------------------------------------------- deleting
    def _trash(self, path: Path) -> None:
        """Rename out of the `step_*` namespace first, then delete: never a half-deleted
        directory that still looks complete."""
        trash = self.root / f".trash-{path.name}-{os.getpid()}-{time.monotonic_ns()}"
        os.replace(path, trash)
        fsync_dir(self.root)
        shutil.rmtree(trash, ignore_errors=True)

    def _prune(self, keep: int) -> None:
        for _, path in self.complete()[: max(len(self.complete()) - keep, 0)]:
            self._trash(path)

    # ----------------------------------------------------------------- saving
    def save(self, step: int, write: Callable[[Path], list[str]], meta: dict[str, Any]) -> Path:
        """Write checkpoint `step`: `write(tmp_dir)` writes this rank's files into the
        temporary directory and returns their names. Collective: every rank calls it.

        A failure on any rank (a full disk, a permission error) is raised on every rank as a
        `CheckpointError` naming the directory; the temporary directory is removed.
        """
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f".tmp-step_{step:08d}"
        error = None
        if self.rank == 0:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                if self.keep >= 2:
                    self._prune(self.keep - 1)
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir()
            except OSError as e:
                error = f"{tmp}: {e.strerror or e}"
        errors = self.comm.all_gather_object(error)
        if any(errors):
            raise CheckpointError(
                f"cannot save checkpoint step {step}: {next(filter(None, errors))}"
            )
        listing: dict[str, Any] = {}
        error = None
        try:
            for name in write(tmp):
                path = tmp / name
                listing[name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
        except CheckpointError as e:
            error = str(e)
        except OSError as e:
            error = f"{e.filename or tmp}: {e.strerror}"
        gathered = self.comm.all_gather_object((error, listing))
        failed = [(r, e) for r, (e, _) in enumerate(gathered) if e]
        if failed:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            rank, message = failed[0]
            raise CheckpointError(f"saving checkpoint step {step} failed on rank {rank}: {message}")
        error = None
        if self.rank == 0:
            try:
                files = {n: v for _, part in gathered for n, v in part.items()}
                doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": step, **meta}
                doc["files"] = dict(sorted(files.items()))
                write_atomic(tmp / "meta.json", json.dumps(doc, indent=1).encode(), sync_dir=False)
                fsync_dir(tmp)
                if final.exists():  # a corrupt one skipped at resume, now superseded
                    self._trash(final)
                os.replace(tmp, final)
                fsync_dir(self.root)
                if self.keep == 1:
                    self._prune(1)
            except OSError as e:
                shutil.rmtree(tmp, ignore_errors=True)
                error = f"{tmp}: {e.strerror or e}"
        errors = self.comm.all_gather_object(error)
        if any(errors):
            raise CheckpointError(
                f"cannot save checkpoint step {step}: {next(filter(None, errors))}"
            )
        return final

    # ----------------------------------------------------------------- reading
    @staticmethod
    def read_meta(ckpt: Path) -> dict[str, Any]:
        """meta.json of a complete checkpoint of the current format."""
        path = Path(ckpt) / "meta.json"
        try:
            meta = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: unreadable checkpoint metadata: {e}") from None
        if not isinstance(meta, dict):
            raise CheckpointError(f"{path}: unreadable checkpoint metadata: not a JSON object")
        if meta.get("format") != FORMAT:
            if is_legacy(Path(ckpt)):
                raise CheckpointError(legacy_message(Path(ckpt)))
            raise CheckpointError(
                f"{path}: not a switchall checkpoint (format {meta.get('format')!r})"
            )
        if meta.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(
                f"{path}: checkpoint format version {meta.get('format_version')}, this switchall "
                f"reads version {FORMAT_VERSION}"
            )
        if not isinstance(meta.get("files"), dict) or not isinstance(meta.get("step"), int):
            raise CheckpointError(f"{path}: checkpoint metadata lacks its file list or step")
        return meta

    @staticmethod
    def check_file(ckpt: Path, name: str, entry: dict[str, Any]) -> str | None:
        """Why file `name` of `ckpt` does not verify, or None."""
        path = ckpt / name
        if not path.is_file():
            return f"{path}: missing checkpoint file"
        if path.stat().st_size != entry.get("bytes"):
            return f"{path}: {path.stat().st_size} bytes, meta.json says {entry.get('bytes')}"
        if sha256_file(path) != entry.get("sha256"):
            return f"{path}: checksum mismatch, the file is corrupt"
        return None

    def verify(self, ckpt: Path, share: tuple[int, int] = (0, 1)) -> list[str]:
        """Problems of `ckpt` (empty: it verifies). `share=(r, n)` checks every n-th file from
        the r-th only, so n ranks together read each file once."""
        try:
            meta = self.read_meta(ckpt)
        except CheckpointError as e:
            return [str(e)]
        problems = []
        r, n = share
        for i, (name, entry) in enumerate(sorted(meta["files"].items())):
            if i % n == r and (why := self.check_file(ckpt, name, entry)):
                problems.append(why)
        return problems

    def select_resume(self) -> Path | None:
        """The newest checkpoint that verifies (collective: all ranks agree on it).

        A newer one that does not verify is reported, renamed to `step_*.corrupt-*` and
        skipped. A checkpoint of the old per-rank format stops the resume with an error.
        """
        self.skipped: list[tuple[Path, str]] = []
        for _step, path in reversed(self.complete()):
            if is_legacy(path):
                raise CheckpointError(legacy_message(path))
            mine = self.verify(path, (self.rank, self.comm.world_size))
            problems = sorted({p for part in self.comm.all_gather_object(mine) for p in part})
            if not problems:
                return path
            if self.rank == 0:
                corrupt = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
                os.replace(path, corrupt)
                fsync_dir(self.root)
                more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                _say(
                    f"WARNING: skipping checkpoint {path}: {problems[0]}{more}; "
                    f"moved it to {corrupt.name}, falling back to an older one"
                )
            self.skipped.append((path, problems[0]))
            self.comm.barrier()
        return None
