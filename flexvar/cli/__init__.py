"""The `flexvar` command line. Every subcommand has --help.

    flexvar preset smoke                 merge presets/smoke.yaml into params.yaml
    flexvar check                        validate params.yaml

Each subcommand is a (add_arguments, run) pair registered in COMMANDS; `run(args)` returns an
exit code. Expected errors (bad arguments, files, settings) are raised as `UsageError` or
`ConfigError` and printed as one line, without a traceback.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from flexvar.config import ConfigError


class UsageError(Exception):
    """A bad argument or input file: printed as `flexvar <cmd>: error: <message>`, exit 2."""


# --------------------------------------------------------------------------- preset / check
def _add_preset(p: argparse.ArgumentParser) -> None:
    from flexvar.presets import available
    p.add_argument("name", help=f"preset name ({', '.join(available())}) or a path to a .yaml file")
    p.add_argument("--params", default="params.yaml", help="params file to update (default: params.yaml)")


def _run_preset(args: argparse.Namespace) -> int:
    from flexvar.presets import apply_preset
    path = apply_preset(args.name, args.params)
    print(f"merged {path} into {args.params}")
    return 0


def _add_check(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")


def _run_check(args: argparse.Namespace) -> int:
    from flexvar.config import load_params
    params = load_params(args.params)
    print(f"{args.params}: valid (latent {params.latent_size}x{params.latent_size}, "
          f"depths {params.variants.depths}, schedules {params.variants.schedules})")
    return 0


# name -> (help, add_arguments, run)
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "preset": ("merge a preset (presets/NAME.yaml) into params.yaml", _add_preset, _run_preset),
    "check": ("validate params.yaml and print a summary", _add_check, _run_check),
}

from flexvar.cli.generate import COMMANDS as _GENERATION_COMMANDS  # noqa: E402  generate/refine/inpaint/outpaint/extend

COMMANDS.update(_GENERATION_COMMANDS)
from flexvar.cli.official import COMMANDS as _OFFICIAL_COMMANDS  # noqa: E402  import-official

COMMANDS.update(_OFFICIAL_COMMANDS)


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

