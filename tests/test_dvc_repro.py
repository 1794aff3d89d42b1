"""A real `dvc repro` in a temporary git repo: prepare runs once, the second repro does nothing."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml


def copy_project(src: Path, dst: Path) -> Path:
    """Copy the files git would check out (tracked + untracked-not-ignored) into a fresh git repo."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=src,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for f in filter(None, files):
        if (src / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / f, dst / f)
    run(["git", "init", "-q"], dst)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A"], dst)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "fixture"], dst)
    return dst


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    assert r.returncode == 0, f"{cmd} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def test_repro_prepare_then_noop(project_root, tmp_path):
    repo = copy_project(project_root, tmp_path / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"].update(num_train=64, num_val=16, resolution=params["data"]["resolution"])
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc = [sys.executable, "-m", "dvc"]
    first = run(dvc + ["repro", "prepare"], repo)
    assert "Running stage 'prepare'" in first.stdout
    assert (repo / "data" / "prepared" / "stats.json").is_file() and (repo / "dvc.lock").is_file()
    second = run(dvc + ["repro", "prepare"], repo)
    assert "Running stage" not in second.stdout and "didn't change" in second.stdout
    status = run(dvc + ["status", "prepare"], repo)
    assert "up to date" in status.stdout
    # a changed param reruns the stage
    params["seed"] = 1
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = run(dvc + ["repro", "prepare"], repo)
    assert "Running stage 'prepare'" in third.stdout
