"""`flexvar preset` and `flexvar check`: edit and validate params.yaml.

    flexvar preset smoke                 merge presets/smoke.yaml into params.yaml
    flexvar check                        validate params.yaml
"""
from __future__ import annotations

import argparse
from pathlib import Path

from flexvar.errors import one_line_parser_errors, usage


def _add_preset(p: argparse.ArgumentParser) -> None:
    from flexvar.presets import available
    one_line_parser_errors(p)
    p.add_argument("name", help=f"preset name ({', '.join(available())}) or a path to a .yaml file")
    p.add_argument("--params", default="params.yaml", help="params file to update (default: params.yaml)")


def _run_preset(args: argparse.Namespace) -> int:
    from flexvar.presets import apply_preset
    if Path(args.params).is_dir():
        raise usage("--params", f"{args.params} is a folder; give the params file")
    path = apply_preset(args.name, args.params)
    print(f"merged {path} into {args.params}")
    return 0


def _add_check(p: argparse.ArgumentParser) -> None:
    one_line_parser_errors(p)
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")


def _run_check(args: argparse.Namespace) -> int:
    from flexvar.config import load_params
    params = load_params(args.params)
    print(f"{args.params}: valid (latent {params.latent_size}x{params.latent_size}, "
          f"depths {params.variants.depths}, schedules {params.variants.schedules})")
    return 0


COMMANDS = {
    "preset": ("merge a preset (presets/NAME.yaml) into params.yaml", _add_preset, _run_preset),
    "check": ("validate params.yaml and print a summary", _add_check, _run_check),
}
