"""Run the dvc.yaml pipeline as a Prefect flow on Ray: the same graph as `dvc repro`, fanned out.

    python -m flows.pipeline                       # every stage that is not up to date
    python -m flows.pipeline train_transformer     # a target and its ancestors, like `dvc repro TARGET`
    python -m flows.pipeline --dry-run             # print the plan

What it does:
  * reads the stage graph from dvc.yaml through DVC's Python API (flows/stage_graph.py): stages,
    matrix entries and edges are DVC's, never a second list;
  * walks the graph on the driver: a stage becomes ready when all its upstream stages are done;
    DVC then says whether it changed (deps, params, command, outs); a changed stage runs as a
    Prefect task on Ray, an unchanged one is skipped. Independent stages (the entries of a matrix
    stage, parallel branches) run at the same time, as far as Ray's resources allow;
  * per-stage Ray resources from params `resources.stages.<stage>` (num_cpus / num_gpus; the
    dvc.yaml stage name or one matrix entry's full name), applied with prefect-ray's remote_options;
    a CPU stage without num_cpus takes a whole node's CPUs, the threads `dvc repro` gives it (a GPU
    stage its GPUs' share of the node);
  * failed stages are retried `resources.retries` times with exponential backoff from
    `resources.retry_delay_s` (retries keep partial outputs, so training resumes from its checkpoint);
  * every finished stage is committed to dvc.lock on the driver, one at a time (`dvc commit -f`),
    before its dependants are considered, so a following `dvc repro` has nothing to do;
  * all stage runs of one flow run share FLEXVAR_PIPELINE_RUN_ID, so MLflow groups them under one
    parent run (pipeline/tracking.py).

Cluster assumption (see docs/orchestration.md): with `resources.ray_address` set, the project's
code is shipped to the workers (runtime_env working_dir), but the workers must see the project's
working tree at the same absolute path through a SHARED FILESYSTEM: stage commands read their deps
and write their outs in place, and the driver hashes and commits those outs. Without a shared
filesystem use `dvc repro` per node or a DVC remote instead.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.runtime import flow_run, task_run
from prefect.tasks import exponential_backoff
from prefect_ray.context import remote_options
from prefect_ray.task_runners import RayTaskRunner

from flexvar.config import Params, StageResources, load_params
from flexvar.errors import FlexvarError, command, one_line_parser_errors
from flows.cluster import init_ray, prefect_api, python_path_env
from flows.ray_train import parse_stage_command, run_stage_distributed, train_workers
from flows.stage_graph import StageGraph, StageSpec, commit, load_graph, stale

OUTPUT_TAIL = 40   # lines of a failed command's output kept in the error
PARAM_KEYS = ["resources"]   # what the driver reads; each stage checks its own sections when it runs


class StageFailed(FlexvarError):
    """A stage command exited non-zero; the message carries the end of its output (exit code 1)."""
    exit_code = 1


# --------------------------------------------------------------------------- one stage (on a Ray worker)
def clear_outs(spec: StageSpec) -> None:
    """Remove non-persistent outs before a fresh run, as `dvc repro` does."""
    for out in map(Path, spec.clean_outs):
        if out.is_dir() and not out.is_symlink():
            shutil.rmtree(out)
        elif out.exists() or out.is_symlink():
            out.unlink()


def run_command(cmd: str, cwd: str, env: dict[str, str], log) -> None:
    """Run one shell command, streaming its output lines to the Prefect log.

    `cmd` is a dvc.yaml stage command, run through the shell (`shell=True`) exactly as `dvc repro`
    runs it: dvc.yaml is code, trusted as much as `dvc repro` trusts it (README: Servers and trust).
    """
    tail: list[str] = []
    proc = subprocess.Popen(cmd, shell=True, cwd=cwd, env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    for line in proc.stdout:
        line = line.rstrip().rsplit("\r", 1)[-1]
        log.info(line)
        tail = (tail + [line])[-OUTPUT_TAIL:]
    if proc.wait() != 0:
        raise StageFailed(f"`{cmd}` exited with {proc.returncode}:\n" + "\n".join(tail))


@task(cache_policy=NO_CACHE)
def run_stage(spec: StageSpec, env: dict[str, str], train_params: Params | None = None) -> dict:
    """Run a stage's commands in its working directory (a fresh attempt clears its outs first).

    With `train_params` (resources.train_workers > 1), a training command runs data-parallel on
    Ray Train workers (flows/ray_train.py) instead of as a subprocess.
    """
    log = get_run_logger()
    attempt = task_run.run_count or 1
    if attempt <= 1:
        clear_outs(spec)
    log.info(f"stage {spec.name} (attempt {attempt}) on {os.uname().nodename}")
    t0 = time.perf_counter()
    env = {**env, **python_path_env(Path(env["DVC_ROOT"]))}   # this worker's interpreter runs `python`
    for cmd in spec.cmds:
        parsed = parse_stage_command(cmd) if train_params is not None else None
        if parsed:
            log.info(f"{cmd} on {train_workers(train_params, spec.name)} Ray Train workers")
            run_stage_distributed(*parsed, spec.wdir, train_params, {**env, "DVC_STAGE": spec.name}, spec.name)
        else:
            run_command(cmd, spec.wdir, {**env, "DVC_STAGE": spec.name}, log)
    return {"stage": spec.name, "seconds": time.perf_counter() - t0, "attempts": attempt}


# --------------------------------------------------------------------------- the graph (on the driver)
def is_multi_worker(spec: StageSpec, params: Params) -> bool:
    return any(parse_stage_command(c) for c in spec.cmds) and train_workers(params, spec.name) > 1


def node_cpus(num_gpus: float) -> float:
    """The default CPUs of a stage under the flow: the whole of the largest live Ray node (what `dvc
    repro` gives a stage on one machine); with GPUs, the share of that node that goes with them, so
    one-GPU stages still run side by side on a many-GPU node. 1 while no node has the GPUs."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU", 0.0) >= num_gpus]
    if not nodes:
        return 1.0
    node = max(nodes, key=lambda r: r.get("CPU", 0.0))
    share = num_gpus / node["GPU"] if num_gpus else 1.0
    return max(float(int(node.get("CPU", 0.0) * share)), 1.0)


