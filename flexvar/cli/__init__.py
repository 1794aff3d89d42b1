"""The `flexvar` command line: the COMMANDS registry and `main`. Every subcommand has --help.

Each subcommand module (params, generate, official, init) defines COMMANDS, name -> (help,
add_arguments, run); `run(args)` returns an exit code. They import nothing from this package, so
the registry is built here without an import cycle. Expected errors (bad arguments, files,
settings) are FlexvarErrors (flexvar/errors.py) and `main` runs every subcommand through
`run_command`: one line naming the argument, exit 2, no traceback.
"""
from __future__ import annotations

import argparse
from typing import Callable

from flexvar.cli import generate, init, official, params
from flexvar.errors import UsageError, one_line_parser_errors, run_command

__all__ = ["COMMANDS", "UsageError", "build_parser", "main"]

# name -> (help, add_arguments, run)
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    **params.COMMANDS,      # preset, check
    **generate.COMMANDS,    # generate, refine, inpaint, outpaint, extend
    **official.COMMANDS,    # import-official
    **init.COMMANDS,        # init
}


def build_parser() -> argparse.ArgumentParser:
    parser = one_line_parser_errors(argparse.ArgumentParser(prog="flexvar", description="FlexVAR pipeline tools."))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_, add, _) in COMMANDS.items():
        add(sub.add_parser(name, help=help_, description=help_))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_command(f"flexvar {args.command}", COMMANDS[args.command][2], args)
