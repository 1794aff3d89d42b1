"""Wall time of the Prefect/Ray pipeline flow vs `dvc repro`, both from a fresh copy on a preset.

    .venv/bin/python benchmarks/flow_vs_repro.py --preset smoke [--workdir /tmp/fvr]

Each run gets its own fresh git copy of the project (tracked + untracked-not-ignored files), the
preset merged into params.yaml and committed. The flow is timed as a user runs it from a shell
(`python -m flows.pipeline`, so it includes starting a temporary Prefect server and Ray); after
it, `dvc status` must be clean and `dvc repro` must run nothing. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.project_copy import copy_project  # noqa: E402


def sh(cmd: list[str], cwd: Path, env: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{cmd} failed in {cwd}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0, r.stdout + r.stderr


def fresh(dst: Path, preset: str, env: dict) -> Path:
    repo = copy_project(ROOT, dst)
    sh([sys.executable, "-m", "flexvar.cli", "preset", preset], repo, env)
    sh(["git", "-c", "user.email=b@b", "-c", "user.name=b", "commit", "-qam", f"preset {preset}"], repo, env)
    return repo


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="smoke")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="flow-vs-repro-"))
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    dvc = [sys.executable, "-m", "dvc"]

    flow_repo = fresh(work / "flow", args.preset, env)
    flow_s, flow_log = sh([sys.executable, "-m", "flows.pipeline"], flow_repo, env)
    _, status = sh(dvc + ["status"], flow_repo, env)
    _, repro_after = sh(dvc + ["repro"], flow_repo, env)
    stages = sum(line.startswith("ran ") for line in flow_log.splitlines())

    repro_repo = fresh(work / "repro", args.preset, env)
    repro_s, repro_log = sh(dvc + ["repro"], repro_repo, env)
    print(json.dumps({
        "preset": args.preset, "stages": stages, "flow_s": round(flow_s, 1), "dvc_repro_s": round(repro_s, 1),
        "status_clean_after_flow": "up to date" in status,
        "repro_after_flow_noop": "Running stage" not in repro_after,
        "repro_stages_run": repro_log.count("Running stage"), "workdir": str(work)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
