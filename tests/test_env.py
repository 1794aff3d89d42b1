"""pipeline/env.py: the hub stays offline for built-in/image-folder data, goes online for an hf: source."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from tests.flows_support import ROOT

PROBE = "import os, pipeline; print(os.environ.get('HF_HUB_OFFLINE'), os.environ.get('HF_DATASETS_OFFLINE'))"


def _offline(tmp_path, source: str, args: list[str], **extra: str) -> str:
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"data": {"source": source}}))
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update(PYTHONPATH=str(ROOT), **extra)
    return subprocess.run([sys.executable, "-c", PROBE, *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, check=True).stdout.strip()


@pytest.mark.parametrize("args", [["--params", "p.yaml"], ["--params=p.yaml"]])
def test_hub_offline_unless_an_hf_source(tmp_path, args):
    assert _offline(tmp_path, "builtin:icons", args) == "1 1"
    assert _offline(tmp_path, "imagefolder:/data/x", args) == "1 1"
    assert _offline(tmp_path, "hf:ylecun/mnist", args) == "None None"
    assert _offline(tmp_path, "hf:ylecun/mnist", args, HF_HUB_OFFLINE="1") == "1 None"   # the user's choice wins


def test_default_params_file_is_read(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"data": {"source": "hf:ylecun/mnist"}}))
    assert _offline(tmp_path, "builtin:icons", []) == "None None"       # p.yaml unused: params.yaml decides
