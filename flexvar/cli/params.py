"""`flexvar preset` and `flexvar check`: edit and validate params.yaml.

    flexvar preset smoke                 merge presets/smoke.yaml into params.yaml
    flexvar check                        validate params.yaml, estimate the run's time
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
    p.add_argument("--rate-gflops", default=None,
                   help="compute rate for the time estimate, GFLOP/s: one number, or TOKENIZER,TRANSFORMER "
                        "(default: measured on this machine)")
    p.add_argument("--budget", choices=["cpu", "gpu"], default="cpu",
                   help="gpu: estimate with assumed GPU rates when this machine has no GPU (default: cpu)")


def _run_check(args: argparse.Namespace) -> int:
    from flexvar.cli.init import check_rates
    from flexvar.config import load_params
    from flexvar.estimate import data_counts, estimate, format_estimate, rates_for
    params = load_params(args.params)
    check_rates(args.rate_gflops)
    print(f"{args.params}: valid (latent {params.latent_size}x{params.latent_size}, "
          f"depths {params.variants.depths}, schedules {params.variants.schedules})")
    counts = data_counts(params)
    if counts is None:
        print(f"no time estimate: the size of {params.data.source} is known only after prepare")
        return 0
    rates, how = rates_for(params, counts.classes, args.budget, args.rate_gflops)
    print(format_estimate(estimate(params, counts, rates), rates, how))
    return 0


COMMANDS = {
    "preset": ("merge a preset (presets/NAME.yaml) into params.yaml", _add_preset, _run_preset),
    "check": ("validate params.yaml and print a summary", _add_check, _run_check),
}
