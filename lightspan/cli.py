"""The `lightspan` command line.

Each component contributes its own subcommands through a `register(subparsers)` function in its
`cli` module, so this file stays a thin dispatcher and `--help` costs no heavy imports: handlers
import what they need when they run. Any `LightspanError` becomes a one-line message and exit
code 2, never a traceback; so does a command whose extra is not installed (the bare
`pip install lightspan` has the command line too, and says which extra to add).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from lightspan import __version__
from lightspan.errors import LightspanError

# Modules that define `register(subparsers)` (each adds one or more subcommands), and the extra
# that installs what their commands import.
COMMAND_MODULES = {
    "lightspan.store.cli": "store",
    "lightspan.store.resources_cli": "store",
    "lightspan.collector.cli": "collector",
    "lightspan.trainer.cli": "train",
    "lightspan.loop.cli": "loop",
    "lightspan.serving.cli": "serve",
}


def _missing_dependency(error: ModuleNotFoundError) -> bool:
    """A third-party module is not installed (not a bug in our own imports)."""
    name = error.name or ""
    return bool(name) and name.partition(".")[0] != "lightspan"


def _install_hint(extra: str) -> str:
    return f"pip install 'lightspan[{extra}]'"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightspan",
        description="Trace LLM agents with OpenTelemetry, store spans in ClickHouse, train and publish models.",
    )
    parser.add_argument("--version", action="version", version=f"lightspan {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    absent = []
    for module, extra in COMMAND_MODULES.items():
        try:
            importlib.import_module(module).register(subparsers)
        except ModuleNotFoundError as error:
            if not _missing_dependency(error):
                raise
            absent.append(f"  {_install_hint(extra)}  (its commands need {error.name})")
        else:
            for command in subparsers.choices.values():
                command.set_defaults(extra=command.get_default("extra") or extra)
    if absent:
        parser.epilog = "Not installed here; add them with:\n" + "\n".join(absent)
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
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
    except ModuleNotFoundError as error:
        if not _missing_dependency(error):
            raise
        print(
            f"lightspan: error: `lightspan {args.command}` needs {error.name}, which is not installed: "
            f"{_install_hint(args.extra)}",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
