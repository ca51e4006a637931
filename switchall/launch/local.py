"""Single-machine torchrun command lines (tests, benchmarks and local runs)."""

from __future__ import annotations

import socket
import sys


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(nproc: int, args: list[str], port: int | None = None) -> list[str]:
    """`torchrun --nproc_per_node nproc ARGS` on this machine, with this interpreter and a free
    rendezvous port (so concurrent jobs do not collide on torchrun's default 29500)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port or free_port()),
        *args,
    ]
