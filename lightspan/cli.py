"""The `lightspan` command line.

Each component contributes its own subcommands through a `register(subparsers)` function in its
`cli` module, so this file stays a thin dispatcher and `--help` costs no heavy imports: handlers
import what they need when they run. Any `LightspanError` becomes a one-line message and exit
code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from lightspan import __version__
from lightspan.errors import LightspanError

# Modules that define `register(subparsers)`; each adds one or more subcommands.
COMMAND_MODULES = (
    "lightspan.store.cli",
    "lightspan.collector.cli",
    "lightspan.trainer.cli",
    "lightspan.loop.cli",
    "lightspan.serving.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightspan",
        description="Trace LLM agents with OpenTelemetry, store spans in ClickHouse, train and publish models.",
    )
    parser.add_argument("--version", action="version", version=f"lightspan {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Client libraries log connection failures themselves; the CLI reports them once, in one line.
    logging.getLogger("clickhouse_connect").setLevel(logging.CRITICAL)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except LightspanError as error:
        print(f"lightspan: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
