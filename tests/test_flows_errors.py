"""The flows' command lines report bad input through the one error runner (flexvar/errors.py `command`):
one stderr line naming the argument or key, exit code 2, no traceback."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest


def run(root, *args, cwd):
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("args,prog,expected", [
    (["flows.pipeline", "--dry-run", "no_such_stage"], "flows.pipeline", "targets: unknown stage(s) ['no_such_stage']"),
    (["flows.pipeline", "--params", "missing.yaml"], "flows.pipeline", "missing.yaml: not found"),
    (["flows.sweep", "--resume"], "python -m flows.sweep", "--resume needs --name"),
    (["flows.sweep", "--params", "bad.yaml"], "flows.sweep", "bad.yaml: sweep.steps = 0"),
])
def test_flow_command_errors_are_one_line_exit_2(project_root, tmp_path, args, prog, expected):
    (tmp_path / "bad.yaml").write_text("sweep:\n  steps: 0\n")
    if "--dry-run" not in args:
        args = [*args, "--root", str(tmp_path)]
    r = run(project_root, *args, cwd=project_root if "--dry-run" in args else tmp_path)
    lines = [line for line in r.stderr.splitlines() if line.startswith(prog)]
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and len(lines) == 1 and expected in lines[0], r.stderr[-2000:]
