"""A real `dvc repro` in a temporary git repo: prepare runs once, the second repro does nothing."""
from __future__ import annotations

import sys

import pytest

import yaml

from tests.project_copy import copy_project, run

pytestmark = pytest.mark.slow   # real dvc repro


def test_repro_prepare_then_noop(project_root, tmp_path):
    repo = copy_project(project_root, tmp_path / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"].update(num_train=64, num_val=16, resolution=params["data"]["resolution"])
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc = [sys.executable, "-m", "dvc"]
    first = run(dvc + ["repro", "prepare"], repo)
    assert "Running stage 'prepare'" in first.stdout
    assert (repo / "data" / "prepared" / "stats.json").is_file() and (repo / "dvc.lock").is_file()
    # the outs are hard links into the cache (.dvc/config cache.type): committing an out writes it once
    # more, not twice (copy mode copies it into the cache and back), and the disk holds it once
    # (dvc links one file per cache object: of two identical small files one stays a copy)
    arrow = list((repo / "data" / "prepared").rglob("*.arrow"))
    assert len(arrow) == 2 and all(f.stat().st_nlink == 2 for f in arrow), "outs are copies, not cache links"
    second = run(dvc + ["repro", "prepare"], repo)
    assert "Running stage" not in second.stdout and "didn't change" in second.stdout
    status = run(dvc + ["status", "prepare"], repo)
    assert "up to date" in status.stdout
    # a changed param reruns the stage
    params["seed"] = 1
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = run(dvc + ["repro", "prepare"], repo)
    assert "Running stage 'prepare'" in third.stdout
