"""The Prefect pipeline flow on a real local Ray and a real Prefect server.

1. A small synthetic DVC project pins down the mechanics: a matrix stage's entries run at the same
   time (each waits for the other to start), a stage without num_cpus gets the whole node's CPUs
   as threads, dependencies are respected, a failing stage is retried,
   every stage lands in dvc.lock, `dvc status` is clean, `dvc repro` and a second flow run do nothing.
2. The real project (a temp git copy on the smoke preset, shrunk, two depths), brought up to date
   up to train_transformer (its matrix entries in parallel): the flow completes, `dvc status` is
   clean, `dvc repro` is a no-op, and MLflow holds one parent run with every stage run under it.
3. The embedded Ray's workers run at the driver's priority, not Ray's default nice 15 (which starves
   sweep trials beside any other work on the machine).
4. The CPUs a stage without `num_cpus` asks for: a whole node, or its GPUs' share of one.
"""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from tests.flows_support import ROOT, local_ray
from tests.project_copy import copy_project, run

pytestmark = pytest.mark.slow   # real Ray + Prefect server

DVC = [sys.executable, "-m", "dvc"]


@pytest.fixture(scope="module")
def ray_and_prefect():
    local_ray(2)


def git_dvc_repo(path: Path, files: dict[str, str]) -> Path:
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).write_text(textwrap.dedent(text))
    run(["git", "init", "-q"], path)
    run(DVC + ["init", "-q"], path)
    run(DVC + ["config", "core.analytics", "false"], path)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A"], path)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "fixture"], path)
    return path


# b@2 and b@4 each announce their start and wait for the other's: they only finish if they run at once.
# c fails on its first attempt (a counter outside its outs) and succeeds on the retry.
WAIT_FOR_OTHER = """\
    import pathlib, sys, time
    me, other = sys.argv[1], {"2": "4", "4": "2"}[sys.argv[1]]
    marks = pathlib.Path("marks")
    marks.mkdir(exist_ok=True)
    (marks / f"start{me}").touch()
    deadline = time.time() + 120
    while not (marks / f"start{other}").exists() and time.time() < deadline:
        time.sleep(0.1)
    sys.exit(0 if (marks / f"start{other}").exists() else 3)
"""
FAIL_ONCE = """\
    import pathlib, sys
    counter = pathlib.Path("marks/c_attempts")
    n = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(n))
    sys.exit(0 if n > 1 else 5)
"""
SYNTHETIC_DVC = """\
    stages:
      a:
        cmd: mkdir -p out marks && echo a > out/a.txt && echo $OMP_NUM_THREADS > marks/a_threads
        outs: [out/a.txt]
      b:
        matrix:
          depth: [2, 4]
        cmd: python wait_for_other.py ${item.depth} && echo ${item.depth} > out/b${item.depth}.txt
        deps: [out/a.txt]
        outs: ["out/b${item.depth}.txt"]
      c:
        cmd: python fail_once.py && cat out/b2.txt out/b4.txt > out/c.txt
        deps: [out/b2.txt, out/b4.txt]
        outs: [out/c.txt]
"""
SYNTHETIC_PARAMS = """\
    resources:
      retries: 2
      retry_delay_s: 0.2
      stages:
        b: {num_cpus: 1}
"""


def test_flow_mechanics(ray_and_prefect, tmp_path):
    from flows.pipeline import run_pipeline

    repo = git_dvc_repo(tmp_path / "syn", {"dvc.yaml": SYNTHETIC_DVC, "params.yaml": SYNTHETIC_PARAMS,
                                           "wait_for_other.py": WAIT_FOR_OTHER, "fail_once.py": FAIL_ONCE,
                                           ".gitignore": "marks/\n"})
    result = run_pipeline(repo)
    assert result == {"a": "ran", "b@2": "ran", "b@4": "ran", "c": "ran"}
    assert (repo / "out/c.txt").read_text() == "2\n4\n"
    assert (repo / "marks/c_attempts").read_text() == "2"          # failed once, retried once
    assert (repo / "marks/a_threads").read_text() == "2\n"   # no num_cpus: the whole node, dvc repro's threads
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert set(lock) == {"a", "b@2", "b@4", "c"}
    assert "up to date" in run(DVC + ["status"], repo).stdout
    repro = run(DVC + ["repro"], repo).stdout
    assert "Running stage" not in repro and "is cached" not in repro
    assert run_pipeline(repo) == {"a": "skipped", "b@2": "skipped", "b@4": "skipped", "c": "skipped"}


