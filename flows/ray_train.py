"""Multi-worker training: a training stage run data-parallel by Ray Train's TorchTrainer.

    python -m flows.ray_train python -m pipeline.train_transformer --depth 2 --params params.yaml
    python -m flows.ray_train python -m pipeline.train_tokenizer --params params.yaml

With `resources.train_workers: N > 1` the stage's own `main()` runs in N Ray Train workers that
form one torch.distributed group (gloo on CPU, NCCL on GPU); with N = 1 it simply runs in this
process. `auto` = the Ray cluster's GPUs divided by the stage's `num_gpus` per worker (1 without
GPUs): every GPU of the cluster, as `dvc repro` (pipeline/data_parallel.py, torchrun) uses every
GPU of its node. The pipeline flow (flows/pipeline.py) uses this for the training stages automatically.

How the N copies cooperate (the library side is flexvar/distributed.py, no-ops in one process):
  * every worker takes 1/N of each global batch (`train_*.batch_size` stays the global batch = workers x
    `micro_batch` x accumulation steps, checked before the workers start); the model
    runs under PyTorch DDP (gradient buckets averaged during backward) or, with
    `resources.parallelism: fsdp`, FSDP2 sharding — so the loss follows the 1-worker trajectory;
  * rank 0 reads the resume checkpoint and broadcasts it, so a resumed run continues everywhere;
  * rank 0 alone writes the stage's outputs (models/, metrics/, plots/, the resume checkpoint) and
    logs to MLflow (pipeline/tracking.py gives other ranks an untracked logger); other ranks write
    their copies to a scratch folder (.cache/ray_train/rank<k>/) that nothing reads.
Resources per worker: `resources.stages.<stage>` (num_cpus, 1 if unset; num_gpus). Worker failures restart
the whole group up to `resources.retries` times (Ray Train FailureConfig); training resumes from
rank 0's checkpoint. Workers need the project at the same path (shared filesystem, as for the flow).
"""
from __future__ import annotations

import importlib
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Callable

from flexvar.config import Params, StageResources, load_params

# Stage modules whose training loops support data parallelism, and the options naming their outputs
# (redirected to a scratch folder on ranks > 0).
OUTPUT_OPTIONS = {
    "pipeline.train_tokenizer": ("--out", "--metrics", "--plots", "--ckpt-dir"),
    "pipeline.train_transformer": ("--out", "--metrics", "--plots"),
}
SCRATCH = Path(".cache") / "ray_train"


def parse_stage_command(cmd: str) -> tuple[str, list[str]] | None:
    """`python -m pipeline.train_X ARGS` -> (module, ARGS) for a data-parallel stage module, else None."""
    try:
        words = shlex.split(cmd)
    except ValueError:
        return None
    if len(words) >= 3 and Path(words[0]).name.startswith("python") and words[1] == "-m" \
            and words[2] in OUTPUT_OPTIONS and not any(w in ("&&", "||", ";", "|", ">") for w in words):
        return words[2], words[3:]
    return None


def rank_argv(module: str, argv: list[str], rank: int) -> list[str]:
    """The stage arguments for `rank`: unchanged on rank 0, outputs moved to a scratch folder elsewhere."""
    if rank == 0:
        return list(argv)
    out, skip, given = [], None, {}
    for word in argv:
        if skip:
            given[skip], skip = word, None
            continue
        name, eq, value = word.partition("=")
        if name in OUTPUT_OPTIONS[module]:
            if eq:
                given[name] = value
            else:
                skip = name
            continue
        out.append(word)
    scratch = SCRATCH / f"rank{rank}"
    for opt in OUTPUT_OPTIONS[module]:   # keep the file suffix the stage checks (e.g. --metrics *.json)
        out += [opt, str(scratch / (opt.lstrip("-") + Path(given.get(opt, "")).suffix))]
    return out


