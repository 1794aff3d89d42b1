"""Shared test setup: telemetry off, offline, tool state in a temp dir; small shared fixtures."""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_STATE = Path(tempfile.mkdtemp(prefix="flexvar-test-state-"))
os.environ.update({
    "DO_NOT_TRACK": "true", "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HOME": str(_STATE / "hf"), "TORCH_HOME": str(_STATE / "torch"), "PREFECT_HOME": str(_STATE / "prefect"),
    "RAY_TMPDIR": str(_STATE / "ray"), "DVC_SITE_CACHE_DIR": str(_STATE / "dvc-site"),
    "MPLCONFIGDIR": str(_STATE / "mpl"), "TOKENIZERS_PARALLELISM": "false",
})
os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="session")
def project_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory) -> Path:
    """A small builtin-shapes prepared dataset (32 px, 8 classes), made once per test session."""
    from flexvar.config import DataConfig
    from flexvar.data.prepare import prepare

    out = tmp_path_factory.mktemp("prepared") / "prepared"
    prepare(DataConfig(source="builtin:shapes", resolution=32, num_train=256, num_val=64), seed=0, out_dir=out)
    return out
