"""What every stage module shares: its command line, device/thread setup, JSON output.

Kept tiny on purpose: a stage is `@command("<stage>") def main(argv)` (flexvar/errors.py: the one
runner that turns a FlexvarError into one stderr line and exit 2), `args = stage_args(__doc__)`,
`params = load_params(args.params, uses=PARAM_KEYS)` (cross-key checks of the sections it reads only),
`device = setup_torch(params)`, then flexvar calls and
`stage_run` (pipeline/tracking.py). The tool environment is set up once by pipeline/__init__.py.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

from filelock import FileLock

from flexvar.errors import one_line_parser_errors


def set_offline_env() -> None:
    """Telemetry off, no hub downloads and tool state inside the project (pipeline/env.py).

    Already done when `pipeline` was imported; kept for callers that changed the environment since.
    """
    from pipeline import env

    env.setup()


def stage_args(description: str | None, argv: list[str] | None = None, **extra: dict[str, Any]):
    """Parse `--params PATH` plus any `--name` given as `name={argparse kwargs}`."""
    parser = argparse.ArgumentParser(description=(description or "").strip().splitlines()[0] if description else None)
    one_line_parser_errors(parser)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    for name, kwargs in extra.items():
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, **kwargs)
    return parser.parse_args(argv)


def setup_torch(params) -> "torch.device":
    """Seeded, threads set from `resources.num_threads`, device from `resources.device`."""
    import torch

    from flexvar.device import pick_device
    from flexvar.seeding import seed_everything

    if params.resources.num_threads:
        torch.set_num_threads(params.resources.num_threads)
    seed_everything(params.seed)
    return pick_device(params.resources.device)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write `obj` as indented JSON (atomically: tmp file + rename), creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def file_lock(path: Path) -> FileLock:
    """An exclusive lock on `path` (its folder created), across processes: `with file_lock(p): ...`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(path)


@contextlib.contextmanager
def phase(what: str) -> Iterator[None]:
    """Progress for a step that runs inside a library call: a line when it starts and one with its time."""
    print(f"{what} ...", flush=True)
    t0 = time.perf_counter()
    yield
    print(f"{what}: done in {time.perf_counter() - t0:.1f}s", flush=True)
