"""A training stage that uses every accelerator of its node under `dvc repro`: it re-launches itself
data-parallel with torchrun.

    resources.train_workers: 2      # or auto = the GPUs visible (1 without a GPU)

`python -m pipeline.train_transformer ...` (what dvc.yaml runs) reads params; with N > 1 workers and
no process group yet it runs `python -m torch.distributed.run --standalone --nproc_per_node N -m
pipeline.train_transformer ...` with the same arguments and returns its exit code, so DVC records the
outputs as usual. Each of the N processes joins the group (flexvar.distributed.init_from_env: gloo on
CPU, nccl with one GPU per process on CUDA) and runs the stage; rank 0 alone writes outputs, metrics,
plots and the MLflow run. Under the flow (flows/ray_train.py) Ray Train has already formed the group, so
nothing is re-launched: the same settings mean the same thing on one machine and on a cluster.

The global batch is checked against the workers before launching (flexvar.distributed.split_batch), so
a batch that does not divide is refused with one line naming the keys, not N tracebacks.
"""
from __future__ import annotations

import subprocess
import sys

from flexvar import distributed


def relaunch(module: str, argv: list[str] | None, workers_setting: int | str, batch_checks=()) -> int | None:
    """Run `python -m module argv` on the resolved number of workers through torchrun and return its exit
    code; None when this process should run the stage itself (one worker, or already one of the workers).
    `batch_checks`: (global batch, micro-batch or None, section) to validate against the workers first."""
    if distributed.launched_by_torchrun() or distributed.active():
        return None
    workers = distributed.resolve_workers(workers_setting)
    if workers == 1:
        return None
    for global_batch, micro, section in batch_checks:
        distributed.split_batch(global_batch, workers, micro, section)
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={workers}",
           "-m", module, *argv]
    print(f"{module.rsplit('.', 1)[-1]}: data-parallel on {workers} workers (resources.train_workers = "
          f"{workers_setting}) via torchrun", flush=True)
    return subprocess.call(cmd)
