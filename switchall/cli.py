"""The `switchall` command: one verb per capability, each registered by the module that owns it.

Exit codes: 0 done; 1 an unexpected error (traceback, naming the rank in a multi-process job);
2 a mistake the user can fix (configuration, data, checkpoint, run directory), reported in one
line naming the key, file or rank; 3 a run stopped by a signal after writing its checkpoint;
130 interrupted (see `switchall.pretrain.control`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

from switchall.configtools import ConfigError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
# A rank other than 0 waits this long before printing an error found by the start-up checks
# that every rank runs alike: when rank 0 failed the same way the launcher (torchrun, srun)
# has ended the job by then, so the error is printed once, by rank 0.
DUPLICATE_ERROR_GRACE_S = 5.0


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("switchall")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    from switchall.analysis import analyze_cli, count_cli, scaling_cli
    from switchall.checkpoint import cli as checkpoint_cli
    from switchall.data_pipeline import cli as data_cli
    from switchall.launch import cli as launch_cli
    from switchall.pretrain import cli as pretrain_cli
    from switchall.pretrain import generate_cli
    from switchall.sweep import cli as sweep_cli

    parser = argparse.ArgumentParser(prog="switchall", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"switchall {version()}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    data_cli.register(verbs)
    pretrain_cli.register(verbs)
    launch_cli.register(verbs)
    count_cli.register(verbs)
    generate_cli.register(verbs)
    sweep_cli.register(verbs)
    scaling_cli.register(verbs)
    analyze_cli.register(verbs)
    checkpoint_cli.register(verbs)
    return parser


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that report a mistake the user can fix: one line, exit code 2."""
    from switchall.data_pipeline import DataError
    from switchall.pretrain.checkpoint import CheckpointError
    from switchall.pretrain.runlock import RunLockedError

    return (ConfigError, DataError, CheckpointError, RunLockedError)


def _kind(e: BaseException) -> str:
    return {
        "ConfigError": "configuration error",
        "DataError": "data error",
        "CheckpointError": "checkpoint error",
        "RunLockedError": "run directory in use",
    }.get(type(e).__name__, "error")


def _rank() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _report_user_error(args: argparse.Namespace, e: BaseException) -> None:
    rank, world = _rank()
    where = f" (rank {rank})" if world > 1 and rank != 0 else ""
    if rank != 0 and not getattr(args, "startup_checked", False):
        from switchall.pretrain.control import StopSignals

        deadline = time.monotonic() + DUPLICATE_ERROR_GRACE_S
        while time.monotonic() < deadline and StopSignals.received is None:
            time.sleep(0.05)
        if StopSignals.received is not None:
            return  # the launcher is ending the job: rank 0 reports this error
    print(f"switchall {args.verb}{where}: {_kind(e)}: {e}", file=sys.stderr, flush=True)


# How gloo and NCCL report that another rank went away (it failed, was killed, lost its node).
PEER_LOST = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "remote process exited",
    "NCCL communicator was aborted",
)


def _report_crash(args: argparse.Namespace, e: BaseException) -> None:
    """An unexpected exception in a multi-process job: its rank, host and traceback. A rank
    that only lost its peers says so in one line: the rank that failed first tells why."""
    import socket
    import traceback

    from switchall.launch.process import RANK_LOG

    rank, world = _rank()
    where = f"switchall {args.verb}: rank {rank}/{world} on {socket.gethostname()}"
    trace = traceback.format_exc()
    RANK_LOG.write(f"{where} (pid {os.getpid()}) failed:\n{trace}")
    if any(marker in str(e) for marker in PEER_LOST):
        first = str(e).strip().splitlines()[0][:200]
        print(
            f"{where}: lost contact with another rank, which failed or was killed (see its "
            f"error; {first})",
            file=sys.stderr,
            flush=True,
        )
        return
    print(f"{where} (pid {os.getpid()}) failed:\n{trace}", file=sys.stderr, end="", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"switchall {args.verb}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        if isinstance(e, user_error_types()):
            _report_user_error(args, e)
            return EXIT_USAGE
        if _rank()[1] > 1:
            _report_crash(args, e)
            return 1
        raise


def run() -> None:
    """The `switchall` command (console script and `python -m switchall`).

    A run stopped by a signal leaves through `os._exit` once its checkpoint is written and its
    output flushed: under srun's --kill-on-bad-exit the first rank to exit gets the others
    SIGTERMed, and a rank still in interpreter shutdown (where Python has put back the default
    handlers) would die of it, turning the job's documented exit code 3 into 143.
    """
    from switchall.pretrain.control import EXIT_STOPPED

    code = main()
    if code == EXIT_STOPPED:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
