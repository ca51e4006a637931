"""The `switchall` command: one verb per capability, each registered by the module that owns it."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from switchall.configtools import ConfigError


def build_parser() -> argparse.ArgumentParser:
    from switchall.analysis import count_cli
    from switchall.checkpoint import cli as checkpoint_cli
    from switchall.data_pipeline import cli as data_cli
    from switchall.pretrain import cli as pretrain_cli

    parser = argparse.ArgumentParser(prog="switchall", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    data_cli.register(verbs)
    pretrain_cli.register(verbs)
    count_cli.register(verbs)
    checkpoint_cli.register(verbs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"switchall {args.verb}: configuration error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # data and checkpoint errors name the file, shard or field at fault
        from switchall.checkpoint.errors import CheckpointError
        from switchall.data_pipeline import DataError

        if isinstance(e, CheckpointError):
            print(f"switchall {args.verb}: checkpoint error: {e}", file=sys.stderr)
            return 2
        if not isinstance(e, DataError):
            raise
        print(f"switchall {args.verb}: data error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