def test_a_stage_without_num_cpus_gets_a_whole_node_or_its_gpus_share(tmp_path):
    """node_cpus on a fresh local Ray declaring 16 CPUs and 8 GPUs: a CPU stage 16 (dvc repro's
    threads), a 1-GPU stage 2 (eight fit side by side), more GPUs than any node has: 1."""
    code = """
import ray
from flows.pipeline import node_cpus
ray.init(address="local", num_cpus=16, num_gpus=8, include_dashboard=False)
print(node_cpus(0), node_cpus(1), node_cpus(0.5), node_cpus(8), node_cpus(9))
ray.shutdown()
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split()[-5:] == ["16.0", "2.0", "1.0", "16.0", "1.0"]


def tiny_project(dst: Path) -> Path:
    """A git copy of the project on the smoke preset, shrunk further."""
    repo = copy_project(ROOT, dst)
    run([sys.executable, "-m", "flexvar.cli", "preset", "smoke"], repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"].update(num_train=64, num_val=32)
    params["variants"]["depths"] = [1, 2]
    for section in ("train_tokenizer", "train_transformer"):
        params[section].update(steps=4, warmup_steps=1, checkpoint_every=2, eval_every=4, log_every=2)
    params["resources"].update(retries=0, ray_num_cpus=2)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qam", "tiny"], repo)
    return repo


TARGET = "train_transformer"   # its ancestors are the expensive half; the full graph is measured, not tested


def missing_producers(repo: Path, stages: list[str]) -> list[str]:
    """Deps of `stages` that neither exist in the repo nor are produced by a stage (dvc.yaml mid-edit)."""
    from dvc.repo import Repo

    cwd = os.getcwd()
    os.chdir(repo)
    try:
        with Repo(str(repo)) as dvc_repo:
            outs = {str(Path(o.fs_path)) for s in dvc_repo.index.stages for o in s.outs}
            return [f"{s.addressing}: {d.def_path}" for s in dvc_repo.index.stages if s.addressing in stages
                    for d in s.deps if not Path(d.fs_path).exists()
                    and not any(str(Path(d.fs_path)) == o or str(Path(d.fs_path)).startswith(o + "/") for o in outs)]
    finally:
        os.chdir(cwd)


def test_flow_on_project(ray_and_prefect, tmp_path):
    from flows.pipeline import run_pipeline
    from flows.stage_graph import load_graph

    repo = tiny_project(tmp_path / "repo")
    graph = load_graph(repo)
    assert any(s.group == TARGET for s in graph.stages.values()), f"dvc.yaml has no {TARGET} stage"
    targets = [TARGET]
    stages = list(graph.restrict(targets).stages)
    assert not (missing := missing_producers(repo, stages)), f"dvc.yaml is incomplete: no stage produces {missing}"
    result = run_pipeline(repo, targets)
    assert result == {name: "ran" for name in stages}
    assert "up to date" in run(DVC + ["status", "--with-deps", *targets], repo).stdout
    repro = run(DVC + ["repro", *targets], repo).stdout
    assert "Running stage" not in repro and "is cached" not in repro
    # MLflow (embedded store of the copy): one parent run, every stage run a child of it
    with sqlite3.connect(repo / "mlflow.db") as db:
        tags = db.execute("select run_uuid, key, value from tags").fetchall()
    by_run: dict[str, dict[str, str]] = {}
    for run_id, key, value in tags:
        by_run.setdefault(run_id, {})[key] = value
    parents = [r for r, t in by_run.items() if t.get("flexvar_role") == "pipeline"]
    children = [t for t in by_run.values() if "stage" in t]
    assert len(parents) == 1 and by_run[parents[0]]["pipeline_run_id"].startswith("prefect-")
    assert len(children) == len(stages) and all(t["mlflow.parentRunId"] == parents[0] for t in children)


def test_local_ray_workers_run_at_the_drivers_priority(ray_and_prefect):
    import ray

    @ray.remote(num_cpus=1)
    def niceness() -> int:
        return os.nice(0)

    assert ray.get(niceness.remote()) == os.nice(0)
