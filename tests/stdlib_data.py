"""Small real-text datasets for tests: standard-library modules through `switchall prepare`."""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

from switchall.cli import main as cli_main

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def prepare_stdlib(root: Path, train: list[str], val: str, *prepare_args: str) -> Path:
    """Copy the `train` modules to root/text (a subpackage's "/" becomes "_") and `val` to
    root/val.py, run `switchall prepare` over them with `prepare_args`; returns root/prepared."""
    text, val_path, out = root / "text", root / "val.py", root / "prepared"
    text.mkdir(parents=True)
    for name in train:
        shutil.copy(STDLIB / name, text / name.replace("/", "_"))
    shutil.copy(STDLIB / val, val_path)
    argv = ["prepare", str(text), "--val", str(val_path), "--out", str(out), *prepare_args]
    assert cli_main([*argv, "--no-progress"]) == 0
    return out
