"""The `flexvar` command line: the COMMANDS registry and `main`. Every subcommand has --help.

Each subcommand module (params, generate, official) defines COMMANDS, name -> (help,
add_arguments, run); `run(args)` returns an exit code. They import nothing from this package, so
the registry is built here without an import cycle. Expected errors (bad arguments, files,
settings) are raised as `flexvar.errors.UsageError` or `ConfigError` and printed as one line,
without a traceback.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from flexvar.cli import generate, official, params
from flexvar.config import ConfigError
from flexvar.errors import UsageError

# name -> (help, add_arguments, run)
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    **params.COMMANDS,      # preset, check
    **generate.COMMANDS,    # generate, refine, inpaint, outpaint, extend
    **official.COMMANDS,    # import-official
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flexvar", description="FlexVAR pipeline tools.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_, add, _) in COMMANDS.items():
        add(sub.add_parser(name, help=help_, description=help_))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command][2](args)
    except (UsageError, ConfigError, FileNotFoundError) as e:
        print(f"flexvar {args.command}: error: {e}", file=sys.stderr)
        return 2
