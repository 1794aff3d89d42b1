"""Quiet, offline, self-contained tool environment for every stage, flow and test; process settings of stages.

Telemetry off (DVC, MLflow, Prefect, Ray, HF), tool state kept inside the project's `.cache/`
instead of the home folder, and the Hugging Face hub offline unless the params file names an
`hf:` data source (`data.source: hf:<id>` downloads where the network is; the built-in and
image-folder sources never need the hub, so they stay offline). A value the user set wins. `pipeline/__init__.py` calls `setup()` once,
before any stage, flow or test imports those tools. Security settings are not touched here:
Ray's token authentication stays on (flows/cluster.py switches it off only for the Ray it
starts inside this process, which listens on this machine alone). `retain_freed_memory` is the
transformer training stage's malloc setting.
"""
from __future__ import annotations

import ctypes
import functools
import os
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]

TELEMETRY_OFF = {
    "DO_NOT_TRACK": "true",
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


HUB_OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def uses_hub(argv: list[str] | None = None, cwd: Path | None = None) -> bool:
    """Whether the params file this command reads (`--params PATH`, default params.yaml) has an hf: source."""
    import sys

    import yaml

    argv = sys.argv if argv is None else argv
    path = Path("params.yaml")
    for i, a in enumerate(argv):
        if a == "--params" and i + 1 < len(argv):
            path = Path(argv[i + 1])
        elif a.startswith("--params="):
            path = Path(a.split("=", 1)[1])
    path = path if path.is_absolute() else (cwd or Path.cwd()) / path
    try:
        source = ((yaml.safe_load(path.read_text()) or {}).get("data") or {}).get("source", "")
    except (OSError, yaml.YAMLError, AttributeError):
        return False
    return isinstance(source, str) and source.startswith("hf:")


def state_dirs(root: Path) -> dict[str, str]:
    cache = root / ".cache"
    return {
        "HF_HOME": str(cache / "hf"),
        "TORCH_HOME": str(cache / "torch"),
        "PREFECT_HOME": str(cache / "prefect"),
        "RAY_TMPDIR": str(cache / "ray"),
        "DVC_SITE_CACHE_DIR": str(cache / "dvc-site"),
        "MPLCONFIGDIR": str(cache / "matplotlib"),
    }


def setup(root: Path | None = None) -> None:
    """Set telemetry-off, state-dir and (unless an hf: source is used) hub-offline variables, each unless
    the user already set it."""
    offline = {} if uses_hub() else HUB_OFFLINE
    for k, v in {**TELEMETRY_OFF, **offline, **state_dirs(root or PROJECT_ROOT)}.items():
        os.environ.setdefault(k, v)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3      # glibc mallopt parameters (malloc.h)
GLIBC_MAX_MMAP_THRESHOLD = 32 << 20              # the largest value glibc accepts on 64-bit


@functools.cache
def retain_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the OS; True when set.

    Why: a CPU training step allocates and frees ~100 MB of activations and gradients in blocks of
    0.1-20 MB. glibc serves such blocks with fresh mmap pages or trims them off the heap once freed, so
    every step page-faults them in again: 25-35k faults per step of the benchmark transformer (d6, batch 8),
    100k per sampled batch of 16 images. Serving blocks up to 32 MiB from the heap and never trimming it
    removes nearly all of them: transformer train steps 4-12% faster here (the official code's 2-7%;
    benchmarks/bench_malloc.py, docs/benchmarks.md). The cost: the process keeps its peak heap, which
    the next step needs again anyway. Process-wide (it speeds up any code in the process, the official
    code beside ours in a benchmark included); a no-op returning False where the C library is not glibc.
    Process setup of the transformer training stage only (pipeline/train_transformer.py): the tokenizer's
    train step measured 8-11% slower with it in two of three paired processes, and sampling did not move."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, GLIBC_MAX_MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
