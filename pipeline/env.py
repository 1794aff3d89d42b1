"""Quiet, offline, self-contained tool environment for every stage, flow and test.

Telemetry off (DVC, MLflow, Prefect, Ray, HF), HF offline, and tool state kept inside the
project's `.cache/` instead of the home folder. `pipeline/__init__.py` calls `setup()` once,
before any stage, flow or test imports those tools. Security settings are not touched here:
Ray's token authentication stays on (flows/cluster.py switches it off only for the Ray it
starts inside this process, which listens on this machine alone).
"""
from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]

TELEMETRY_OFF = {
    "DO_NOT_TRACK": "true",
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


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
    """Set telemetry-off and state-dir variables unless the user already set them."""
    for k, v in {**TELEMETRY_OFF, **state_dirs(root or PROJECT_ROOT)}.items():
        os.environ.setdefault(k, v)