def submit(spec: StageSpec, params: Params, env: dict[str, str]):
    res = params.resources.for_stage(spec.name)
    multi = is_multi_worker(spec, params)
    if multi:   # the task only waits; its Ray Train workers hold the stage's resources, each
        res = StageResources(num_cpus=0, num_gpus=0)
    elif res.num_cpus is None:   # Ray sets OMP_NUM_THREADS to it: the stage runs on the threads dvc repro gives it
        res = StageResources(num_cpus=node_cpus(res.num_gpus), num_gpus=res.num_gpus)
    task_ = run_stage.with_options(
        name=f"stage {spec.group}", task_run_name=spec.name, retries=params.resources.retries,
        retry_delay_seconds=exponential_backoff(params.resources.retry_delay_s) if params.resources.retries else 0)
    with remote_options(num_cpus=res.num_cpus, num_gpus=res.num_gpus):
        return task_.submit(spec, env, params if multi else None)


def execute(graph: StageGraph, params: Params, root: Path, env: dict[str, str], force: bool, log) -> dict:
    """Walk the graph: check ready stages with DVC, submit changed ones, commit each as it finishes.

    Returns {stage: "ran" | "skipped" | "failed" | "not run"}; after a failure no new stage starts,
    the running ones finish (and are committed).
    """
    order = graph.order()
    status = {n: "pending" for n in order}
    running: dict = {}   # future -> stage name
    errors: dict[str, str] = {}
    while True:
        ready = [n for n in order if status[n] == "pending" and not errors
                 and all(status[u] in ("ran", "skipped") for u in graph.upstream[n])]
        if ready:
            changed = {n: True for n in ready} if force else stale(root, ready)
            for n in ready:
                if changed[n]:
                    running[submit(graph.stages[n], params, env)] = n
                    status[n] = "running"
                    log.info(f"submitted {n}")
                else:
                    status[n] = "skipped"
                    log.info(f"{n}: up to date, skipped")
            continue
        if not running:
            break
        fut = next(as_completed(list(running)))
        name = running.pop(fut)
        fut.wait()
        if fut.state.is_completed():
            commit(root, name)
            status[name] = "ran"
            log.info(f"{name}: finished and committed to dvc.lock")
        else:
            status[name], errors[name] = "failed", str(fut.state.message or fut.state.type)
            log.error(f"{name}: failed: {errors[name]}")
    return {n: ("not run" if s == "pending" else s) for n, s in status.items()} | (
        {"_errors": errors} if errors else {})