# --------------------------------------------------------------------------- on each worker
def _stage_on_worker(config: dict[str, Any]) -> None:
    """Ray Train worker body: the stage's main() in the project root, outputs per rank."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    os.chdir(config["root"])
    os.environ.update(config["env"])
    sys.path.insert(0, config["root"])
    rc = importlib.import_module(config["module"]).main(rank_argv(config["module"], config["argv"], rank))
    if rc:
        raise RuntimeError(f"{config['module']} exited with {rc} on rank {rank}")


def _call_on_worker(config: dict[str, Any]) -> None:
    config["fn"](**config["kwargs"])


# --------------------------------------------------------------------------- on the driver
def run_on_workers(fn: Callable[..., Any], kwargs: dict[str, Any], workers: int, res: StageResources,
                   storage: Path, name: str, max_failures: int = 0) -> None:
    """Run `fn(**kwargs)` in `workers` Ray Train workers forming one torch.distributed group."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = res.num_gpus > 0
    per_worker = {"CPU": 1 if res.num_cpus is None else res.num_cpus, **({"GPU": res.num_gpus} if use_gpu else {})}
    trainer = TorchTrainer(
        _call_on_worker, train_loop_config={"fn": fn, "kwargs": kwargs},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=per_worker),
        run_config=RunConfig(name=name, storage_path=str(storage.resolve()),
                             failure_config=FailureConfig(max_failures=max_failures)))
    trainer.fit()


def train_workers(params: Params, stage: str) -> int:
    """`resources.train_workers` on the Ray cluster: a number as given; auto = the cluster's GPUs over the
    stage's `num_gpus` per worker (1 when either is 0)."""
    setting = params.resources.train_workers
    if setting != "auto":
        return int(setting)
    import ray

    gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
    per_worker = params.resources.for_stage(stage).num_gpus
    return max(int(gpus // per_worker), 1) if gpus and per_worker > 0 else 1


def stage_name(module: str, stage: str | None = None) -> str:
    return stage or os.environ.get("DVC_STAGE") or module.rsplit(".", 1)[-1]   # dvc.yaml stage name


def run_stage_distributed(module: str, argv: list[str], root: str | Path, params: Params,
                          env: dict[str, str] | None = None, stage: str | None = None) -> None:
    """The training stage `module` with `argv` on `resources.train_workers` workers (Ray must be up).
    The global batch is checked against the workers first (ConfigError naming the keys)."""
    from flexvar.distributed import split_batch

    root = Path(root).resolve()
    stage = stage_name(module, stage)
    name = f"{stage}-{os.getpid()}"
    workers = train_workers(params, stage)
    for global_batch, micro, section in importlib.import_module(module).batch_checks(params):
        split_batch(global_batch, workers, micro, section)
    config = {"module": module, "argv": argv, "root": str(root), "env": dict(env or {})}
    run_on_workers(_stage_on_worker, {"config": config}, workers,
                   params.resources.for_stage(stage), root / SCRATCH, name, params.resources.retries)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]) or not argv:
        print(__doc__)
        return 0
    parsed = parse_stage_command(shlex.join(argv))
    if parsed is None:
        print(f"flows.ray_train: not a data-parallel stage command: {shlex.join(argv)} "
              f"(supported: python -m {' | '.join(OUTPUT_OPTIONS)} ...)", file=sys.stderr)
        return 2
    module, stage_argv = parsed
    params_path = stage_argv[stage_argv.index("--params") + 1] if "--params" in stage_argv else "params.yaml"
    params = load_params(params_path, uses=["resources"])   # the stage checks its own sections
    if params.resources.train_workers == 1:
        return importlib.import_module(module).main(stage_argv)
    from flows.cluster import init_ray

    init_ray(params.resources, Path.cwd())
    if train_workers(params, stage_name(module)) == 1:
        return importlib.import_module(module).main(stage_argv)
    run_stage_distributed(module, stage_argv, Path.cwd(), params, env={
        k: v for k, v in os.environ.items() if k.startswith(("FLEXVAR_", "DVC_", "MLFLOW_"))})
    return 0


if __name__ == "__main__":
    sys.exit(main())
