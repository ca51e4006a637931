"""The environment of every subprocess a test starts (torchrun jobs, `python -c` children,
`python -m switchall ...`).

- PYTHONPATH starts with the repository root, so the child imports the checkout under test,
  not whatever `switchall` site-packages holds. A script run by path (torchrun's
  `tests/parallel/worker.py`) puts its own folder first on `sys.path`, not the repository:
  without this a test run in a copy of the repository would test the original.
- TORCH_EXTENSIONS_DIR (unless set) is a folder of this interpreter's environment: DeepSpeed
  JIT-compiles its CPU communication op on first use, and the default `~/.cache/torch_extensions`
  is shared by every checkout on the machine; each environment's build differs (its own include
  paths), so concurrent checkouts kept rebuilding it under each other, and a job waiting on the
  build lock ran into its timeout.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    """`os.environ` with the repository root first on PYTHONPATH, plus `extra`."""
    env = dict(os.environ)
    previous = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + previous if previous else "")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    env.update(extra)
    return env
