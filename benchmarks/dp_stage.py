"""Run a training stage data-parallel under torchrun, without Ray (benchmarks only):

    python -m torch.distributed.run --standalone --nproc_per_node 2 benchmarks/dp_stage.py \
        pipeline.train_tokenizer --params params.yaml ...

Each process joins the gloo group torchrun describes and runs the stage's main() with rank 0's
outputs unchanged and other ranks' outputs in scratch folders (flows.ray_train.rank_argv), which
is what a Ray Train worker does; benchmarks/scale_memory.py --dp torchrun uses it where Ray cannot start.

With DP_STAGE_TRACE=<folder> set, each rank's StepBatchSampler appends "step item item ..." lines to
<folder>/rank<r>.txt as its DataLoader draws them (scale_memory.py checks the ranks read disjoint items).
"""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch.distributed as dist  # noqa: E402

from flexvar.data.sampling import StepBatchSampler  # noqa: E402
from flows.ray_train import rank_argv  # noqa: E402


def trace_batches(folder: Path) -> None:
    """Wrap StepBatchSampler.__iter__ so every batch it yields is appended to folder/rank<r>.txt."""
    draw = StepBatchSampler.__iter__

    def traced(self):
        folder.mkdir(parents=True, exist_ok=True)
        for step, part in enumerate(draw(self), self.start_step):
            with open(folder / f"rank{self.rank}.txt", "a") as f:
                f.write(f"{step} {' '.join(map(str, part))}\n")
            yield part
    StepBatchSampler.__iter__ = traced


def main() -> int:
    module, argv = sys.argv[1], sys.argv[2:]
    dist.init_process_group("gloo")
    if os.environ.get("DP_STAGE_TRACE"):
        trace_batches(Path(os.environ["DP_STAGE_TRACE"]))
    try:
        return importlib.import_module(module).main(rank_argv(module, argv, dist.get_rank()))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
