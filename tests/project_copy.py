"""Test helper: a throwaway git repo holding a copy of this project, and a checked subprocess runner."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path


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


def run(cmd: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run with the venv's bin first on PATH (stage commands call `python`); fail with the output tail."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)
    assert r.returncode == 0, f"{cmd} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r