@flow(name="flexvar-pipeline", task_runner=RayTaskRunner())
def pipeline_flow(root: str = ".", targets: list[str] | None = None, params_file: str = "params.yaml",
                  force: bool = False) -> dict:
    """Every stage of dvc.yaml (or `targets` and their ancestors) that is not up to date, on Ray."""
    log = get_run_logger()
    root_p = Path(root).resolve()
    params = load_params(root_p / params_file, uses=PARAM_KEYS)
    graph = load_graph(root_p).restrict(targets or [])
    run_id = os.environ.get("FLEXVAR_PIPELINE_RUN_ID") or f"prefect-{flow_run.id}"
    env = {"FLEXVAR_PIPELINE_RUN_ID": run_id, "DVC_ROOT": str(root_p)}
    log.info(f"{len(graph.stages)} stages; pipeline run id {run_id}")
    result = execute(graph, params, root_p, env, force, log)
    if result.get("_errors"):
        raise StageFailed("; ".join(f"{k}: {v.splitlines()[0] if v else ''}" for k, v in result["_errors"].items()))
    return result


def run_pipeline(root: str | Path = ".", targets: list[str] | None = None, params_file: str = "params.yaml",
                 force: bool = False) -> dict:
    """Start (or join) Ray and a Prefect API, then run the flow; Ray is shut down if this call started it."""
    import ray

    root = Path(root).resolve()
    params = load_params(root / params_file, uses=PARAM_KEYS)
    with prefect_api():
        started = init_ray(params.resources, root)
        try:
            return pipeline_flow(str(root), targets or [], params_file, force)
        finally:
            if started:
                ray.shutdown()


def plan(root: Path, targets: list[str]) -> list[tuple[str, bool, list[str]]]:
    """(stage, changed now?, upstream) in execution order; downstream of a changed stage may change too."""
    graph = load_graph(root).restrict(targets)
    changed = stale(root, graph.order())
    return [(n, changed[n], sorted(graph.upstream[n])) for n in graph.order()]


@command("flows.pipeline")
def main(argv: list[str] | None = None) -> int:
    ap = one_line_parser_errors(argparse.ArgumentParser(prog="python -m flows.pipeline",
                                                        description=__doc__.split("\n\n")[0]))
    ap.add_argument("targets", nargs="*", help="stages to bring up to date, with their ancestors (default: all)")
    ap.add_argument("--root", default=".", help="DVC project root (default: .)")
    ap.add_argument("--params", default="params.yaml", help="params file, relative to the root")
    ap.add_argument("--force", action="store_true", help="run every selected stage even if up to date")
    ap.add_argument("--dry-run", action="store_true", help="print the stages and whether they changed; run nothing")
    args = ap.parse_args(argv)
    root = Path(args.root).resolve()
    if args.dry_run:
        for name, changed, up in plan(root, args.targets):
            print(f"{'changed ' if changed else 'ok      '} {name}" + (f"  <- {', '.join(up)}" if up else ""))
        return 0
    t0 = time.perf_counter()
    result = run_pipeline(root, args.targets, args.params, args.force)
    for name, status in result.items():
        print(f"{status:8s} {name}")
    print(f"flows.pipeline: done in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
